"""`report --json`: `rates.json`, the rates the plots draw with their 95% bands, one row each.

    {"format": "patchdb-rates/1", "level": 0.95, "ci_method": "words", "net": false,
     "corrected": false, "rows": [row, ...]}

A row is one point of a plot: a bold line at one patch layer (`kind` "line"), a target
condition's unpatched rate ("baseline"), the no-injection control ("control", once per sweep),
or, in a single-word experiment with several target conditions, the mean of their baselines that
the table prints ("baseline_mean"). Each row has `sweep`, `judge_config_id`, `experiment`,
`kind`, `line` (the legend's label), `target_word`, `layer` (null for baselines and the
control), `rate`, `lower`, `upper`, `method`, `n_samples`, and its word counts: `n_words` in a
single-word experiment, `n_sources` and `n_targets` in a pair experiment (the control: no word,
`n_words` 0). With `--net`, lines and baselines also carry `net_rate`, `net_lower`, `net_upper`
and `net_method`; with `--corrected`, lines carry `corrected_rate`, `corrected_lower`,
`corrected_upper` and `corrected_method`. A number that is not defined (nothing scored, a band
over one word) is null. docs/schema.md documents every field.
"""

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from patchdb.experiments import NO_STEERING, NO_STEERING_LABEL
from patchdb.report.aggregate import FALSE_POSITIVES, ExperimentRates
from patchdb.report.bands import (
    Interval,
    baseline_interval,
    baseline_mean_interval,
    control_interval,
    line_band,
    net_line_band,
)
from patchdb.report.baselines import CONTROL_EXPERIMENT, newcombe, require_control
from patchdb.report.clusters import LEVEL

RATES_FILE = "rates.json"
FORMAT = "patchdb-rates/1"


class CorrectedPoint(Protocol):
    """What a corrected rate at one layer gives (patchdb.report.corrected's Band has it)."""

    @property
    def estimate(self) -> float: ...

    @property
    def lower(self) -> float: ...

    @property
    def upper(self) -> float: ...


# experiment -> (method, per bold line in the order of ExperimentRates.groups, per layer)
Corrected = dict[str, tuple[str, Sequence[Sequence[CorrectedPoint]]]]


def _number(value: Any) -> float | None:
    x = float(value)
    return None if math.isnan(x) else x


def _counts(rates: ExperimentRates, n_words: int, n_targets: int = 1) -> dict[str, int]:
    if rates.pairs:
        return {"n_sources": n_words, "n_targets": n_targets}
    return {"n_words": n_words}


def _interval_fields(interval: Interval) -> dict[str, Any]:
    return {"rate": _number(interval.estimate), "lower": _number(interval.lower),
            "upper": _number(interval.upper), "method": interval.method,
            "n_samples": interval.n_samples}


def experiment_rows(rates: ExperimentRates, ci_method: str, net: bool = False,
                    corrected: tuple[str, Sequence[Sequence[CorrectedPoint]]] | None = None
                    ) -> list[dict[str, Any]]:
    """The rows of one experiment: its bold lines per layer, then its baselines."""
    rows: list[dict[str, Any]] = []
    control = require_control(rates.control) if net else rates.control
    for g, group in enumerate(rates.groups):
        band = line_band(rates, group, ci_method)
        net_band = net_line_band(rates, group, control, ci_method) \
            if net and control is not None else None
        for i, layer in enumerate(rates.layers):
            row: dict[str, Any] = {
                "experiment": rates.name, "kind": "line", "line": group.label,
                "target_word": group.target_word, "layer": layer,
                "rate": _number(band.estimate[i]), "lower": _number(band.lower[i]),
                "upper": _number(band.upper[i]), "method": band.method,
                "n_samples": band.n_samples[i], **_counts(rates, band.n_words[i])}
            if net_band is not None:
                row.update(net_rate=_number(net_band.estimate[i]),
                           net_lower=_number(net_band.lower[i]),
                           net_upper=_number(net_band.upper[i]), net_method=net_band.method)
            if corrected is not None:
                method, points = corrected
                point = points[g][i]
                row.update(corrected_rate=_number(point.estimate),
                           corrected_lower=_number(point.lower),
                           corrected_upper=_number(point.upper), corrected_method=method)
            rows.append(row)
    for target, baseline in rates.baselines.items():
        if target == NO_STEERING or not baseline.n_scored:
            continue  # the unsteered target's baseline is the control: its own row
        interval = baseline_interval(baseline, ci_method)
        row = {"experiment": rates.name, "kind": "baseline", "line": target,
               "target_word": target, "layer": None, **_interval_fields(interval),
               **(_counts(rates, 0) if rates.pairs else _counts(rates, 1))}
        if net and control is not None:
            c = control_interval(control, ci_method)
            lower, upper = newcombe(interval.estimate, interval.lower, interval.upper,
                                    c.estimate, c.lower, c.upper)
            row.update(net_rate=_number(interval.estimate - c.estimate),
                       net_lower=_number(lower), net_upper=_number(upper),
                       net_method=f"{interval.method} minus {rates.reference} (Newcombe)")
        rows.append(row)
    mean = baseline_mean_interval(rates, ci_method)
    if mean is not None and mean.n_words > 1:
        rows.append({"experiment": rates.name, "kind": "baseline_mean",
                     "line": "Mean", "target_word": "", "layer": None,
                     **_interval_fields(mean), **_counts(rates, mean.n_words)})
    return rows


def control_row(rates: Iterable[ExperimentRates], ci_method: str) -> dict[str, Any] | None:
    """The no-injection control's row (one per sweep), if any experiment has it scored."""
    for r in rates:
        if r.control is not None and r.reference == FALSE_POSITIVES:
            return {"experiment": CONTROL_EXPERIMENT, "kind": "control",
                    "line": NO_STEERING_LABEL, "target_word": NO_STEERING, "layer": None,
                    **_interval_fields(control_interval(r.control, ci_method)), "n_words": 0}
    return None


def sweep_rows(sweep: str, judge_config_id: int | None, rates: list[ExperimentRates],
               ci_method: str, net: bool = False,
               corrected: Corrected | None = None) -> list[dict[str, Any]]:
    """Every row of one sweep under one judge config, the control's last."""
    rows = []
    for r in rates:
        rows += experiment_rows(r, ci_method, net, (corrected or {}).get(r.name))
    control = control_row(rates, ci_method)
    if control is not None:
        rows.append(control)
    return [{"sweep": sweep, "judge_config_id": judge_config_id, **row} for row in rows]


def write_rates_json(out_dir: Path, rows: list[dict[str, Any]], ci_method: str,
                     net: bool = False, corrected: bool = False) -> Path:
    """Write `<out_dir>/rates.json` (atomically) and return its path."""
    document = {"format": FORMAT, "level": LEVEL, "ci_method": ci_method, "net": net,
                "corrected": corrected, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RATES_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=1, allow_nan=False, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    os.replace(partial, path)
    return path
