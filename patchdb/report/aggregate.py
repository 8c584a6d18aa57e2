"""Rates per key and layer, counted in SQL over the store's `sample_scores` view.

All counting over judgments happens in SQL, in one pass over the view: per key, layer and judge
config the samples, the scored samples and the successes (integers, never rebuilt from a rate).
Python only arranges its few thousand rows into lines for the plot, the table and the export,
and averages key rates into the bold lines (a mean of at most a few dozen numbers).
"""

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.experiments import EXPERIMENTS, experiment_keys, key_label
from patchdb.report.baselines import Baseline, control_of, read_baselines
from patchdb.report.missing import missing_reasons
from patchdb.report.stats import effective_n
from patchdb.store.judge_choice import JudgeChoice, choose_judge_config, describe_judge_config
from patchdb.store.models import Sweep

__all__ = ["ExperimentRates", "JudgeChoice", "Line", "choose_judge_config",
           "describe_judge_config", "experiment_rates", "sweep_rates"]

# Every rate of the sweep, for every judge config (NULL: rollouts no config has judged yet).
# This is the one pass over the judgments; everything after it works on these few rows: the
# judge-config choice adds up their scored samples (every experiment and layer of the sweep, as
# the rule counts them), the rates take the asked experiments' patch layers. Patch layer -1
# holds the baselines (patchdb.report.baselines reads them from their own view), -2 the
# random-vector control (control_rates): neither is a patch layer.
RATES_SQL = """
SELECT experiment, patch_layer, source_word, target_word, judge_config_id,
       COUNT(*) AS n, COUNT(score) AS n_scored, SUM(score) AS successes
FROM sample_scores
WHERE sweep = :sweep
GROUP BY experiment, patch_layer, source_word, target_word, judge_config_id
"""

MEAN_LABEL = "Mean"
FALSE_POSITIVES = "false positives"


@dataclass
class Line:
    """One line of a plot: a key (faint) or a group of keys (bold), aligned with the layers.

    A key's successes and n_scored come from SQL; its n_effective is n_scored. A group's rate is
    the mean of its keys' rates, its counts are pooled, and its n_effective is the sample size
    its band is drawn at (see patchdb.report.stats).
    """

    label: str
    source_word: str
    target_word: str
    rates: list[float]
    n_scored: list[int]
    successes: list[int]
    present: list[bool]
    n_effective: list[float]

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
    missing: str = ""  # why rates are missing, with numbers and the command that fills them
    baselines: dict[str, Baseline] = field(default_factory=dict)  # by target word, unpatched
    control: Baseline | None = None  # the no-injection control: the false-positive rate
    # what --net subtracts: the control's false positives, or (report --against random_vector)
    # the random-vector control's rate, which then stands in `control`
    reference: str = FALSE_POSITIVES


def _rate_rows(session: Session, sweep: Sweep) -> list[Row[Any]]:
    """RATES_SQL's rows: every experiment and layer of the sweep."""
    return list(session.execute(text(RATES_SQL), {"sweep": sweep.name}))


def sweep_rates(
    session: Session,
    sweep: Sweep,
    config: SweepConfig,
    experiment_names: list[str],
    judge_config_id: int | None = None,
) -> tuple[JudgeChoice, list[ExperimentRates]]:
    """Choose the judge config and arrange every rate, from one pass over `sample_scores`."""
    rows = _rate_rows(session, sweep)
    judge = choose_judge_config(session, sweep, judge_config_id,
                                ((row.judge_config_id, row.n_scored) for row in rows))
    return judge, _experiment_rates(session, sweep, config, experiment_names, judge.id, rows)


def experiment_rates(
    session: Session,
    sweep: Sweep,
    config: SweepConfig,
    experiment_names: list[str],
    judge_config_id: int | None,
) -> list[ExperimentRates]:
    """Per experiment: the key lines, the bold group lines and why rates are missing, for one
    judge config."""
    return _experiment_rates(session, sweep, config, experiment_names, judge_config_id,
                             _rate_rows(session, sweep))


def _experiment_rates(session: Session, sweep: Sweep, config: SweepConfig,
                      experiment_names: list[str], judge_config_id: int | None,
                      rows: list[Row[Any]]) -> list[ExperimentRates]:
    asked = set(experiment_names)
    result = _arrange([row for row in rows if row.experiment in asked and row.patch_layer >= 0],
                      config, experiment_names, judge_config_id)
    reasons = missing_reasons(session, sweep, config, experiment_names, judge_config_id)
    baselines = read_baselines(session, sweep.name, judge_config_id)
    for rates in result:
        rates.missing = reasons.get(rates.name, "")
        rates.baselines = baselines.get(rates.name, {})
        rates.control = control_of(baselines)
    return result


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
                line.n_scored[i] = int(row.n_scored)
                line.successes[i] = int(row.successes or 0)
                line.n_effective[i] = float(row.n_scored)
                if row.n_scored:
                    line.rates[i] = line.successes[i] / line.n_scored[i]
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
    """A bold line: the mean of its keys' rates where any is scored; counts pooled; the
    effective sample size of that mean for its band."""
    line = _empty_line(label, source, target, n)
    for i in range(n):
        scored = [m.rates[i] for m in members if not math.isnan(m.rates[i])]
        line.rates[i] = sum(scored) / len(scored) if scored else math.nan
        line.n_effective[i] = effective_n([m.n_scored[i] for m in members])
        line.n_scored[i] = sum(m.n_scored[i] for m in members)
        line.successes[i] = sum(m.successes[i] for m in members)
        line.present[i] = any(m.present[i] for m in members)
    return line


def _empty_line(label: str, source: str, target: str, n: int) -> Line:
    return Line(label, source, target, [math.nan] * n, [0] * n, [0] * n, [False] * n,
                [0.0] * n)
