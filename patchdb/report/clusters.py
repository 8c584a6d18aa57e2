"""Rates over words: the arrays every interval is computed from, and the word-level resampling.

The unit of replication is the word, not the sample: the samples of one key share its prompt,
concept vector, patch and target word, and a reader generalises over words. So an interval of a
mean of key rates is built from the spread between words (docs/statistics.md says why this one).

API (numpy only; everything is vectorised over the patch layers, the last axis):

- `WordRates`: one experiment's counts as arrays over (source word, target word, layer):
  `successes` and `n_scored` (S, T, L) integers, `rates` (NaN where nothing is scored), and
  each target's unpatched baseline (`baseline_successes`, `baseline_n`, shape (T,)). Single-word
  experiments have one axis of length 1 with the word "" (steered_to_unsteered: one target;
  unsteered_to_steered: one source). `word_rates(experiment_rates)` builds it from the report's
  lines (patchdb.report.aggregate), the SQL counts unchanged.
- `WordBand`: a mean and its 95% band per layer, the word count(s) and `method`, the words a
  legend prints ("Wilson-t over 8 words").
- `one_way_band(values, n_samples)`: the mean over words of `values` (W, L), NaN words left out,
  with the Wilson-t band: the words' variance of the mean s^2/W, turned into an effective
  sample size n_eff = p(1-p) / (s^2/W) (at most the samples behind the mean; where every word
  has the same rate, s = 0, those of one word: `no_spread_cap`), and the Wilson score interval
  at n_eff with the t quantile on W - 1 degrees of freedom in place of z.
- `two_way_band(values, n_samples)`: the mean over (S, T) cells of `values` (S, T, L) with both
  word sets random (crossed): Var = sigma_s^2/S + sigma_t^2/T + sigma_e^2/(ST) from the two-way
  ANOVA mean squares (Owen 2007), negative components set to 0, Satterthwaite degrees of
  freedom, then the same Wilson-t step. A layer whose table has a missing cell gets NaN.
- `two_way_variance(values)`: that variance and its degrees of freedom on their own.
- `wilson_t(estimate, variance, df, n_samples)`: the Wilson-t step on its own.
- `bootstrap_counts(n_sources, n_targets, draws, seed)`: a seeded two-way cluster bootstrap:
  per draw, how often each source word and each target word is drawn (both word sets resampled
  independently, with replacement); an axis of length 1 is always drawn once, so single-word
  experiments get the one-way word bootstrap. Apply the same draws to several arrays (e.g.
  rates and their differences to the baselines) to keep them paired.
- `resampled_means(values, counts)`: the mean of the key values (S, T, L) under each draw,
  (draws, L); a NaN cell is left out of its draw's mean, as the report's lines leave out
  unscored keys.
- `cluster_bootstrap(values, draws, seed)`: both steps at once.
- `t_quantile(p, df)`: Student's t quantile (no scipy here), df may be fractional.

Counts stay integers from SQL; nothing here rebuilds a count from a rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from patchdb.report.aggregate import ExperimentRates

Floats = NDArray[np.float64]
Ints = NDArray[np.int64]
LEVEL = 0.95
DRAWS = 2000
SEED = 0


@dataclass(frozen=True)
class WordRates:
    """One experiment's scored counts over (source word, target word, patch layer)."""

    experiment: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    successes: Ints  # (S, T, L)
    n_scored: Ints  # (S, T, L)
    baseline_successes: Ints  # (T,): each target condition unpatched
    baseline_n: Ints  # (T,)

    @property
    def rates(self) -> Floats:
        """Key rates (S, T, L); NaN where a key has no scored sample at a layer."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.n_scored > 0, self.successes / self.n_scored, np.nan)

    @property
    def baseline_rates(self) -> Floats:
        """Each target condition's unpatched rate (T,); NaN where none is scored."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.baseline_n > 0, self.baseline_successes / self.baseline_n,
                            np.nan)

    @property
    def pairs(self) -> bool:
        """Both sides are words (a single-word experiment has one side without steering)."""
        return self.sources != ("",) and self.targets != ("",)


def word_rates(rates: ExperimentRates) -> WordRates:
    """The report's key lines of one experiment as arrays over (source, target, layer)."""
    sources = tuple(dict.fromkeys(k.source_word for k in rates.keys)) or ("",)
    targets = tuple(dict.fromkeys(k.target_word for k in rates.keys)) or ("",)
    shape = (len(sources), len(targets), len(rates.layers))
    successes = np.zeros(shape, dtype=np.int64)
    n_scored = np.zeros(shape, dtype=np.int64)
    s_at = {w: i for i, w in enumerate(sources)}
    t_at = {w: i for i, w in enumerate(targets)}
    for key in rates.keys:
        s, t = s_at[key.source_word], t_at[key.target_word]
        successes[s, t] = key.successes
        n_scored[s, t] = key.n_scored
    base_k = np.zeros(len(targets), dtype=np.int64)
    base_n = np.zeros(len(targets), dtype=np.int64)
    for t, word in enumerate(targets):
        baseline = rates.baselines.get(word)
        if baseline is not None:
            base_k[t], base_n[t] = baseline.successes, baseline.n_scored
    return WordRates(rates.name, sources, targets, tuple(rates.layers), successes, n_scored,
                     base_k, base_n)


@dataclass(frozen=True)
class WordBand:
    """A mean per layer with its 95% band, and how the band was made."""

    estimate: Floats  # (L,)
    lower: Floats
    upper: Floats
    n_words: Ints  # (L,) words (one-way) or cells (two-way) behind each layer's mean
    method: str  # what a legend prints, e.g. "Wilson-t over 8 words"


@lru_cache(maxsize=512)
def _t_quantile(p: float, df: float) -> float:
    if df > 1e7:
        return _normal_quantile(p)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    log_scale = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
                 - 0.5 * math.log(df * math.pi))
    t = (lo + hi) / 2
    for _ in range(200):  # Newton's method, kept inside the bracket by bisection
        error = _t_cdf(t, df) - p
        if error < 0:
            lo = t
        else:
            hi = t
        density = math.exp(log_scale - (df + 1) / 2 * math.log1p(t * t / df))
        step = t - error / density
        t_next = step if lo < step < hi else (lo + hi) / 2
        if abs(t_next - t) <= 1e-13 * max(1.0, t) or hi - lo <= 1e-13 * max(1.0, t):
            return t_next
        t = t_next
    return t


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile for 0.5 < p < 1 and df > 0 (fractional df allowed)."""
    if not 0.5 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    return _t_quantile(float(p), float(df))


def _normal_quantile(p: float) -> float:
    lo, hi = 0.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(-mid / math.sqrt(2)) < p else (lo, mid)
    return (lo + hi) / 2


def _t_cdf(t: float, df: float) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t^2)."""
    return 1.0 - 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (continued fraction, Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 3e-16:
            break
    return h


def wilson_t(estimate: Floats, variance: Floats, df: Floats, n_samples: Floats,
             level: float = LEVEL) -> tuple[Floats, Floats]:
    """The Wilson score interval of a mean rate at its effective sample size
    n_eff = p(1-p)/variance (at most n_samples, the samples behind it; n_samples where the
    variance is 0), with the t quantile on df degrees of freedom for z. NaN where df < 1 or
    the estimate is NaN."""
    p = np.asarray(estimate, dtype=float)
    v = np.asarray(variance, dtype=float)
    dof = np.broadcast_to(np.asarray(df, dtype=float), p.shape)
    cap = np.broadcast_to(np.asarray(n_samples, dtype=float), p.shape)
    ok = np.isfinite(p) & np.isfinite(v) & (dof >= 1) & (cap > 0)
    z = np.array([t_quantile((1 + level) / 2, d) if good else np.nan
                  for d, good in zip(dof.ravel(), ok.ravel(), strict=True)]).reshape(p.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(v > 0, p * (1 - p) / v, cap)
        n = np.minimum(np.where(n > 0, n, cap), cap)
        z2 = z * z
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        lower = np.where(ok, np.clip(centre - half, 0.0, 1.0), np.nan)
        upper = np.where(ok, np.clip(centre + half, 0.0, 1.0), np.nan)
    return lower, upper


def one_way_band(values: Floats, n_samples: Floats | None = None, what: str = "words",
                 level: float = LEVEL) -> WordBand:
    """The mean over words (axis 0) of `values` (W, L) and its Wilson-t band on W - 1 df.
    `n_samples` (W, L): the scored samples of each word (caps n_eff; default: no cap)."""
    x = np.asarray(values, dtype=float)
    present = np.isfinite(x)
    w = present.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(w > 0, np.where(present, x, 0.0).sum(0) / w, np.nan)
        spread = np.where(present, (x - mean) ** 2, 0.0).sum(0) / (w - 1)
        variance = np.where(w > 1, spread / w, np.nan)
    cap = (np.where(present, np.asarray(n_samples, dtype=float), 0.0).sum(0)
           if n_samples is not None else np.full(mean.shape, np.inf))
    lower, upper = wilson_t(mean, variance, w - 1.0, no_spread_cap(cap, variance, w), level)
    banded = w[w >= 2]
    fewest = int(banded.min()) if banded.size else None
    return WordBand(mean, lower, upper, w.astype(np.int64),
                    band_method(int(w.max(initial=0)), what, fewest))


def no_spread_cap(cap: Floats, variance: Floats, words: Floats) -> Floats:
    """The cap on n_eff per layer: the samples behind the mean, except where the words show no
    spread (variance 0: every word at the same rate, as 8 words all at 0 of 64 are). There the
    spread between words cannot be estimated, and the samples behind the mean would give the
    band over samples that words replace; the band is then that of one word's samples (the
    samples behind the mean over the words): the mean of the words' rates is never above the
    highest of them, and each is known from its own samples only."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((variance == 0) & (words > 0), cap / np.maximum(words, 1), cap)


def band_method(n_words: int, what: str = "words", fewest: int | None = None) -> str:
    """The legend's words for a one-way band; 'n/a: 1 word' where there is no spread.
    `fewest`: the fewest words behind a band at any layer (where some layers have fewer words
    scored than `n_words`): 'Wilson-t over 3 to 4 words'."""
    if n_words < 2:
        return f"n/a: {n_words} {what.rstrip('s') if n_words == 1 else what}"
    if fewest is not None and 2 <= fewest < n_words:
        return f"Wilson-t over {fewest} to {n_words} {what}"
    return f"Wilson-t over {n_words} {what}"


def two_way_variance(values: Floats) -> tuple[Floats, Floats]:
    """The variance of the mean of a complete (S, T, L) table with crossed random sources and
    targets, and its Satterthwaite degrees of freedom, per layer (S, T >= 2): from the two-way
    ANOVA mean squares MS_s, MS_t, MS_e, Var = sigma_s^2/S + sigma_t^2/T + sigma_e^2/(ST) with
    sigma_s^2 = (MS_s - MS_e)/T and sigma_t^2 = (MS_t - MS_e)/S, a component estimated below 0
    set to 0 (Owen 2007)."""
    x = np.asarray(values, dtype=float)
    n_s, n_t = x.shape[0], x.shape[1]
    rows = x.mean(1)  # (S, L)
    cols = x.mean(0)  # (T, L)
    grand = x.mean((0, 1))
    ms_s = n_t * ((rows - grand) ** 2).sum(0) / (n_s - 1)
    ms_t = n_s * ((cols - grand) ** 2).sum(0) / (n_t - 1)
    resid = x - rows[:, None, :] - cols[None, :, :] + grand
    ms_e = (resid ** 2).sum((0, 1)) / ((n_s - 1) * (n_t - 1))
    cells = n_s * n_t
    keep_s = (ms_s > ms_e).astype(float)
    keep_t = (ms_t > ms_e).astype(float)
    # Var as a sum of mean squares: c_s MS_s + c_t MS_t + c_e MS_e
    c_s, c_t, c_e = keep_s / cells, keep_t / cells, (1.0 - keep_s - keep_t) / cells
    variance = c_s * ms_s + c_t * ms_t + c_e * ms_e
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = ((c_s * ms_s) ** 2 / (n_s - 1) + (c_t * ms_t) ** 2 / (n_t - 1)
                       + (c_e * ms_e) ** 2 / ((n_s - 1) * (n_t - 1)))
        df = np.where(denominator > 0, variance ** 2 / denominator, cells - 1.0)
    return variance, df


def two_way_band(values: Floats, n_samples: Floats | None = None,
                 level: float = LEVEL) -> WordBand:
    """The mean over (S, T) cells of `values` (S, T, L), both word sets random: the variance of
    `two_way_variance` and the Wilson-t step; NaN at a layer with a missing cell."""
    x = np.asarray(values, dtype=float)
    n_s, n_t = x.shape[0], x.shape[1]
    present = np.isfinite(x)
    complete = present.all(axis=(0, 1))
    count = present.sum((0, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(count > 0, np.where(present, x, 0.0).sum((0, 1)) / count, np.nan)
    if n_s < 2 or n_t < 2:
        nan = np.full(mean.shape, np.nan)
        return WordBand(mean, nan, nan.copy(), np.zeros(mean.shape, np.int64),
                        f"n/a: {n_s} sources x {n_t} targets")
    variance, df = two_way_variance(np.where(present, x, 0.0))
    cap = (np.where(present, np.asarray(n_samples, dtype=float), 0.0).sum((0, 1))
           if n_samples is not None else np.full(mean.shape, np.inf))
    lower, upper = wilson_t(np.where(complete, mean, np.nan), variance, df,
                            no_spread_cap(cap, variance, count), level)
    return WordBand(mean, lower, upper, np.where(complete, n_s * n_t, 0).astype(np.int64),
                    f"two-way over {n_s} sources x {n_t} targets")


def bootstrap_counts(n_sources: int, n_targets: int, draws: int = DRAWS,
                     seed: int = SEED) -> tuple[Ints, Ints]:
    """Per draw, how often each source and each target word is drawn: (draws, S), (draws, T).
    Both word sets are resampled independently with replacement (the two-way cluster, or
    pigeonhole, bootstrap); an axis of length 1 is drawn once every time."""
    rng = np.random.default_rng(seed)
    sources = rng.multinomial(n_sources, np.full(n_sources, 1.0 / n_sources), size=draws)
    targets = rng.multinomial(n_targets, np.full(n_targets, 1.0 / n_targets), size=draws)
    return sources.astype(np.int64), targets.astype(np.int64)


def resampled_means(values: Floats, counts: tuple[Ints, Ints]) -> Floats:
    """The mean of the cells of `values` (S, T, L) under each draw of `counts`: (draws, L).
    NaN cells are left out of a draw's mean; a draw with no present cell gives NaN."""
    x = np.asarray(values, dtype=float)
    present = np.isfinite(x).astype(float)
    sources, targets = (np.asarray(c, dtype=float) for c in counts)
    total = np.einsum("bs,stl,bt->bl", sources, np.where(present > 0, x, 0.0), targets)
    weight = np.einsum("bs,stl,bt->bl", sources, present, targets)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def cluster_bootstrap(values: Floats, draws: int = DRAWS, seed: int = SEED) -> Floats:
    """Seeded two-way cluster bootstrap of the mean of key values (S, T, L): (draws, L)."""
    x = np.asarray(values, dtype=float)
    return resampled_means(x, bootstrap_counts(x.shape[0], x.shape[1], draws, seed))
