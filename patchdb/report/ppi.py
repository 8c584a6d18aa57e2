"""Prediction-powered correction (PPI++) of the bold lines, per patch layer, with bands over
words that carry the labels' own uncertainty (docs/statistics.md, "Corrected rates").

The plan's strata. `patchdb label` picks answers by hash order within (experiment, patch layer,
the judge's verdict of the detection grader) and the coherence label follows on the same
rollout, so the hand-labeled scores are a fair sample within each such stratum and nowhere else.
Everything below is computed per (experiment, layer) cell from its two strata: verdict NO, where
the judged score is 0 throughout, and verdict YES, where it is the coherence verdict.

The estimate. A key's corrected rate is the mean over its scored samples of: the true score
where the rollout is labeled, else lambda * judged score + r_h, where r_h is the mean of
(true - lambda * judged) over the labels of the sample's stratum h. In a NO stratum the judged
score is constant, so r_h is the stratum's share of true scores and lambda plays no part; in a
YES stratum lambda weighs the coherence verdict. For a whole cell this is stratified PPI++ with
the labeled rollouts counted as themselves, unbiased for any fixed lambda. A bold line is the
mean of its keys' corrected rates, as the raw line is the mean of its keys' rates; a pair
experiment's line (one target word) borrows r_h from its whole cell.

Lambda. PPI++'s power tuning: the lambda minimising the variance of the cells' estimates,
sum c g Cov(true, judged)/n / sum c g^2 Var(judged) (1/n + 1/U) over the YES strata (c the
squared share of the stratum in its cell, g = U/N its unlabeled share, U its unlabeled rollouts),
clipped to [0, 1]. One lambda per detection grader, from every layer's labels: any fixed lambda
keeps every layer's estimate unbiased, so pooling its estimate assumes nothing about how the
judge errs at any layer (per stratum, from a handful of labels, it would be noise). Where no
stratum can tune it, lambda is 1 (plain PPI).

The band. A seeded two-way cluster bootstrap over words (patchdb.report.clusters) in which each
word takes its rollouts and its labels along: every draw recomputes r_h from the labels of the
drawn words and the line from the drawn keys, so the band holds both the spread between words
and the labels' own sampling. Its variance (times K/(K-1) for K words) goes through the same
Wilson-t step as the report's other bands, on K - 1 degrees of freedom. A layer has no
corrected rate where a stratum with unlabeled rollouts has no label. Its band is n/a where such
a stratum has fewer than 10 labels (in simulations the band covered 73% of truths with 3 labels
a stratum, 91% with 5, 94% with 10, 95% with 40: with few labels, resampling words cannot see
how lumpy they are), where fewer than 2 words are scored, or where more than 5% of draws lose
every label of a stratum the line needs (labels in too few words).
"""

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from patchdb.report.clusters import DRAWS, SEED, bootstrap_counts, wilson_t

Floats = NDArray[np.float64]
Ints = NDArray[np.int64]
NO, YES = 0, 1  # the judge's detection verdict: the last axis of every count array
MAX_UNDEFINED = 0.05  # draws that lost a needed stratum's labels, above which the band is n/a
MIN_LABELS = 10  # labels of a verdict stratum at a cell below which its band is n/a


@dataclass(frozen=True)
class StrataCounts:
    """One experiment's scored rollouts over (source, target, layer, detection verdict)."""

    experiment: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    n: Ints  # (S, T, L, 2) scored rollouts
    judged: Ints  # of those, judged scores YES (0 in the NO stratum)
    labeled: Ints  # of those, rollouts with a hand-labeled score (both graders labeled)
    labeled_true: Ints  # labeled, true score YES
    labeled_judged: Ints  # labeled, judged YES
    labeled_both: Ints  # labeled, judged YES and true YES

    @property
    def pairs(self) -> bool:
        """A line per target word (pairs) or one mean line (single-word experiments)."""
        return self.sources != ("",) and self.targets != ("",)

    @property
    def raw_rates(self) -> Floats:
        """The judge's key rates (S, T, L), NaN where nothing is scored: what the raw line
        averages."""
        n = self.n.sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, self.judged.sum(-1) / n, np.nan)


def empty_counts(experiment: str, sources: tuple[str, ...], targets: tuple[str, ...],
                 layers: tuple[int, ...]) -> StrataCounts:
    """Zero counts on the given axes (filled in by the store's reader or a simulation)."""
    shape = (len(sources), len(targets), len(layers), 2)
    return StrataCounts(experiment, sources, targets, layers,
                        *(np.zeros(shape, dtype=np.int64) for _ in range(6)))


def power_tuning(cells: list[StrataCounts]) -> float:
    """PPI++'s lambda for a detection grader, from the YES strata of every cell (see above)."""
    top = bottom = 0.0
    for c in cells:
        big_n = c.n.sum((0, 1))[:, YES].astype(float)  # (L,)
        total = c.n.sum((0, 1, 3)).astype(float)
        n = c.labeled.sum((0, 1))[:, YES].astype(float)
        f_all = c.judged.sum((0, 1))[:, YES]
        f_lab = c.labeled_judged.sum((0, 1))[:, YES]
        y_lab = c.labeled_true.sum((0, 1))[:, YES]
        both = c.labeled_both.sum((0, 1))[:, YES]
        unlabeled = big_n - n
        ok = (n >= 2) & (unlabeled >= 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = big_n / total
            g = unlabeled / big_n
            cov = (both - f_lab * y_lab / n) / (n - 1)
            var = (f_all / big_n) * (1 - f_all / big_n)
            top += float(np.where(ok, share**2 * g * cov / n, 0.0).sum())
            bottom += float(np.where(ok, share**2 * g**2 * var * (1 / n + 1 / unlabeled),
                                     0.0).sum())
    if not bottom > 0:
        return 1.0
    return float(np.clip(top / bottom, 0.0, 1.0))


@dataclass(frozen=True)
class LineBands:
    """One bold line's corrected rate per layer, its band, and how the band was made."""

    label: str
    estimate: Floats  # (L,) NaN where the correction is n/a
    lower: Floats
    upper: Floats
    variance: Floats  # the bootstrap variance the band is drawn at (times K/(K-1))
    words: Ints  # K: the words resampled for this line at each layer
    reasons: tuple[str, ...]  # per layer: "" or why it is n/a


def line_weights(sources: Ints, targets: Ints, pairs: bool) -> Floats:
    """Per draw, each line's weight on each key: (draws, lines, S, T). A pair experiment's line
    is one target word (its sources resampled); a single-word experiment has one line over every
    key (the one word axis resampled)."""
    s = sources.astype(float)
    t = targets.astype(float)
    if pairs:
        eye = np.eye(t.shape[1])
        return s[:, None, :, None] * eye[None, :, None, :]
    return (s[:, :, None] * t[:, None, :])[:, None]


def line_means(values: Floats, sources: Ints, targets: Ints, pairs: bool) -> Floats:
    """Each line's mean of the key values (S, T, L) under each draw of word counts:
    (draws, lines, L); NaN keys are left out, as the raw lines leave out unscored keys."""
    x = np.asarray(values, dtype=float)
    present = np.isfinite(x)
    w = line_weights(sources, targets, pairs)
    total = np.einsum("bjst,stl->bjl", w, np.where(present, x, 0.0))
    weight = np.einsum("bjst,stl->bjl", w, present.astype(float))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weight > 0, total / weight, np.nan)


def _residuals(c: StrataCounts, lam: float, sources: Floats, targets: Floats) -> Floats:
    """r_h per draw, layer and stratum: the labels' mean of (true - lambda * judged), each label
    weighted by how often its words are drawn; NaN where a stratum keeps no label."""
    resid = c.labeled_true - lam * c.labeled_judged
    num = np.einsum("bs,stlh,bt->blh", sources, resid, targets)
    den = np.einsum("bs,stlh,bt->blh", sources, c.labeled.astype(float), targets)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _line_means(c: StrataCounts, lam: float, sources: Ints, targets: Ints) -> Floats:
    """Each line's corrected rate under each draw of word counts: (draws, lines, L)."""
    n_key = c.n.sum(-1).astype(float)  # (S, T, L)
    present = n_key > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        # known part of a key's rate: its labeled truths and lambda x its unlabeled judged scores
        known = np.where(present, (c.labeled_true.sum(-1) + lam * (
            c.judged - c.labeled_judged).sum(-1)) / n_key, 0.0)
        # the share of a key's samples that take r_h: its unlabeled rollouts in stratum h
        share = np.where(present[..., None], (c.n - c.labeled) / n_key[..., None], 0.0)
    r = _residuals(c, lam, sources.astype(float), targets.astype(float))  # (b, L, 2)
    w = line_weights(sources, targets, c.pairs)  # (b, J, S, T)
    weight = np.einsum("bjst,stl->bjl", w, present.astype(float))
    base = np.einsum("bjst,stl->bjl", w, known)
    need = np.einsum("bjst,stlh->bjlh", w, share)
    lost = ((need > 0) & np.isnan(r)[:, None]).any(-1)
    total = base + np.einsum("bjlh,blh->bjl", need, np.nan_to_num(r))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((weight > 0) & ~lost, total / weight, np.nan)


def line_words(c: StrataCounts) -> Ints:
    """K per line and layer: the scored words a line's band resamples, (lines, L)."""
    present = c.n.sum(-1) > 0  # (S, T, L)
    if c.pairs:
        return present.sum(0).astype(np.int64)  # sources per target
    return present.sum((0, 1))[None].astype(np.int64)


def ppi_lines(c: StrataCounts, lam: float, labels: list[str], draws: int = DRAWS,
              seed: int = SEED) -> list[LineBands]:
    """The corrected bold lines of one experiment (one per target word for pairs, else one),
    with their bands (see the module's docstring)."""
    n_s, n_t = len(c.sources), len(c.targets)
    estimate = _line_means(c, lam, np.ones((1, n_s), np.int64), np.ones((1, n_t), np.int64))[0]
    drawn = _line_means(c, lam, *bootstrap_counts(n_s, n_t, draws, seed))
    return bands_of(c, estimate, drawn, labels, _reasons(c, lam))


def _reasons(c: StrataCounts, lam: float) -> Floats:
    """Per line and layer: 2 where a stratum the line needs (one with unlabeled rollouts) has
    no label, 1 where it has fewer than MIN_LABELS, else 0."""
    ones_s, ones_t = np.ones((1, len(c.sources))), np.ones((1, len(c.targets)))
    labels = c.labeled.sum((0, 1))  # (L, 2)
    w = line_weights(ones_s.astype(np.int64), ones_t.astype(np.int64), c.pairs)[0]
    unlabeled = np.einsum("jst,stlh->jlh", w, (c.n - c.labeled).astype(float)) > 0
    none = (unlabeled & (labels == 0)[None]).any(-1)
    few = (unlabeled & (labels < MIN_LABELS)[None]).any(-1)
    return np.where(none, 2.0, np.where(few, 1.0, 0.0))


def bands_of(c: StrataCounts, estimate: Floats, drawn: Floats, labels: list[str],
             unlabeled: Floats) -> list[LineBands]:
    """Bands from a line estimate (lines, L) and its bootstrap draws (draws, lines, L): the
    draws' variance times K/(K-1), through the Wilson-t step on K - 1 df."""
    words = line_words(c)
    samples = np.einsum("jst,stl->jl", line_weights(
        np.ones((1, len(c.sources)), np.int64), np.ones((1, len(c.targets)), np.int64),
        c.pairs)[0], c.n.sum(-1).astype(float))
    out = []
    for j, label in enumerate(labels):
        lost = np.isnan(drawn[:, j]).mean(0)
        k = words[j].astype(float)
        variance = _variance(drawn[:, j]) * k / np.where(k > 1, k - 1, np.nan)
        reasons = tuple(_reason(int(k[i]), lost[i], unlabeled[j, i], estimate[j, i])
                        for i in range(len(c.layers)))
        ok = np.array([not r for r in reasons])
        point = np.clip(estimate[j], 0.0, 1.0)
        lower, upper = wilson_t(np.where(ok, point, np.nan), np.where(ok, variance, np.nan),
                                k - 1, samples[j])
        out.append(LineBands(label, point, lower, upper, variance, words[j], reasons))
    return out


def _variance(draws: Floats) -> Floats:
    """The variance over draws (axis 0) of the defined draws; NaN with fewer than 2."""
    ok = np.isfinite(draws)
    count = ok.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(ok, draws, 0.0).sum(0) / count
        spread = np.where(ok, (draws - mean) ** 2, 0.0).sum(0)
        return np.where(count > 1, spread / (count - 1), np.nan)


def _reason(words: int, lost: float, unlabeled: float, estimate: float) -> str:
    if words == 0:
        return "n/a: nothing scored"
    if unlabeled == 2:
        return "n/a: a verdict stratum has no labeled score"
    if unlabeled == 1:
        return f"n/a: under {MIN_LABELS} labels in a verdict stratum"
    if words < 2:
        return "n/a: 1 word"
    if lost > MAX_UNDEFINED:
        return "n/a: labels in too few words"
    return "" if np.isfinite(estimate) else "n/a: nothing scored"
