"""Where the difference is decided: per patch layer, an experiment's rate minus the unpatched
baseline of the same target words, a simultaneous 95% band across the layers, and a
cluster-based permutation test over runs of contiguous layers (Maris & Oostenveld 2007).

The paired difference of a key at layer L is its rate minus its own target condition's
unpatched rate: rate(source, target, L) - baseline(target) in the pair experiments,
rate(word, L) - baseline(word) in unsteered_to_steered, and rate(word, L) minus the one
no-injection control in steered_to_unsteered (its target is unsteered for every word). The
experiment's difference at L is the mean over keys, as the bold lines average key rates.

The unit of replication is the word (patchdb.report.clusters). Which words replicate follows the
shape of `WordRates`: a side with one entry is not a factor.

- One word factor, each word with its own baseline (unsteered_to_steered): the per-layer
  statistic is the one-sample t over words; the null flips the sign of whole words (all layers
  of a word together). Under "no layer changes the rate" a word's differences are as likely
  negated, so this null is exact; with 2^W <= FLIPS every sign pattern is enumerated.
- One word factor and one shared baseline (steered_to_unsteered): as above, and the baseline's
  own sampling variance (binomial, at the Agresti-Coull rate, so 0 of 64 is not certainty) is
  added to each layer's variance, and to each null draw as one normal shift of all layers.
- Two crossed word factors (the pair experiments): no sign change of whole words leaves the
  null distribution of a crossed table unchanged (flipping a source negates its share of every
  target), so no exact flip test exists. The null flips the estimated source-word effects and
  target-word effects separately (the two-way ANOVA row and column deviations, all layers of a
  word together, each scaled by sqrt(k/(k-1)) for the degree of freedom the centring took):
  its variance is sigma_s^2/S + sigma_t^2/T + 2 sigma_e^2/(ST), the mean's own plus one
  interaction term, a little conservative. The statistic is the mean over Clark's min-F'
  standard error (the source words' and the target words' standard errors added in squares),
  which errs wide by the same term. docs/statistics.md gives the simulated rates, and those of
  flipping one word factor only (which over-flags).

Clusters are runs of layers whose statistic exceeds the two-sided 95% t threshold with one
sign, contiguous in the real layer numbers (layers 20 and 28 are two runs); a cluster's mass is
the sum of its statistics; its p-value is the share of null draws whose largest cluster mass
(either sign) reaches it. This controls the chance of flagging any layer when none differs; the
extent of a significant cluster is descriptive (Sassenhagen & Draschkow 2019), which is why the
report also names the layers where the simultaneous band excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
from numpy.typing import NDArray

from patchdb.report.clusters import WordRates, t_quantile
from patchdb.report.layer_runs import layer_runs

Floats = NDArray[np.float64]

ALPHA = 0.05
MIN_WORDS = 6  # with 5 words there are 32 sign patterns: the smallest two-sided p is 1/16
FLIPS = 4096  # null draws; every sign pattern when there are at most this many
SEED = 0


@dataclass(frozen=True)
class Cluster:
    """A run of contiguous layers above the threshold, with one sign."""

    layers: tuple[int, ...]
    sign: int  # +1: the patched rate above its baseline; -1: below
    mass: float  # the sum of |statistic| over the run
    p: float  # the share of null draws whose largest cluster mass reaches this one


@dataclass(frozen=True)
class LayerTest:
    """One experiment's differences to its baselines per patch layer, and where they differ."""

    layers: tuple[int, ...]
    difference: Floats  # (L,) mean paired difference; NaN where a key or baseline is missing
    lower: Floats  # (L,) simultaneous 95% band (max-t over the word-level cluster bootstrap)
    upper: Floats
    statistic: Floats  # (L,) the difference over its standard error over words
    threshold: float  # the cluster-forming threshold on |statistic|
    clusters: tuple[Cluster, ...]
    design: str  # "8 words", "8 words, one shared baseline", "10 sources x 8 targets"
    draws: int  # null draws behind the p-values
    exact: bool  # every sign pattern was enumerated
    why_not: str = ""  # why nothing was tested ("n/a: 3 words; ..."), else ""
    alpha: float = ALPHA

    @property
    def flagged(self) -> tuple[int, ...]:
        """The layers that differ: those in a cluster with p <= alpha (the plots shade them).
        This is the test whose chance of flagging any layer under the null is alpha."""
        return tuple(sorted({la for c in self.clusters if c.p <= self.alpha for la in c.layers}))

    @property
    def band_layers(self) -> tuple[int, ...]:
        """Layers where the simultaneous band excludes 0 (its own alpha over all layers)."""
        with np.errstate(invalid="ignore"):
            away = (self.lower > 0) | (self.upper < 0)
        return tuple(la for la, out in zip(self.layers, away, strict=True) if out)


def paired_differences(words: WordRates) -> Floats:
    """Each key's rate minus its target condition's unpatched rate: (S, T, L), NaN where
    either is missing."""
    return words.rates - words.baseline_rates[None, :, None]


def runs(layers: tuple[int, ...] | list[int]) -> list[list[int]]:
    """Layers split into runs of consecutive layer numbers: [20, 28] -> [[20], [28]] (the runs
    the plots join: layer_runs)."""
    ordered = sorted(layers)
    return [[ordered[i] for i in run] for run in layer_runs(ordered)]


def span(layers: tuple[int, ...] | list[int]) -> str:
    """Layers as a reader writes them: '43-46', '20, 28', '40-42, 50'."""
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs(layers))


# The per-layer statistic --------------------------------------------------------------------

def mean_and_variance(x: Floats, shared_var: float = 0.0) -> tuple[Floats, Floats]:
    """The mean over the (S, T) cells of x (..., S, T, L) and the variance of that mean over
    words: s^2/W (plus `shared_var`) where a side has one entry; with two word factors the
    squared standard error of the source words' means plus that of the target words' means
    (Clark's min F': each holds the interaction once, so it errs wide, never narrow)."""
    n_s, n_t = x.shape[-3], x.shape[-2]
    if n_s == 1 or n_t == 1:
        w = x.reshape(*x.shape[:-3], n_s * n_t, x.shape[-1])
        return w.mean(-2), w.var(-2, ddof=1) / (n_s * n_t) + shared_var
    return _two_way(x.mean(-2), x.mean(-3))


def _two_way(rows: Floats, cols: Floats) -> tuple[Floats, Floats]:
    """Mean and min-F' variance from the source words' means (..., S, L) and the target
    words' means (..., T, L) of a complete table."""
    n_s, n_t = rows.shape[-2], cols.shape[-2]
    grand = rows.mean(-2)
    variance = (((rows - grand[..., None, :]) ** 2).sum(-2) / (n_s * (n_s - 1))
                + ((cols - grand[..., None, :]) ** 2).sum(-2) / (n_t * (n_t - 1)))
    return grand, variance


def _t(mean: Floats, variance: Floats) -> Floats:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(variance > 0, mean / np.sqrt(variance),
                        np.where(mean == 0, 0.0, np.sign(mean) * np.inf))


def _null_statistic(x: Floats, shared_var: float, flips: int, seed: int,
                    centre: bool = False) -> tuple[Floats, bool]:
    """The statistic (draws, L) of sign-flipped versions of the complete table x (module
    docstring), and whether the draws are every sign pattern. One word factor: whole words
    flipped about 0 (the test's null) or about their mean with `centre` (the band's draws);
    two word factors: the source and the target effects, always about the mean."""
    n_s, n_t = x.shape[0], x.shape[1]
    rng = np.random.default_rng(seed)
    if n_s == 1 or n_t == 1:
        n = n_s * n_t
        words = x.reshape(n, -1)
        if centre:
            words = (words - words.mean(0)) * math.sqrt(n / (n - 1))
        exact = 2 ** n <= flips and shared_var == 0
        signs = (np.array(list(product((1.0, -1.0), repeat=n))) if 2 ** n <= flips
                 else rng.choice((1.0, -1.0), size=(flips, n)))
        drawn = signs[:, :, None] * words[None]
        mean, variance = drawn.mean(1), drawn.var(1, ddof=1) / n + shared_var
        if shared_var > 0:  # one baseline shifts every word and layer together
            mean = mean + rng.standard_normal((len(signs), 1)) * math.sqrt(shared_var)
        return _t(mean, variance), exact
    grand = x.mean((0, 1))
    source = (x.mean(1) - grand) * math.sqrt(n_s / (n_s - 1))  # (S, L)
    target = (x.mean(0) - grand) * math.sqrt(n_t / (n_t - 1))  # (T, L)
    s_part = rng.choice((1.0, -1.0), size=(flips, n_s, 1)) * source
    t_part = rng.choice((1.0, -1.0), size=(flips, n_t, 1)) * target
    rows = s_part + t_part.mean(1, keepdims=True)  # each source word's mean over targets
    cols = t_part + s_part.mean(1, keepdims=True)
    return _t(*_two_way(rows, cols)), False


def largest_cluster_mass(stat: Floats, layers: tuple[int, ...], threshold: float) -> Floats:
    """The largest cluster mass of each row of stat (draws, L), either sign: runs of layers
    beyond +-threshold, contiguous in the layer numbers; NaN breaks a run."""
    stat = np.atleast_2d(stat)
    best = np.zeros(stat.shape[0])
    up = np.zeros(stat.shape[0])
    down = np.zeros(stat.shape[0])
    for i, layer in enumerate(layers):
        if i and layer != layers[i - 1] + 1:
            up[:] = 0.0
            down[:] = 0.0
        s = stat[:, i]
        with np.errstate(invalid="ignore"):
            up = np.where(s > threshold, up + s, 0.0)
            down = np.where(s < -threshold, down - s, 0.0)
        best = np.maximum(best, np.maximum(up, down))
    return best


def find_clusters(stat: Floats, layers: tuple[int, ...], threshold: float) -> list[Cluster]:
    """The observed clusters (p left at NaN): runs beyond +-threshold, one sign each."""
    found: list[Cluster] = []
    current: list[int] = []
    mass, sign = 0.0, 0
    for i, layer in enumerate(layers):
        s = stat[i]
        here = 1 if s > threshold else -1 if s < -threshold else 0
        joined = here != 0 and here == sign and i and layer == layers[i - 1] + 1
        if current and not joined:
            found.append(Cluster(tuple(current), sign, mass, math.nan))
            current, mass, sign = [], 0.0, 0
        if here:
            current.append(layer)
            mass += abs(float(s))
            sign = here
    if current:
        found.append(Cluster(tuple(current), sign, mass, math.nan))
    return found


def decide_layers(d: Floats, layers: tuple[int, ...], shared_var: float = 0.0, *,
                  flips: int = FLIPS, seed: int = SEED, alpha: float = ALPHA,
                  design: str = "") -> LayerTest:
    """The cluster permutation test and the max-t band on differences d (S, T, L) whose
    words all have a value at every tested layer; a layer with a NaN cell is not tested."""
    n_s, n_t = d.shape[0], d.shape[1]
    tested = np.isfinite(d).all((0, 1))
    x = np.where(tested, np.nan_to_num(d), np.nan)
    df = n_s * n_t - 1 if n_s == 1 or n_t == 1 else min(n_s, n_t) - 1
    threshold = t_quantile(1 - alpha / 2, df)
    mean, variance = mean_and_variance(x, shared_var)
    stat = _t(mean, variance)
    filled = np.nan_to_num(x)

    null, exact = _null_statistic(filled, shared_var, flips, seed)
    null[:, ~tested] = np.nan
    null_max = largest_cluster_mass(null, layers, threshold)
    b = len(null_max)

    def p_of(mass: float) -> float:
        reached = int((null_max >= mass - 1e-9).sum())
        return reached / b if exact else (reached + 1) / (b + 1)

    clusters = tuple(Cluster(c.layers, c.sign, c.mass, p_of(c.mass))
                     for c in find_clusters(stat, layers, threshold))

    # The band: the same flips about the mean (a wild cluster bootstrap), max-t over layers.
    centred, _ = _null_statistic(filled, shared_var, flips, seed + 1, centre=True)
    spread = np.abs(centred)[:, tested]
    critical = float(np.quantile(spread.max(1), 1 - alpha)) if tested.any() else math.nan
    half = critical * np.sqrt(variance)
    return LayerTest(tuple(layers), mean, mean - half, mean + half, stat, threshold, clusters,
                     design, b, exact, "", alpha)


def layer_test(words: WordRates, *, flips: int = FLIPS, seed: int = SEED,
               alpha: float = ALPHA) -> LayerTest:
    """Where one experiment's rate differs from its unpatched baselines (module docstring).
    Words without a baseline or without any scored rate are left out; a layer where a
    remaining key is unscored is not tested (and breaks a run of contiguous layers)."""
    d = paired_differences(words)
    keep_s = np.isfinite(d).any((1, 2))
    keep_t = np.isfinite(d).any((0, 2))
    d = d[keep_s][:, keep_t]
    n_s, n_t = int(keep_s.sum()), int(keep_t.sum())
    layers = tuple(words.layers)
    shared_var = 0.0
    if n_s >= 2 and n_t == 1:  # one baseline serves every word
        k = float(words.baseline_successes[keep_t][0])
        n = float(words.baseline_n[keep_t][0]) + 4
        shared_var = (k + 2) / n * (1 - (k + 2) / n) / n
    if n_s == 1 or n_t == 1:
        count = n_s * n_t
        design = f"{count} word{'' if count == 1 else 's'}" + (
            ", one shared baseline" if shared_var else "")
        short = count < MIN_WORDS
    else:
        design = f"{n_s} sources x {n_t} targets"
        short = min(n_s, n_t) < MIN_WORDS
    why = ""
    if n_s == 0 or n_t == 0:
        why = "n/a: no word has both a scored rate and a scored unpatched baseline"
    elif short:
        why = (f"n/a: {design}; a sign-flip test needs at least {MIN_WORDS} words a side to "
               f"reach p < {alpha:g}")
    elif not np.isfinite(d).all((0, 1)).any():
        why = "n/a: no patch layer has every key and its baseline scored"
    if why:
        mean = (np.nanmean(d, (0, 1)) if d.size and np.isfinite(d).any()
                else np.full(len(layers), np.nan))
        nan = np.full(len(layers), np.nan)
        return LayerTest(layers, np.where(np.isfinite(d).all((0, 1)), mean, np.nan), nan,
                         nan.copy(), nan.copy(), math.nan, (), design, 0, False, why, alpha)
    return decide_layers(d, layers, shared_var, flips=flips, seed=seed, alpha=alpha,
                         design=design)
