"""The 95% bands the report draws and prints, over words (the default) or over samples.

`--ci-method words` (docs/statistics.md): a bold line is a mean over words, and its band comes
from the spread between those words (patchdb.report.clusters: the Wilson-t band). A single-word
experiment's mean line is a mean over its words; a pair experiment's line for one target word
is a mean over its source words (the target is fixed, the sources are the random factor). The
mean of the unpatched baselines is a mean over target conditions, banded the same way.

The no-injection control and each word's own baseline are one condition each: there is no word
to resample, so their bands stay Wilson intervals over their samples, and say so. A net rate
(a line minus the false-positive rate) gets Newcombe's combination of the two bands (the line's
over words, the control's over samples), as the two are independent.

`--ci-method samples` keeps the earlier bands, which treat every sample as an independent draw
(patchdb.report.stats): kept for comparison only, they are far too narrow for a claim about
words.
"""

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from patchdb.choices import CI_METHODS, DEFAULT_CI_METHOD  # there for the CLI's --help
from patchdb.report.aggregate import ExperimentRates, Line
from patchdb.report.baselines import Baseline, WordsReference, newcombe
from patchdb.report.clusters import band_method, one_way_band
from patchdb.report.stats import effective_n, mean_rate_band, wilson_interval

SAMPLES_METHOD = "Wilson over samples"
ONE_CONDITION = "Wilson over its samples, one condition"
NET_SUFFIX = " minus false positives (Newcombe)"
Floats = NDArray[np.float64]


@dataclass(frozen=True)
class Band:
    """A line's value and 95% band per patch layer, with the counts behind each point."""

    estimate: Floats
    lower: Floats
    upper: Floats
    method: str  # what the legend and the JSON name, e.g. "Wilson-t over 8 words"
    n_samples: list[int]
    n_words: list[int]  # words (single-word) or source words (a pair line) behind each point
    word_axis: str  # "words" or "sources"


@dataclass(frozen=True)
class Interval:
    """One rate (a baseline, the control, a mean of baselines) with its 95% band."""

    estimate: float
    lower: float
    upper: float
    method: str
    n_samples: int
    n_words: int  # target conditions behind it (1 for one condition)


def check_method(method: str) -> str:
    if method not in CI_METHODS:
        raise ValueError(f"ci method must be one of {CI_METHODS}, got {method!r}")
    return method


def members(rates: ExperimentRates, group: Line) -> list[Line]:
    """The keys a bold line averages: one target word's pairs, or every word."""
    if rates.pairs:
        return [k for k in rates.keys if k.target_word == group.target_word]
    return list(rates.keys)


def line_band(rates: ExperimentRates, group: Line, method: str = DEFAULT_CI_METHOD) -> Band:
    """The band of a bold line (the mean of its keys' rates) at every layer."""
    keys = members(rates, group)
    axis = "sources" if rates.pairs else "words"
    n_samples = list(group.n_scored)
    if check_method(method) == "samples":
        lower, upper = mean_rate_band(group.rates, group.n_effective)
        words = [sum(1 for k in keys if k.n_scored[i]) for i in range(len(rates.layers))]
        return Band(np.asarray(group.rates, dtype=float), lower, upper, SAMPLES_METHOD,
                    n_samples, words, axis)
    values = np.array([k.rates for k in keys], dtype=float).reshape(len(keys), -1)
    counts = np.array([k.n_scored for k in keys], dtype=float).reshape(len(keys), -1)
    band = one_way_band(values, counts, axis)
    return Band(np.asarray(group.rates, dtype=float), band.lower, band.upper, band.method,
                n_samples, [int(w) for w in band.n_words], axis)


def net_line_band(rates: ExperimentRates, group: Line, control: Baseline,
                  method: str = DEFAULT_CI_METHOD) -> Band:
    """A bold line minus the false-positive rate, with the band of that difference."""
    band = line_band(rates, group, method)
    c = control_interval(control, method)
    lower, upper = newcombe(band.estimate, band.lower, band.upper, c.estimate, c.lower, c.upper)
    suffix = NET_SUFFIX.replace("false positives", rates.reference)
    return Band(band.estimate - c.estimate, lower, upper, band.method + suffix,
                band.n_samples, band.n_words, band.word_axis)


def control_interval(control: Baseline, method: str = DEFAULT_CI_METHOD) -> Interval:
    """The false-positive rate: one condition, so a Wilson band over its samples."""
    return baseline_interval(control, method)


def baseline_interval(baseline: Baseline, method: str = DEFAULT_CI_METHOD) -> Interval:
    """One target condition's unpatched rate with its Wilson band over its samples; a
    reference over several words (WordsReference), banded over those words."""
    if isinstance(baseline, WordsReference) and len(baseline.word_rates) > 1:
        return words_interval(list(baseline.word_rates), list(baseline.word_samples), method)
    lower, upper = baseline.interval()
    what = ONE_CONDITION if check_method(method) == "words" else SAMPLES_METHOD
    return Interval(baseline.rate, lower, upper, what, baseline.n_scored, 1)


def baseline_mean_interval(rates: ExperimentRates,
                           method: str = DEFAULT_CI_METHOD) -> Interval | None:
    """The mean row's baseline in a single-word experiment: the mean of its target conditions'
    unpatched rates, banded over those conditions (one condition: over its samples)."""
    if rates.pairs:
        return None
    targets = dict.fromkeys(k.target_word for k in rates.keys)
    scored = [b for t in targets if (b := rates.baselines.get(t)) is not None and b.n_scored]
    if not scored:
        return None
    if len(scored) == 1:
        return baseline_interval(scored[0], method)
    return words_interval([b.rate for b in scored], [b.n_scored for b in scored], method)


def words_interval(word_rates: list[float], word_samples: list[int],
                   method: str = DEFAULT_CI_METHOD) -> Interval:
    """The unweighted mean of several words' rates, banded over the words (Wilson-t), or with
    `--ci-method samples` by Wilson at their effective number of samples."""
    mean = sum(word_rates) / len(word_rates)
    n_samples = sum(word_samples)
    if check_method(method) == "samples":
        n_eff = effective_n(word_samples)
        lower, upper = wilson_interval(mean * n_eff, n_eff)
        return Interval(mean, float(lower), float(upper), SAMPLES_METHOD, n_samples,
                        len(word_rates))
    band = one_way_band(np.array([[r] for r in word_rates]),
                        np.array([[n] for n in word_samples], dtype=float))
    return Interval(mean, float(band.lower[0]), float(band.upper[0]), band.method, n_samples,
                    len(word_rates))


def legend_method(bands: list[Band]) -> str:
    """The methods of a plot's bands in one legend entry (one method, or each distinct one)."""
    methods = list(dict.fromkeys(b.method for b in bands))
    return "; ".join(methods) if methods else band_method(0)


def drawn(band: Band) -> bool:
    """Whether a band has any layer to draw (not NaN everywhere, e.g. with one word)."""
    return bool(np.isfinite(band.lower).any())


def percent_range(lower: float, upper: float) -> str:
    """'17-83' in whole percent, or 'n/a' where the band is undefined."""
    if math.isnan(lower) or math.isnan(upper):
        return "n/a"
    return f"{round(100 * lower)}-{round(100 * upper)}"
