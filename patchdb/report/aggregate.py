"""Rates per key and layer, read through the store's `layer_rates` view.

All counting happens in SQL; Python only arranges the few thousand (key, layer) rows into
lines for the plot, the table and the JSON export.
"""

import math
from dataclasses import dataclass, field

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.errors import UnknownNameError
from patchdb.experiments import EXPERIMENTS, experiment_keys, key_label
from patchdb.store.models import Experiment, JudgeConfig, Judgment, Rollout, Sweep

# One row per (experiment, layer, key) that has rollouts. The rate and its counts come from the
# chosen judge config; a key that config never scored keeps NULL (a gap, never 0).
KEY_RATES_SQL = """
SELECT experiment, patch_layer, source_word, target_word, MAX(pairs) AS pairs,
       MAX(CASE WHEN judge_config_id = :jc THEN n_scored END) AS n_scored,
       MAX(CASE WHEN judge_config_id = :jc THEN rate END) AS rate
FROM layer_rates
WHERE sweep = :sweep AND experiment IN :experiments
GROUP BY experiment, patch_layer, source_word, target_word
"""

# The bold lines: per target word for pair experiments, one mean over words otherwise. The line
# is the mean of the key rates (AVG skips NULL); the counts are pooled for the Wilson band.
GROUP_RATES_SQL = f"""
WITH k AS ({KEY_RATES_SQL})
SELECT experiment, patch_layer, CASE WHEN pairs THEN target_word ELSE '' END AS grp,
       AVG(rate) AS rate, COALESCE(SUM(n_scored), 0) AS n_scored,
       COALESCE(SUM(ROUND(rate * n_scored)), 0) AS successes
FROM k
GROUP BY experiment, patch_layer, grp
"""

MEAN_LABEL = "Mean"


@dataclass
class Line:
    """One line of a plot: a key (faint) or a group of keys (bold), aligned with the layers."""

    label: str
    source_word: str
    target_word: str
    rates: list[float]
    n_scored: list[int]
    successes: list[int]
    present: list[bool]

    def rate_at(self, index: int) -> float | None:
        value = self.rates[index]
        return None if math.isnan(value) else value


@dataclass
class ExperimentRates:
    """Everything the report shows for one experiment."""

    name: str
    pairs: bool
    layers: list[int]
    keys: list[Line] = field(default_factory=list)
    groups: list[Line] = field(default_factory=list)


@dataclass(frozen=True)
class JudgeChoice:
    """The judge config a report reads, and how many the sweep has."""

    id: int | None
    description: str
    n_configs: int


def describe_judge_config(config: JudgeConfig) -> str:
    return (f"judge config #{config.id} ({config.backend}: {config.model}, "
            f"reasoning {config.reasoning}, templates {config.template_version})")


def choose_judge_config(session: Session, sweep: Sweep, requested: int | None) -> JudgeChoice:
    """The requested judge config, or the one with the most judgments in the sweep."""
    counts = session.execute(
        select(Judgment.judge_config_id, func.count())
        .join(Rollout, Rollout.id == Judgment.rollout_id)
        .join(Experiment, Experiment.id == Rollout.experiment_id)
        .where(Experiment.sweep_id == sweep.id)
        .group_by(Judgment.judge_config_id)
        .order_by(func.count().desc(), Judgment.judge_config_id)
    ).all()
    known = [int(jc) for jc, _ in counts]
    if requested is not None:
        if requested not in known:
            raise UnknownNameError(
                f"judge config {requested} has no judgments in sweep {sweep.name!r} "
                f"(configs with judgments: {', '.join(map(str, known)) or 'none'})"
            )
        chosen: int | None = requested
    else:
        chosen = known[0] if known else None
    if chosen is None:
        return JudgeChoice(None, "no judgments yet", 0)
    config = session.get(JudgeConfig, chosen)
    assert config is not None
    return JudgeChoice(chosen, describe_judge_config(config), len(known))


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def experiment_rates(
    session: Session,
    sweep: Sweep,
    config: SweepConfig,
    experiment_names: list[str],
    judge_config_id: int | None,
) -> list[ExperimentRates]:
    """Per experiment: the key lines and the bold group lines, over the sweep's layers."""
    params = {"jc": judge_config_id, "sweep": sweep.name, "experiments": experiment_names}
    key_rows = session.execute(
        text(KEY_RATES_SQL).bindparams(bindparam("experiments", expanding=True)), params
    ).all()
    group_rows = session.execute(
        text(GROUP_RATES_SQL).bindparams(bindparam("experiments", expanding=True)), params
    ).all()
    layers = sorted(set(config.layers) | {int(row.patch_layer) for row in key_rows})
    position = {layer: i for i, layer in enumerate(layers)}
    result: list[ExperimentRates] = []
    for name in experiment_names:
        exp = EXPERIMENTS[name]
        rank = {key: i for i, key in enumerate(
            experiment_keys(exp, config.positive_words, config.negative_words))}
        lines: dict[tuple[str, str], Line] = {}
        for row in key_rows:
            if row.experiment != name:
                continue
            key = (row.source_word, row.target_word)
            line = lines.get(key)
            if line is None:
                line = lines[key] = _empty_line(key_label(exp, *key), *key, n=len(layers))
            _fill(line, position[row.patch_layer], row.rate, row.n_scored,
                  None if row.rate is None else round(row.rate * row.n_scored))
        keys = sorted(lines, key=lambda k: (rank.get(k, len(rank)), k))
        groups: dict[str, Line] = {}
        for row in group_rows:
            if row.experiment != name:
                continue
            label = row.grp if exp.pairs else MEAN_LABEL
            line = groups.get(row.grp)
            if line is None:
                target = row.grp if exp.pairs else ""
                line = groups[row.grp] = _empty_line(label, "", target, n=len(layers))
            _fill(line, position[row.patch_layer], row.rate, row.n_scored, row.successes)
        targets = list(dict.fromkeys(lines[k].target_word for k in keys))
        ordered_groups = [groups[t] for t in targets if t in groups] if exp.pairs else list(
            groups.values())
        result.append(ExperimentRates(name, exp.pairs, layers, [lines[k] for k in keys],
                                      ordered_groups))
    return result


def _empty_line(label: str, source: str, target: str, n: int) -> Line:
    return Line(label, source, target, [math.nan] * n, [0] * n, [0] * n, [False] * n)


def _fill(line: Line, i: int, rate: float | None, n_scored: int | None,
          successes: float | None) -> None:
    line.rates[i] = _nan(rate)
    line.n_scored[i] = int(n_scored or 0)
    line.successes[i] = int(successes or 0)
    line.present[i] = True
