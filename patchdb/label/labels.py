"""Writing and removing human labels; each call is one committed transaction."""

import getpass
import os
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from patchdb.errors import LabelError
from patchdb.store.models import Experiment, Label, Rollout, Sweep, utcnow


def default_labeler() -> str:
    """The OS user name: who labels, unless --labeler says otherwise."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "unknown"


def graders_of(experiment: Experiment) -> tuple[str, str]:
    """The two graders asked about each rollout of an experiment."""
    return ("coherence", experiment.detection_grader)


def check_labelable(session: Session, rollout_id: int, grader: str,
                    sweep: Sweep | None = None) -> Rollout:
    """The rollout, if it exists, belongs to `sweep` (when given) and its experiment asks
    `grader`; else a LabelError."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise LabelError(f"no rollout with id {rollout_id} in the store")
    experiment = session.get(Experiment, rollout.experiment_id)
    assert experiment is not None
    if sweep is not None and experiment.sweep_id != sweep.id:
        other = session.get(Sweep, experiment.sweep_id)
        assert other is not None
        raise LabelError(f"rollout {rollout_id} belongs to sweep {other.name!r}, not to "
                         f"sweep {sweep.name!r}")
    asked = graders_of(experiment)
    if grader not in asked:
        raise LabelError(f"rollout {rollout_id} ({experiment.name}) is graded by "
                         f"{' and '.join(asked)}, not {grader}")
    return rollout


def set_label(session: Session, rollout_id: int, grader: str, labeler: str, value: bool,
              note: str | None = None, sweep: Sweep | None = None,
              overwrite: bool = True) -> Label:
    """Write (or, with `overwrite`, overwrite) one labeler's YES/NO for a rollout and grader
    (of `sweep`, when given: a rollout of another sweep is refused). Without `overwrite` a
    label already there is refused (the page: another tab of this labeler wrote it)."""
    if not labeler.strip():
        raise LabelError("the labeler name is empty")
    if not isinstance(value, bool):
        raise LabelError(f"a label is YES or NO (a boolean), not {value!r}")
    check_labelable(session, rollout_id, grader, sweep)
    row = find_label(session, rollout_id, grader, labeler)
    if row is None:
        row = Label(rollout_id=rollout_id, grader=grader, labeler=labeler, label=value, note=note)
        session.add(row)
    elif not overwrite:
        raise LabelError(f"rollout {rollout_id} ({grader}) already has {labeler}'s label, "
                         "written in another tab; it is kept")
    else:
        row.label, row.note, row.created_at = value, note, utcnow()
    session.flush()
    return row


def remove_label(session: Session, rollout_id: int, grader: str, labeler: str,
                 written: tuple[int, datetime] | None = None) -> bool:
    """Delete one labeler's label (the page's undo); True if there was one. `written`: the
    label's id and time as the undoing tab wrote it; a label written since (by another tab,
    or the CLI) is left alone."""
    query = delete(Label).where(
        Label.rollout_id == rollout_id, Label.grader == grader, Label.labeler == labeler)
    if written is not None:
        query = query.where(Label.id == written[0], Label.created_at == written[1])
    result = session.execute(query)
    return bool(getattr(result, "rowcount", 0))


def find_label(session: Session, rollout_id: int, grader: str, labeler: str) -> Label | None:
    """This labeler's label of this rollout and grader, if there is one."""
    return session.scalar(select(Label).where(
        Label.rollout_id == rollout_id, Label.grader == grader, Label.labeler == labeler))
