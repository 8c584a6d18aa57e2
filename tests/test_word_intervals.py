"""Intervals over words (patchdb.report.clusters and patchdb.report.bands): the arithmetic
against hand computations and known constants, then simulated sweeps with a known truth.

The simulations draw each word's rate from a Beta (the population of words), then each key's
rate at each layer around its word's (a per-key latent rate, so the samples of a key are
correlated), then 64 samples per key. The truth is the population mean, which the band of a
mean over words claims to cover at 95%. The bands the report draws must cover it in at least
93% of 200 simulated sweeps; the Wilson bands over samples must not.
"""

import math

import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss

from patchdb.report.aggregate import ExperimentRates, Line
from patchdb.report.bands import (
    SAMPLES_METHOD,
    baseline_interval,
    baseline_mean_interval,
    line_band,
    net_line_band,
)
from patchdb.report.baselines import Baseline, WordsReference
from patchdb.report.clusters import (
    bootstrap_counts,
    cluster_bootstrap,
    one_way_band,
    resampled_means,
    t_quantile,
    two_way_band,
    two_way_variance,
    wilson_t,
)

T_975_7 = 2.364624251592785  # Student's t, 97.5% quantile, 7 degrees of freedom (tables)
SAMPLES = 64
LAYERS = 21
SWEEPS = 200
KAPPA = 20.0  # how far a key's rate strays from its word's: Beta(KAPPA p, KAPPA (1 - p))
SEED = 2024


def wilson_by_formula(p: float, n: float, z: float) -> tuple[float, float]:
    """The Wilson score interval of a rate p at sample size n, written out again."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# -- the arithmetic --------------------------------------------------------------------------

@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.975, 1, math.tan(math.pi * 0.475)),  # df 1: the Cauchy quantile, in closed form
    (0.975, 2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),  # df 2: (2p - 1) / sqrt(2p(1 - p))
    (0.975, 7, T_975_7),
    (0.975, 9, 2.262157162740992),
    (0.975, 30, 2.042272456301238),
    (0.995, 7, 3.499483297350162),
    (0.975, 1e9, 1.959963984540054),
])
def test_t_quantile_matches_known_values(p: float, df: float, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, rel=1e-9)


def test_t_quantile_between_whole_degrees_of_freedom() -> None:
    assert t_quantile(0.975, 3) < t_quantile(0.975, 2.5) < t_quantile(0.975, 2)
    with pytest.raises(ValueError):
        t_quantile(0.975, 0)


def test_eight_words_half_yes_half_no_is_the_issues_store() -> None:
    """Eight words, 64 samples each, every sample of a word sharing its verdict: four all YES,
    four all NO. Over samples the band is 0.50 +/- 0.04; over words the mean of 8 rates with
    variance s^2/8 = (2/7)/8 = 1/28 is worth n_eff = 0.25 * 28 = 7 samples, banded with t on
    7 df: 0.50 +/- 0.33."""
    rates = np.array([[1.0]] * 4 + [[0.0]] * 4)
    band = one_way_band(rates, np.full((8, 1), 64.0))
    expected = wilson_by_formula(0.5, 7, T_975_7)
    assert (band.lower[0], band.upper[0]) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx((0.1668, 0.8332), abs=5e-5)
    assert band.method == "Wilson-t over 8 words"
    assert wilson_by_formula(0.5, 512, 1.959963984540054) == pytest.approx((0.4569, 0.5431),
                                                                           abs=1e-4)


def test_one_word_has_no_band_and_says_why() -> None:
    band = one_way_band(np.array([[0.5, 0.25]]), np.array([[64.0, 64.0]]))
    assert np.isnan(band.lower).all() and np.isnan(band.upper).all()
    assert list(band.estimate) == [0.5, 0.25]
    assert band.method == "n/a: 1 word"


def test_unscored_words_are_left_out() -> None:
    """Layer 1 has one of three words unscored: its band is over the two others."""
    x = np.array([[0.2, 0.2], [0.6, np.nan], [0.4, 0.6]])
    band = one_way_band(x, np.full(x.shape, 10.0))
    assert list(band.n_words) == [3, 2]
    assert band.estimate[1] == pytest.approx(0.4)
    s2 = ((0.2 - 0.4) ** 2 + (0.6 - 0.4) ** 2) / 1  # the two words' sample variance
    n_eff = min(0.4 * 0.6 / (s2 / 2), 20.0)
    assert (band.lower[1], band.upper[1]) == pytest.approx(
        wilson_by_formula(0.4, n_eff, 12.706204736174707), abs=1e-9)


def test_words_that_agree_get_one_words_band() -> None:
    """No spread between words (8 words all at 0 of 64): the spread cannot be estimated, so the
    band is one word's samples' (64), not the pooled 512 samples', with an upper bound above 0;
    with a spread, the cap stays every sample behind the mean."""
    band = one_way_band(np.zeros((8, 2)), np.full((8, 2), 64.0))
    assert (band.lower[0], band.upper[0]) == pytest.approx(wilson_by_formula(0.0, 64, T_975_7))
    assert band.upper[0] > 0.07  # over 512 samples it was 0.011
    ones = np.ones((8, 1))
    assert one_way_band(ones, np.full((8, 1), 64.0)).lower[0] == pytest.approx(
        wilson_by_formula(1.0, 64, T_975_7)[0])
    lower, upper = wilson_t(np.array([0.5]), np.array([1e-6]), np.array([7.0]),
                            np.array([512.0]))
    assert (lower[0], upper[0]) == pytest.approx(wilson_by_formula(0.5, 512, T_975_7))


def test_rates_piled_at_zero_are_covered_more_often_than_over_pooled_samples() -> None:
    """Words from Beta(0.2, 9.8) (mean 0.02: most words never detect, a few sometimes): in
    about one sweep of nine all 8 words score 0 of 64. Banding those over the pooled samples
    (upper 0.011) misses the truth every time; one word's band (upper 0.08) holds it."""
    rng = np.random.default_rng(SEED + 7)
    truth, hits, pooled = 0.02, [], []
    for _ in range(SWEEPS):
        k = key_successes(rng, rng.beta(0.2, 9.8, 8))[:, :3]
        x = k / SAMPLES
        band = one_way_band(x, np.full(x.shape, float(SAMPLES)))
        hits.append(covered(band.lower, band.upper, truth))
        v = x.var(0, ddof=1) / 8
        old = wilson_t(x.mean(0), v, np.full(3, 7.0), np.full(3, 8.0 * SAMPLES))
        pooled.append(covered(*old, truth))
    assert np.mean(hits) >= 0.85, np.mean(hits)
    assert np.mean(pooled) < np.mean(hits) - 0.05, (np.mean(pooled), np.mean(hits))


def test_two_way_variance_by_hand() -> None:
    """A 3 x 2 table worked through the ANOVA by hand: both components kept."""
    x = [[0.1, 0.4], [0.5, 0.7], [0.9, 0.95]]
    s, t = 3, 2
    grand = sum(map(sum, x)) / 6
    rows = [sum(r) / t for r in x]
    cols = [sum(x[i][j] for i in range(s)) / s for j in range(t)]
    ms_s = t * sum((r - grand) ** 2 for r in rows) / (s - 1)
    ms_t = s * sum((c - grand) ** 2 for c in cols) / (t - 1)
    ms_e = sum((x[i][j] - rows[i] - cols[j] + grand) ** 2
               for i in range(s) for j in range(t)) / ((s - 1) * (t - 1))
    assert ms_s > ms_e and ms_t > ms_e
    var = (ms_s + ms_t - ms_e) / 6
    df = var ** 2 / ((ms_s / 6) ** 2 / 2 + (ms_t / 6) ** 2 / 1 + (ms_e / 6) ** 2 / 2)
    variance, dof = two_way_variance(np.array(x)[:, :, None])
    assert variance[0] == pytest.approx(var) and dof[0] == pytest.approx(df)


def test_two_way_variance_drops_a_negative_component() -> None:
    """Rows identical up to noise: MS_s < MS_e, so sigma_s^2 is 0 and Var = MS_t / (ST)."""
    x = np.array([[0.2, 0.6], [0.3, 0.5], [0.25, 0.55]])
    grand = x.mean()
    ms_t = 3 * ((x.mean(0) - grand) ** 2).sum() / 1
    variance, dof = two_way_variance(x[:, :, None])
    assert variance[0] == pytest.approx(ms_t / 6)
    assert dof[0] == pytest.approx(1.0)  # all of it from MS_t, on T - 1 = 1 df


def test_two_way_band_needs_a_complete_table() -> None:
    x = np.array([[[0.1, 0.1]], [[0.4, np.nan]]]).repeat(2, axis=1)  # (2, 2, 2)
    band = two_way_band(x, np.full(x.shape, 8.0))
    assert np.isfinite(band.lower[0]) and math.isnan(band.lower[1])
    assert band.method == "two-way over 2 sources x 2 targets"


def test_bootstrap_is_seeded_and_resamples_both_word_sets() -> None:
    sources, targets = bootstrap_counts(10, 8, draws=500, seed=3)
    again = bootstrap_counts(10, 8, draws=500, seed=3)
    assert (sources == again[0]).all() and (targets == again[1]).all()
    assert (sources.sum(1) == 10).all() and (targets.sum(1) == 8).all()
    assert (sources == 0).any() and (targets == 0).any()  # words left out of some draws
    single, one = bootstrap_counts(8, 1, draws=50)
    assert (one == 1).all()  # a single-word experiment: the one-way word bootstrap


def test_resampled_means_by_hand() -> None:
    """Draw: source 0 twice, source 1 never; target 1 twice. With cell (0, 1) unscored the
    draw has no cell: NaN; with it scored, its value."""
    x = np.array([[[0.1], [0.7]], [[0.3], [0.5]]])
    counts = (np.array([[2, 0], [1, 1]]), np.array([[0, 2], [1, 1]]))
    means = resampled_means(x, counts)
    assert means[:, 0] == pytest.approx([0.7, (0.1 + 0.7 + 0.3 + 0.5) / 4])
    x[0, 1, 0] = np.nan
    means = resampled_means(x, counts)
    assert math.isnan(means[0, 0]) and means[1, 0] == pytest.approx((0.1 + 0.3 + 0.5) / 3)


def test_pigeonhole_bootstrap_spread_follows_both_word_sets() -> None:
    """Key rates = source effect + target effect: the bootstrap's spread of the mean matches
    the variance of a mean of S resampled rows plus T resampled columns."""
    a = np.linspace(-0.2, 0.2, 10)
    b = np.linspace(-0.1, 0.1, 8)
    x = (0.5 + a[:, None] + b[None, :])[:, :, None]
    draws = cluster_bootstrap(x, draws=20000, seed=1)[:, 0]
    expected = a.var() / 10 + b.var() / 8  # each resampled mean: population var / count
    assert draws.var() == pytest.approx(expected, rel=0.05)


# -- simulated sweeps ------------------------------------------------------------------------

def _line(label: str, source: str, target: str, k: np.ndarray, n: np.ndarray) -> Line:
    rates = [float(a / b) if b else math.nan for a, b in zip(k, n, strict=True)]
    return Line(label, source, target, rates, [int(v) for v in n], [int(v) for v in k],
                [True] * len(k), [float(v) for v in n])


def _group(label: str, target: str, keys: list[Line]) -> Line:
    rates = np.nanmean(np.array([key.rates for key in keys]), axis=0)
    n = np.sum([key.n_scored for key in keys], axis=0)
    k = np.sum([key.successes for key in keys], axis=0)
    group = _line(label, "", target, k, n)
    group.rates = [float(r) for r in rates]
    group.n_effective = [len(keys) ** 2 / sum(1 / key.n_scored[i] for key in keys)
                         for i in range(len(rates))]
    return group


def single_word_sweep(successes: np.ndarray) -> ExperimentRates:
    """unsteered_to_steered with words w0.. and successes (W, L) of SAMPLES each."""
    n = np.full(successes.shape[1], SAMPLES)
    keys = [_line(f"w{i}", "", f"w{i}", k, n) for i, k in enumerate(successes)]
    return ExperimentRates("unsteered_to_steered", False, list(range(successes.shape[1])), keys,
                           [_group("Mean", "", keys)])


def pair_sweep(successes: np.ndarray) -> ExperimentRates:
    """failure_to_success with successes (S, T, L) of SAMPLES each."""
    n = np.full(successes.shape[2], SAMPLES)
    keys = [_line(f"s{i}_to_t{j}", f"s{i}", f"t{j}", successes[i, j], n)
            for i in range(successes.shape[0]) for j in range(successes.shape[1])]
    groups = [_group(f"t{j}", f"t{j}", [k for k in keys if k.target_word == f"t{j}"])
              for j in range(successes.shape[1])]
    return ExperimentRates("failure_to_success", True, list(range(successes.shape[2])), keys,
                           groups)


def key_successes(rng: np.random.Generator, word_rates: np.ndarray) -> np.ndarray:
    """Per key and layer a latent rate around its word's, then SAMPLES draws at that rate."""
    p = np.repeat(word_rates[..., None], LAYERS, axis=-1)
    latent = rng.beta(KAPPA * p + 1e-9, KAPPA * (1 - p) + 1e-9)
    return rng.binomial(SAMPLES, latent)


def covered(lower: np.ndarray, upper: np.ndarray, truth: float | np.ndarray) -> np.ndarray:
    return (np.asarray(lower) <= truth) & (truth <= np.asarray(upper))


@pytest.mark.parametrize("a, b", [(1.0, 3.0), (2.0, 2.0)])
def test_single_word_mean_line_covers_the_word_mean(a: float, b: float) -> None:
    """8 words drawn from Beta(a, b): the mean line's band covers a / (a + b)."""
    rng = np.random.default_rng(SEED)
    truth = a / (a + b)
    words, samples = [], []
    for _ in range(SWEEPS):
        rates = single_word_sweep(key_successes(rng, rng.beta(a, b, 8)))
        words.append(covered(*_ends(line_band(rates, rates.groups[0])), truth))
        samples.append(covered(*_ends(line_band(rates, rates.groups[0], "samples")), truth))
    by_sweep = np.array(words)  # (sweeps, layers)
    assert by_sweep.mean() >= 0.93, by_sweep.mean()
    assert by_sweep.mean(0).min() >= 0.90  # no layer far off
    assert np.array(samples).mean() < 0.75  # over samples: far below 95%


def _ends(band: object) -> tuple[np.ndarray, np.ndarray]:
    return band.lower, band.upper  # type: ignore[attr-defined]


def test_pair_lines_per_target_cover_each_targets_mean_over_sources() -> None:
    """10 sources x 8 targets: each target has its own mean m_t over the population of source
    words, and its line (the mean over 10 sources) is banded over those sources."""
    rng = np.random.default_rng(SEED + 1)
    words, samples = [], []
    for _ in range(SWEEPS):
        m = rng.beta(2.0, 4.0, 8)  # each target's mean over sources
        p = rng.beta(6.0 * m, 6.0 * (1 - m), (10, 8))  # source x target rates around it
        rates = pair_sweep(key_successes(rng, p))
        for j, group in enumerate(rates.groups):
            words.append(covered(*_ends(line_band(rates, group)), m[j]))
            samples.append(covered(*_ends(line_band(rates, group, "samples")), m[j]))
    assert np.mean(words) >= 0.93, np.mean(words)
    assert np.mean(samples) < 0.75
    assert line_band(rates, rates.groups[0]).method == "Wilson-t over 10 sources"


def test_net_line_covers_the_word_mean_minus_the_false_positive_rate() -> None:
    """The mean over 8 words minus a control scored 64 times at a true rate of 0.1."""
    rng = np.random.default_rng(SEED + 2)
    truth = 0.25 - 0.1
    words, samples = [], []
    for _ in range(SWEEPS):
        rates = single_word_sweep(key_successes(rng, rng.beta(1.0, 3.0, 8)))
        control = Baseline("steered_to_unsteered", "", SAMPLES, SAMPLES,
                           int(rng.binomial(SAMPLES, 0.1)))
        words.append(covered(*_ends(net_line_band(rates, rates.groups[0], control)), truth))
        samples.append(covered(*_ends(net_line_band(rates, rates.groups[0], control,
                                                    "samples")), truth))
    assert np.mean(words) >= 0.93, np.mean(words)
    assert np.mean(samples) < 0.75


def test_net_against_random_vector_covers_the_word_mean_minus_its_random_vectors() -> None:
    """--against random_vector: 8 words' mean line minus the mean of those words' own
    random-vector rates (each word its own direction, so its rate varies between words like any
    word-level rate). The reference banded over its words covers; the same reference taken as
    one condition over its pooled samples (the band before) does not reach 95%."""
    rng = np.random.default_rng(SEED + 8)
    truth = 0.25 - 0.25
    words, pooled = [], []
    for _ in range(SWEEPS):
        rates = single_word_sweep(key_successes(rng, rng.beta(1.0, 3.0, 8)))
        q = rng.beta(1.0, 3.0, 8)
        k = rng.binomial(SAMPLES, rng.beta(KAPPA * q, KAPPA * (1 - q)))
        reference = WordsReference("unsteered_to_steered", "", 8 * SAMPLES, 8 * SAMPLES,
                                   int(k.sum()), tuple(k / SAMPLES), (SAMPLES,) * 8)
        one = Baseline("unsteered_to_steered", "", 8 * SAMPLES, 8 * SAMPLES, int(k.sum()))
        words.append(covered(*_ends(net_line_band(rates, rates.groups[0], reference)), truth))
        pooled.append(covered(*_ends(net_line_band(rates, rates.groups[0], one)), truth))
    assert np.mean(words) >= 0.93, np.mean(words)
    assert np.mean(pooled) < np.mean(words) - 0.02, (np.mean(pooled), np.mean(words))
    assert baseline_interval(reference).method == "Wilson-t over 8 words"


def test_mean_of_baselines_covers_the_word_mean() -> None:
    """Eight target conditions, each unpatched 64 times around its own rate."""
    rng = np.random.default_rng(SEED + 3)
    words, samples = [], []
    for _ in range(SWEEPS):
        p = rng.beta(1.0, 3.0, 8)
        k = rng.binomial(SAMPLES, rng.beta(KAPPA * p, KAPPA * (1 - p)))
        rates = single_word_sweep(np.zeros((8, 1), dtype=int))
        rates.baselines = {f"w{i}": Baseline("unsteered_to_steered", f"w{i}", SAMPLES, SAMPLES,
                                             int(k[i])) for i in range(8)}
        for method, found in (("words", words), ("samples", samples)):
            band = baseline_mean_interval(rates, method)
            assert band is not None
            found.append(band.lower <= 0.25 <= band.upper)
    assert np.mean(words) >= 0.93, np.mean(words)
    assert np.mean(samples) < 0.75


def test_two_way_band_covers_the_population_mean() -> None:
    """Rates logit-normal with a source, a target and an interaction effect; the truth is
    E[expit(mu + a + b + e)], by Gauss-Hermite quadrature."""
    rng = np.random.default_rng(SEED + 4)
    mu, sd_s, sd_t, sd_e = -1.0, 0.8, 0.8, 0.5
    x, w = hermegauss(80)
    truth = float(np.sum(w * (1 / (1 + np.exp(-(mu + math.hypot(sd_s, sd_t, sd_e) * x)))))
                  / w.sum())
    words, samples = [], []
    for _ in range(SWEEPS):
        logit = (mu + rng.normal(0, sd_s, (10, 1, 1)) + rng.normal(0, sd_t, (1, 8, 1))
                 + rng.normal(0, sd_e, (10, 8, LAYERS)))
        k = rng.binomial(SAMPLES, 1 / (1 + np.exp(-logit)))
        band = two_way_band(k / SAMPLES, np.full(k.shape, float(SAMPLES)))
        words.append(covered(band.lower, band.upper, truth))
        total = k.sum((0, 1))
        p = total / (80 * SAMPLES)
        lower, upper = zip(*(wilson_by_formula(v, 80 * SAMPLES, 1.959963984540054) for v in p),
                           strict=True)
        samples.append(covered(np.array(lower), np.array(upper), truth))
    assert np.mean(words) >= 0.93, np.mean(words)
    assert np.mean(samples) < 0.75


def test_samples_method_is_todays_wilson_band() -> None:
    rates = single_word_sweep(np.array([[64] * LAYERS] * 4 + [[0] * LAYERS] * 4))
    band = line_band(rates, rates.groups[0], "samples")
    assert band.method == SAMPLES_METHOD
    assert (band.lower[0], band.upper[0]) == pytest.approx(
        wilson_by_formula(0.5, 512, 1.959963984540054))
