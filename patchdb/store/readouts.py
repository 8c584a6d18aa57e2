"""First-token readouts and the control units, as the store sees them: which are expected, which
are present, and writing them (docs/science.md explains what they are).

A readout is keyed like a unit (experiment, patch layer, source word, target word) plus the
question it answers: TRIAL_QUESTION for the sweep's own, else an unrelated question. What is
missing is a query, as for rollouts.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.controls import (
    RANDOM_VECTOR,
    RANDOM_VECTOR_LAYER,
    TRIAL_QUESTION,
    UNRELATED_QUESTIONS,
    unrelated_questions,
)
from patchdb.experiments import BASELINE_LAYER, NO_STEERING, baseline_targets
from patchdb.store.dialect import dialect_insert
from patchdb.store.models import Experiment, Readout
from patchdb.store.sweeps import ExpectedUnit, check_sweep_words, experiment_def

INSERT_ROWS = 500  # rows per INSERT statement (SQLite limits the bound values of one)
UnitKey = tuple[int, int, str, str]  # experiment id, patch layer, source word, target word


@dataclass(frozen=True)
class ReadoutUnit:
    """One readout to compute: a unit and the question asked in place of the trial's."""

    unit: ExpectedUnit
    question: str = TRIAL_QUESTION

    @property
    def key(self) -> tuple[int, int, str, str, str]:
        u = self.unit
        return (u.experiment_id, u.patch_layer, u.source_word, u.target_word, self.question)


@dataclass(frozen=True)
class ReadoutValues:
    """What a readout holds: P(first token is YES-like), P(NO-like), the entropy (nats) of the
    whole first-token distribution, and the likeliest first token's text."""

    p_yes: float
    p_no: float
    entropy: float
    top_token: str


def unit_key(unit: ExpectedUnit) -> UnitKey:
    return (unit.experiment_id, unit.patch_layer, unit.source_word, unit.target_word)


def random_vector_units(
    config: SweepConfig, experiments: list[Experiment], words: list[str] | None = None
) -> list[ExpectedUnit]:
    """The random-vector control's units when the sweep turns it on: one per target word of each
    experiment (the unsteered target has no word, so no norm to match), narrowed to `words`."""
    if RANDOM_VECTOR not in config.controls:
        return []
    if words is not None:
        check_sweep_words(config, words)
    units: list[ExpectedUnit] = []
    for exp in experiments:
        for target in baseline_targets(experiment_def(exp), config.positive_words,
                                       config.negative_words):
            if target == NO_STEERING or (words is not None and target not in words):
                continue
            units.append(ExpectedUnit(exp.name, exp.id, RANDOM_VECTOR_LAYER, NO_STEERING, target))
    return units


def no_injection_unit(exp: Experiment) -> ExpectedUnit:
    """The experiment's unit with nothing injected and nothing patched (its no-injection arm)."""
    return ExpectedUnit(exp.name, exp.id, BASELINE_LAYER, NO_STEERING, NO_STEERING)


def expected_readouts(
    config: SweepConfig, experiments: list[Experiment], units: list[ExpectedUnit]
) -> list[ReadoutUnit]:
    """The readouts the sweep expects for these units: each unit's trial readout and, with the
    unrelated_questions control, each unrelated question at each unit and at each experiment's
    no-injection arm (the reference of the yes-bias index)."""
    wanted = [ReadoutUnit(u) for u in units]
    if UNRELATED_QUESTIONS not in config.controls:
        return wanted
    arms = list(dict.fromkeys([*units, *(no_injection_unit(e) for e in experiments)]))
    order = {e.id: i for i, e in enumerate(experiments)}
    arms.sort(key=lambda u: order[u.experiment_id])
    for question in unrelated_questions():
        wanted.extend(ReadoutUnit(u, question) for u in arms)
    return wanted


def present_readouts(session: Session, experiment_ids: list[int]) -> set[tuple[int, int, str, str, str]]:
    """The keys of every stored readout of these experiments."""
    rows = session.execute(
        select(Readout.experiment_id, Readout.patch_layer, Readout.source_word,
               Readout.target_word, Readout.question)
        .where(Readout.experiment_id.in_(experiment_ids))
    )
    return {tuple(row) for row in rows}  # type: ignore[misc]


def insert_readouts(
    session: Session, values: dict[ReadoutUnit, ReadoutValues], run_id: int | None,
    now: datetime,
) -> int:
    """Insert readouts not stored yet (one written meanwhile by another process is kept: a
    readout is deterministic); returns how many rows this call inserted."""
    rows = [
        dict(experiment_id=r.unit.experiment_id, patch_layer=r.unit.patch_layer,
             source_word=r.unit.source_word, target_word=r.unit.target_word,
             question=r.question, p_yes=v.p_yes, p_no=v.p_no, entropy=v.entropy,
             top_token=v.top_token, stage_run_id=run_id, created_at=now)
        for r, v in values.items()
    ]
    written = 0
    for start in range(0, len(rows), INSERT_ROWS):
        stmt = dialect_insert(session, Readout).values(rows[start:start + INSERT_ROWS])
        stmt = stmt.on_conflict_do_nothing(index_elements=[
            "experiment_id", "patch_layer", "source_word", "target_word", "question"])
        written += max(0, int(session.execute(stmt).rowcount))  # type: ignore[attr-defined]
    return written
