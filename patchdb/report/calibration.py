"""How good is a judge config? Its verdicts against human labels, per grader.

The truth for a (rollout, grader) is the majority of its labelers' YES/NO; a tie is no truth and
is left out. Unparsed verdicts are counted apart, never as NO. Rates carry Wilson 95% intervals;
Cohen's kappa is agreement beyond what the two sides' YES rates give by chance.
"""

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.errors import UnknownNameError
from patchdb.experiments import GRADERS
from patchdb.report.aggregate import describe_judge_config
from patchdb.report.stats import wilson_interval
from patchdb.store.models import Experiment, JudgeConfig, Judgment, Label, Rollout, Sweep


@dataclass(frozen=True)
class Table:
    """A 2x2 table: the judge's verdict (rows) against the truth (columns)."""

    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fn + self.fp + self.tn

    def add(self, judged: bool, truth: bool) -> "Table":
        return Table(self.tp + (judged and truth), self.fn + (not judged and truth),
                     self.fp + (judged and not truth), self.tn + (not judged and not truth))


def ratio(k: int, n: int) -> float:
    return k / n if n else math.nan


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson 95% interval of k/n (NaN, NaN for n = 0)."""
    lower, upper = wilson_interval(float(k), float(n))
    return float(lower), float(upper)


def cohen_kappa(table: Table) -> float:
    """Cohen's kappa of the 2x2 table; NaN where chance agreement is 1 (one class only)."""
    n = table.n
    if n == 0:
        return math.nan
    observed = (table.tp + table.tn) / n
    yes = (table.tp + table.fp) / n * (table.tp + table.fn) / n
    no = (table.fn + table.tn) / n * (table.fp + table.tn) / n
    chance = yes + no
    return math.nan if chance >= 1 else (observed - chance) / (1 - chance)


@dataclass(frozen=True)
class Calibration:
    """One judge config's verdicts for one grader against the labels."""

    judge_config_id: int
    grader: str
    table: Table
    unparsed: int

    def to_dict(self) -> dict[str, Any]:
        t = self.table
        return {"judge_config_id": self.judge_config_id, "grader": self.grader, "n": t.n,
                "tp": t.tp, "fn": t.fn, "fp": t.fp, "tn": t.tn, "unparsed": self.unparsed,
                "tpr": _num(ratio(t.tp, t.tp + t.fn)), "tpr_ci": _pair(wilson(t.tp, t.tp + t.fn)),
                "tnr": _num(ratio(t.tn, t.tn + t.fp)), "tnr_ci": _pair(wilson(t.tn, t.tn + t.fp)),
                "accuracy": _num(ratio(t.tp + t.tn, t.n)), "kappa": _num(cohen_kappa(t))}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _pair(p: tuple[float, float]) -> list[float | None]:
    return [_num(p[0]), _num(p[1])]


def truths(session: Session, sweep: Sweep) -> dict[tuple[int, str], bool]:
    """The labelers' majority per (rollout, grader) of the sweep; ties left out."""
    votes: dict[tuple[int, str], Counter[bool]] = {}
    rows = session.execute(
        select(Label.rollout_id, Label.grader, Label.label)
        .join(Rollout, Rollout.id == Label.rollout_id)
        .join(Experiment, Experiment.id == Rollout.experiment_id)
        .where(Experiment.sweep_id == sweep.id))
    for rollout_id, grader, value in rows:
        votes.setdefault((rollout_id, grader), Counter())[bool(value)] += 1
    return {key: c[True] > c[False] for key, c in votes.items() if c[True] != c[False]}


def verdicts(session: Session, sweep: Sweep,
             judge_config_id: int | None = None) -> dict[tuple[int, int, str], bool | None]:
    """(judge config, rollout, grader) -> verdict for the sweep's judgments."""
    query = (select(Judgment.judge_config_id, Judgment.rollout_id, Judgment.grader,
                    Judgment.verdict)
             .join(Rollout, Rollout.id == Judgment.rollout_id)
             .join(Experiment, Experiment.id == Rollout.experiment_id)
             .where(Experiment.sweep_id == sweep.id))
    if judge_config_id is not None:
        query = query.where(Judgment.judge_config_id == judge_config_id)
    return {(c, r, g): v for c, r, g, v in session.execute(query)}


def calibrate_judges(session: Session, sweep: Sweep,
                     judge_config_id: int | None = None) -> list[Calibration]:
    """Per judge config and grader: the verdicts on labeled rollouts against the labels."""
    truth = truths(session, sweep)
    tables: dict[tuple[int, str], Table] = {}
    unparsed: Counter[tuple[int, str]] = Counter()
    for (config, rollout, grader), verdict in verdicts(session, sweep, judge_config_id).items():
        if (rollout, grader) not in truth:
            continue
        key = (config, grader)
        if verdict is None:
            unparsed[key] += 1
            tables.setdefault(key, Table())
        else:
            tables[key] = tables.get(key, Table()).add(verdict, truth[(rollout, grader)])
    order: dict[str, int] = {g: i for i, g in enumerate(GRADERS)}
    return [Calibration(c, g, tables[(c, g)], unparsed[(c, g)])
            for c, g in sorted(tables, key=lambda k: (k[0], order.get(k[1], 99)))]


@dataclass(frozen=True)
class Agreement:
    """Two judge configs' verdicts on the rollouts both judged (parsed by both), per grader."""

    grader: str
    table: Table

    def to_dict(self) -> dict[str, Any]:
        t = self.table
        return {"grader": self.grader, "n": t.n, "both_yes": t.tp, "both_no": t.tn,
                "only_first_yes": t.fp, "only_second_yes": t.fn,
                "agreement": _num(ratio(t.tp + t.tn, t.n)), "kappa": _num(cohen_kappa(t))}


def agreement(session: Session, sweep: Sweep, first: int, second: int) -> list[Agreement]:
    """Per grader, how often judge configs `first` and `second` give the same verdict."""
    for config in (first, second):
        if session.get(JudgeConfig, config) is None:
            raise UnknownNameError(f"no judge config {config} in the store")
    a = verdicts(session, sweep, first)
    b = verdicts(session, sweep, second)
    tables: dict[str, Table] = {}
    for (_, rollout, grader), verdict in a.items():
        other = b.get((second, rollout, grader))
        if verdict is not None and other is not None:
            tables[grader] = tables.get(grader, Table()).add(verdict, other)
    return [Agreement(g, tables[g]) for g in GRADERS if g in tables]


def describe(session: Session, judge_config_id: int) -> str:
    config = session.get(JudgeConfig, judge_config_id)
    assert config is not None
    return describe_judge_config(config)
