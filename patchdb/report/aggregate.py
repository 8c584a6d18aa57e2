"""Rates per key and layer, read through the store's `layer_rates` view.

All counting over judgments happens in SQL, in one pass over the view. Python only arranges
its few thousand (key, layer, judge config) rows into lines for the plot, the table and the
export, and averages key rates into the bold lines (a mean of at most a few dozen numbers).
"""

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, bindparam, select, text
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.errors import UnknownNameError
from patchdb.experiments import EXPERIMENTS, experiment_keys, key_label
from patchdb.store.models import Experiment, JudgeConfig, Sweep

# Every rate of the sweep, for every judge config (NULL: rollouts no config has judged yet).
# This is the one pass over the judgments; everything after it works on these few rows.
RATES_SQL = """
SELECT experiment, patch_layer, source_word, target_word, judge_config_id, n, n_scored, rate
FROM layer_rates
WHERE sweep = :sweep AND experiment IN :experiments
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


def _choice(session: Session, sweep: Sweep, scored: dict[int, int],
            requested: int | None) -> JudgeChoice:
    """The requested judge config, else the one that judged the most samples of the sweep."""
    known = sorted(scored, key=lambda jc: (-scored[jc], jc))
    if requested is not None:
        if requested not in scored:
            raise UnknownNameError(
                f"judge config {requested} has no judgments in sweep {sweep.name!r} "
                f"(configs with judgments: {', '.join(map(str, sorted(known))) or 'none'})"
            )
        chosen: int | None = requested
    else:
        chosen = known[0] if known else None
    if chosen is None:
        return JudgeChoice(None, "no judgments yet", 0)
    config = session.get(JudgeConfig, chosen)
    assert config is not None
    return JudgeChoice(chosen, describe_judge_config(config), len(known))


def _rate_rows(session: Session, sweep: Sweep, experiment_names: list[str]) -> list[Row[Any]]:
    return list(session.execute(
        text(RATES_SQL).bindparams(bindparam("experiments", expanding=True)),
        {"sweep": sweep.name, "experiments": experiment_names},
    ))


def _samples_judged(rows: list[Row[Any]]) -> dict[int, int]:
    judged: dict[int, int] = {}
    for row in rows:
        if row.judge_config_id is not None:
            judged[row.judge_config_id] = judged.get(row.judge_config_id, 0) + row.n
    return judged


def sweep_rates(
    session: Session,
    sweep: Sweep,
    config: SweepConfig,
    experiment_names: list[str],
    judge_config_id: int | None = None,
) -> tuple[JudgeChoice, list[ExperimentRates]]:
    """Choose the judge config and arrange every rate, from one pass over `layer_rates`."""
    rows = _rate_rows(session, sweep, experiment_names)
    judge = _choice(session, sweep, _samples_judged(rows), judge_config_id)
    return judge, _arrange(rows, config, experiment_names, judge.id)


def choose_judge_config(session: Session, sweep: Sweep, requested: int | None) -> JudgeChoice:
    """The requested judge config, or the one that judged the most samples of the sweep."""
    names = list(session.scalars(select(Experiment.name).where(Experiment.sweep_id == sweep.id)))
    return _choice(session, sweep, _samples_judged(_rate_rows(session, sweep, names)), requested)


def experiment_rates(
    session: Session,
    sweep: Sweep,
    config: SweepConfig,
    experiment_names: list[str],
    judge_config_id: int | None,
) -> list[ExperimentRates]:
    """Per experiment: the key lines and the bold group lines, for one judge config."""
    return _arrange(_rate_rows(session, sweep, experiment_names), config, experiment_names,
                    judge_config_id)


def _arrange(rows: list[Row[Any]], config: SweepConfig, experiment_names: list[str],
             judge_config_id: int | None) -> list[ExperimentRates]:
    layers = sorted(set(config.layers) | {int(row.patch_layer) for row in rows})
    position = {layer: i for i, layer in enumerate(layers)}
    result: list[ExperimentRates] = []
    for name in experiment_names:
        exp = EXPERIMENTS[name]
        rank = {key: i for i, key in enumerate(
            experiment_keys(exp, config.positive_words, config.negative_words))}
        lines: dict[tuple[str, str], Line] = {}
        for row in rows:
            if row.experiment != name:
                continue
            key = (row.source_word, row.target_word)
            line = lines.get(key)
            if line is None:
                line = lines[key] = _empty_line(key_label(exp, *key), *key, n=len(layers))
            i = position[row.patch_layer]
            line.present[i] = True
            if judge_config_id is not None and row.judge_config_id == judge_config_id:
                line.rates[i] = _nan(row.rate)
                line.n_scored[i] = int(row.n_scored)
                line.successes[i] = round((row.rate or 0.0) * row.n_scored)
        keys = [lines[k] for k in sorted(lines, key=lambda k: (rank.get(k, len(rank)), k))]
        if exp.pairs:
            targets = list(dict.fromkeys(line.target_word for line in keys))
            groups = [_group(t, "", t, [k for k in keys if k.target_word == t], len(layers))
                      for t in targets]
        else:
            groups = [_group(MEAN_LABEL, "", "", keys, len(layers))] if keys else []
        result.append(ExperimentRates(name, exp.pairs, layers, keys, groups))
    return result


def _group(label: str, source: str, target: str, members: list[Line], n: int) -> Line:
    """A bold line: the mean of its keys' rates where any is scored; counts pooled."""
    line = _empty_line(label, source, target, n)
    for i in range(n):
        scored = [m.rates[i] for m in members if not math.isnan(m.rates[i])]
        line.rates[i] = sum(scored) / len(scored) if scored else math.nan
        line.n_scored[i] = sum(m.n_scored[i] for m in members)
        line.successes[i] = sum(m.successes[i] for m in members)
        line.present[i] = any(m.present[i] for m in members)
    return line


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _empty_line(label: str, source: str, target: str, n: int) -> Line:
    return Line(label, source, target, [math.nan] * n, [0] * n, [0] * n, [False] * n)
