"""Labels travel with their rollouts: into the JSON export, back through import-json, and
across `merge`.

In an exported tree, each layer folder holds one `labels_<grader>.json` per grader with labels
(the grader's own name: coherence, detection, detection_identification):

    {key: [{"sample": 0, "labeler": "ada", "label": true, "note": null,
            "created_at": "2026-11-30T20:52:53+00:00"}, ...]}

keys as in rollouts.json, one entry per label, sorted by sample and labeler. Importing adds the
labels that are not in the store; a label that is there with another YES/NO is a conflict and
nothing is imported.
"""

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.errors import ImportFormatError
from patchdb.experiments import EXPERIMENTS, GRADERS, at_layer, key_label, layer_folder
from patchdb.store.merge import (
    TABLES,
    MergeResult,
    chunks,
    insert_new,
    rollout_here,
    utc,
    with_rollout_key,
)
from patchdb.store.models import Experiment, Label, Rollout
from patchdb.store.store import Store

LABEL_FIELDS = {"sample", "labeler", "label", "note", "created_at"}
LABELS = TABLES["labels"]
LABEL_KEY = ["rollout_id", "grader", "labeler"]
RolloutIndex = dict[tuple[int, int, str, str, int], tuple[int, str]]


def _iso(stamp: datetime) -> str:
    aware = stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)
    return aware.isoformat()


def export_labels(session: Session, experiment: Experiment, folder: Path,
                  write_json: Callable[[Path, Any], Path]) -> list[Path]:
    """Write the experiment's labels as layer_<L>/labels_<grader>.json under folder."""
    exp = EXPERIMENTS[experiment.name]
    rows = session.execute(
        select(Rollout.patch_layer, Label.grader, Rollout.source_word, Rollout.target_word,
               Rollout.sample_index, Label.labeler, Label.label, Label.note, Label.created_at)
        .join(Rollout, Rollout.id == Label.rollout_id)
        .where(Rollout.experiment_id == experiment.id)
        .order_by(Rollout.patch_layer, Label.grader, Rollout.source_word, Rollout.target_word,
                  Rollout.sample_index, Label.labeler))
    files: dict[tuple[int, str], dict[str, list[dict[str, Any]]]] = {}
    for layer, grader, source, target, sample, labeler, value, note, created in rows:
        by_key = files.setdefault((layer, grader), {})
        by_key.setdefault(key_label(at_layer(exp, layer), source, target), []).append(
            {"sample": sample, "labeler": labeler, "label": bool(value), "note": note,
             "created_at": _iso(created)})
    return [write_json(folder / layer_folder(layer) / f"labels_{grader}.json", data)
            for (layer, grader), data in sorted(files.items())]


def _entry(path: Path, key: str, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or set(entry) != LABEL_FIELDS:
        raise ImportFormatError(f"{path}: key {key!r}: each label must be an object with "
                                f"{', '.join(sorted(LABEL_FIELDS))}")
    ok = (isinstance(entry["sample"], int) and not isinstance(entry["sample"], bool)
          and isinstance(entry["labeler"], str) and entry["labeler"].strip()
          and isinstance(entry["label"], bool)
          and (entry["note"] is None or isinstance(entry["note"], str))
          and isinstance(entry["created_at"], str))
    if not ok:
        raise ImportFormatError(f"{path}: key {key!r}: a label has a field of the wrong type")
    try:
        created = datetime.fromisoformat(entry["created_at"])
    except ValueError:
        raise ImportFormatError(f"{path}: key {key!r}: created_at {entry['created_at']!r} is "
                                "not an ISO 8601 time") from None
    return {**entry, "created_at": created if created.tzinfo else created.replace(tzinfo=UTC)}


def import_labels(session: Session, layers: list[tuple[str, int, Path]],
                  experiment_ids: dict[str, int], rollouts: RolloutIndex,
                  parse_key: Callable[[Any, Path, str], tuple[str, str]],
                  load: Callable[[Path], Any]) -> int:
    """Add the labels of every (experiment, layer, folder)'s labels_<grader>.json files that the
    store lacks; returns how many were new."""
    new = 0
    for name, layer, folder in layers:
        exp = EXPERIMENTS[name]
        eid = experiment_ids[name]
        for grader in GRADERS:
            path = folder / f"labels_{grader}.json"
            if not path.exists():
                continue
            if grader not in ("coherence", exp.detection_grader):
                raise ImportFormatError(f"{path}: experiment {name} is not graded by {grader}")
            data = load(path)
            if not isinstance(data, dict):
                raise ImportFormatError(f"{path}: expected an object {{key: [label, ...]}}")
            for key, entries in data.items():
                source, target = parse_key(at_layer(exp, layer), path, key)
                if not isinstance(entries, list):
                    raise ImportFormatError(f"{path}: key {key!r} must hold a list of labels")
                for raw in entries:
                    entry = _entry(path, key, raw)
                    found = rollouts.get((eid, layer, source, target, entry["sample"]))
                    if found is None:
                        raise ImportFormatError(f"{path}: key {key!r} sample {entry['sample']} "
                                                "has no rollout")
                    new += _add_missing(session, path, key, found[0], grader, entry)
    session.flush()
    return new


def _add_missing(session: Session, path: Path, key: str, rollout_id: int, grader: str,
                 entry: dict[str, Any]) -> int:
    """Add the label unless the store has it (1 if added); a different YES/NO is a conflict."""
    here = session.scalar(select(Label).where(Label.rollout_id == rollout_id,
                                              Label.grader == grader,
                                              Label.labeler == entry["labeler"]))
    if here is None:
        session.add(Label(rollout_id=rollout_id, grader=grader, labeler=entry["labeler"],
                          label=entry["label"], note=entry["note"],
                          created_at=entry["created_at"]))
        return 1
    if here.label != entry["label"]:
        raise ImportFormatError(f"{path}: key {key!r} sample {entry['sample']}: the label of "
                                f"{entry['labeler']} differs from the one in the store; nothing "
                                "was imported")
    return 0


def copy_labels(target: Store, source: Store, experiment_ids: dict[int, int],
                here: dict[tuple[int, int, str, str, int], tuple[int, int]], size: int,
                result: MergeResult, progress: Callable[[str, int], None] | None) -> None:
    """merge: every source label whose rollout is here with the same answer (matched by key,
    like judgments); a label already here for that rollout, grader and labeler is kept."""
    for rows in chunks(source, with_rollout_key(LABELS), LABELS.c.id, size):
        values = []
        for row in rows:
            mine = rollout_here(row, experiment_ids, here)
            if mine is None or mine[1] != hash(row["r_answer"]):
                continue  # no such rollout here, or it holds another answer
            values.append({"rollout_id": mine[0], "grader": row["grader"],
                           "labeler": row["labeler"], "label": row["label"],
                           "note": row["note"], "created_at": utc(row["created_at"])})
        if not values:
            continue

        def insert(session: Session, values: list[dict[str, Any]] = values) -> int:
            return len(insert_new(session.connection(), LABELS, LABEL_KEY, values))

        n = target.transact(insert)
        result.copied["labels"] = result.copied.get("labels", 0) + n
        if progress:
            progress("labels", n)
