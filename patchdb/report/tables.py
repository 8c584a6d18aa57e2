"""The compact per-experiment table `patchdb report` prints: rate by layer per word."""

import math

from patchdb.report.aggregate import FALSE_POSITIVES, MEAN_LABEL, ExperimentRates, Line
from patchdb.report.bands import (
    DEFAULT_CI_METHOD,
    Band,
    Interval,
    baseline_interval,
    baseline_mean_interval,
    control_interval,
    legend_method,
    line_band,
)

GAP = "-"


def percent(value: float) -> str:
    """A rate as the rate tables print it: whole percent, GAP where nothing is scored."""
    return GAP if math.isnan(value) else f"{round(100 * value)}"


def best_and_worst(line: Line, layers: list[int]) -> tuple[int | None, int | None]:
    """The layers with the highest and lowest rate (lowest layer on ties); None if no rate."""
    scored = [(rate, layer) for rate, layer in zip(line.rates, layers, strict=True)
              if not math.isnan(rate)]
    if not scored:
        return None, None
    best = max(scored, key=lambda item: (item[0], -item[1]))[1]
    worst = min(scored, key=lambda item: (item[0], item[1]))[1]
    return best, worst


def _extreme(line: Line, layers: list[int], layer: int | None) -> str:
    if layer is None:
        return GAP
    return f"{layer} ({percent(line.rates[layers.index(layer)])}%)"


def unpatched(rates: ExperimentRates, row: Line) -> float:
    """A row's baseline: its target word's unpatched rate; the mean row's is the mean of its
    words' (NaN where none is scored)."""
    if row.label == MEAN_LABEL and not rates.pairs:
        scored = [b for b in (unpatched(rates, k) for k in rates.keys) if not math.isnan(b)]
        return sum(scored) / len(scored) if scored else math.nan
    baseline = rates.baselines.get(row.target_word)
    return baseline.rate if baseline is not None else math.nan


def control_line(rates: ExperimentRates, ci_method: str = DEFAULT_CI_METHOD) -> str | None:
    """The false-positive rate in words, or None without a scored control."""
    c = rates.control
    if c is None:
        return None
    band = control_interval(c, ci_method)
    what = ("False positives (no injection, no patch)" if rates.reference == FALSE_POSITIVES
            else f"Random vector (each target word's own direction at its norm, no patch; the "
                 f"mean over {band.n_words} word{'s' * (band.n_words != 1)})")
    return (f"{what}: {percent(c.rate)}% "
            f"({c.successes}/{c.n_scored}; 95% band {percent(band.lower)}-"
            f"{percent(band.upper)}%: {band.method})")


def row_baseline_band(rates: ExperimentRates, row: Line,
                      ci_method: str = DEFAULT_CI_METHOD) -> Interval | None:
    """The band of a bold row's unpatched rate: a pair line's target condition (one
    condition), or a single-word experiment's mean over its target conditions."""
    if not rates.pairs:
        return baseline_mean_interval(rates, ci_method)
    baseline = rates.baselines.get(row.target_word)
    return baseline_interval(baseline, ci_method) if baseline and baseline.n_scored else None


def experiment_table(rates: ExperimentRates, ci: bool = False,
                     ci_method: str = DEFAULT_CI_METHOD) -> str:
    """Rows: each target word (pairs: mean over sources) or each word plus the mean; then why
    rates are missing, if they are. With baselines, a "base" column gives each row's unpatched
    rate, and a last line the false-positive rate. With `ci`, each bold row is followed by the
    lower and upper ends of its 95% band (patchdb.report.bands), the method said below."""
    rows = rates.groups if rates.pairs else rates.keys + rates.groups
    what = "mean over source words" if rates.pairs else "per word"
    if not rows:
        return f"{rates.name}: {rates.missing or 'no rollouts yet'}"
    layers = rates.layers
    word_width = max(len("word"), *(len(r.label) for r in rows))
    cell = max(3, *(len(str(layer)) for layer in layers))
    base = [f"{'base':>4} |"] if rates.baselines else []
    header = " ".join([f"{'word':<{word_width}}", *base,
                       *(f"{layer:>{cell}}" for layer in layers), f" {'best':<10}", "worst"])
    lines = [f"{rates.name}: rate in % by patch layer ({what}; {GAP} = nothing scored)",
             header, "-" * len(header)]
    bands: list[Band] = []
    for row in rows:
        best, worst = best_and_worst(row, layers)
        base = [f"{percent(unpatched(rates, row)):>4} |"] if rates.baselines else []
        lines.append(" ".join([
            f"{row.label:<{word_width}}",
            *base,
            *(f"{percent(rate):>{cell}}" for rate in row.rates),
            f" {_extreme(row, layers, best):<10}",
            _extreme(row, layers, worst),
        ]))
        if ci and any(row is g for g in rates.groups):
            band = line_band(rates, row, ci_method)
            bands.append(band)
            base_band = row_baseline_band(rates, row, ci_method)
            for end, values in (("lower", band.lower), ("upper", band.upper)):
                ref = getattr(base_band, end) if base_band is not None else math.nan
                lines.append(" ".join([
                    f"{'  ' + end:<{word_width}}",
                    *([f"{percent(ref):>4} |"] if rates.baselines else []),
                    *(f"{percent(float(v)):>{cell}}" for v in values)]))
    if rates.baselines:
        lines.append("base: the same target condition with no patch")
    if bands:
        lines.append(f"lower, upper: the 95% band of the row above ({legend_method(bands)}; "
                     "docs/statistics.md)")
    control = control_line(rates, ci_method)
    if control is not None:
        lines.append(control)
    if rates.missing:
        lines.append(f"{missing_lead(rates)}: {rates.missing}")
    return "\n".join(lines)


def missing_lead(rates: ExperimentRates) -> str:
    """'No rates' when nothing is scored, else 'Not all scored'."""
    scored = any(n for line in rates.keys for n in line.n_scored)
    return "Not all scored" if scored else "No rates"
