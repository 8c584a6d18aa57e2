"""The layer test (patchdb.report.layer_test, word_tests, layer_findings): its arithmetic against
hand computations and brute-force enumerations, then simulated sweeps with a known truth
(tests/layer_sims.py): an effect at 4 contiguous layers of 21 is found, and null sweeps flag
nothing, at the rates the issue asks for.
"""

import math
import statistics
from fractions import Fraction
from itertools import product

import numpy as np
import pytest
from layer_sims import (
    EFFECT,
    LAYERS,
    WANDER,
    WORD_EFFECT,
    expit,
    pairs,
    shared_baseline,
    single_word,
    word_rates,
)

from patchdb.report.clusters import WordRates
from patchdb.report.layer_findings import (
    finding_lines,
    format_cell_p,
    layer_test_block,
    shade_layers,
)
from patchdb.report.layer_test import (
    Cluster,
    LayerTest,
    decide_layers,
    find_clusters,
    largest_cluster_mass,
    layer_test,
    mean_and_variance,
    paired_differences,
    runs,
    span,
)
from patchdb.report.word_tests import benjamini_hochberg, fisher_exact, word_p_values

SWEEPS = 200
SEED = 2024
# A test that flags a null sweep with probability 5% flags more than 18 of 200 with probability
# 0.58% (binomial tail, checked below), so "at most 5% of null sweeps" is asserted as at most 18
# of 200: a fixed-seed count of at most 10 would pass or fail by the luck of the seed (an exact
# 5% test exceeds 10 of 200 in a third of seeds). scripts/sim_layer_test.py measures the rates
# over 20,000 sweeps (docs/statistics.md quotes them).
NULL_BOUND = 18
T_975_7 = 2.364624251592785  # Student's t, 97.5% quantile, 7 degrees of freedom (tables)


def counts(rates: list[list[list[float]]], n: int = 64) -> np.ndarray:
    return np.rint(np.asarray(rates) * n).astype(np.int64)


def rates_of(successes: np.ndarray, baseline: np.ndarray, layers: tuple[int, ...],
             n: int = 64) -> WordRates:
    n_s, n_t = successes.shape[:2]
    return WordRates("hand", tuple(f"s{i}" for i in range(n_s)) if n_s > 1 else ("",),
                     tuple(f"t{i}" for i in range(n_t)) if n_t > 1 else ("",), layers,
                     successes, np.full(successes.shape, n, np.int64), baseline,
                     np.full(baseline.shape, n, np.int64))


# -- layers and runs --------------------------------------------------------------------------

def test_runs_follow_the_real_layer_numbers() -> None:
    assert runs([20, 28]) == [[20], [28]]
    assert runs((43, 44, 45, 46)) == [[43, 44, 45, 46]]
    assert span([20, 28]) == "20, 28"
    assert span([40, 41, 42, 50]) == "40-42, 50"
    assert span([45]) == "45"


def test_clusters_are_runs_of_one_sign_over_contiguous_layers() -> None:
    stat = np.array([3.0, 2.5, 0.0, -3.0, -4.0, 3.0])
    layers = (40, 41, 42, 43, 44, 45)
    found = find_clusters(stat, layers, 2.0)
    assert [(c.layers, c.sign, c.mass) for c in found] == [
        ((40, 41), 1, 5.5), ((43, 44), -1, 7.0), ((45,), 1, 3.0)]
    assert largest_cluster_mass(stat[None], layers, 2.0).tolist() == [7.0]


def test_layers_20_and_28_are_two_clusters() -> None:
    """The demo patches layers 20 and 28: next to each other in the table, not in the model."""
    stat = np.array([3.0, 3.0])
    assert [c.layers for c in find_clusters(stat, (20, 28), 2.0)] == [(20,), (28,)]
    assert largest_cluster_mass(stat[None], (20, 28), 2.0).tolist() == [3.0]
    assert largest_cluster_mass(stat[None], (20, 21), 2.0).tolist() == [6.0]


def test_an_untested_layer_breaks_a_run() -> None:
    stat = np.array([3.0, np.nan, 3.0])
    assert [c.layers for c in find_clusters(stat, (40, 41, 42), 2.0)] == [(40,), (42,)]


# -- the statistic ----------------------------------------------------------------------------

def test_one_way_mean_and_variance_by_hand() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)
    mean, variance = mean_and_variance(x, shared_var=0.5)
    assert float(mean[0]) == 2.5
    assert float(variance[0]) == pytest.approx(statistics.variance([1, 2, 3, 4]) / 4 + 0.5)


def test_two_way_variance_is_min_f_by_hand() -> None:
    """[[1, 2], [3, 6]]: source means 1.5, 4.5; target means 2, 4; grand mean 3. The variance is
    ((1.5-3)^2 + (4.5-3)^2)/(2*1) + ((2-3)^2 + (4-3)^2)/(2*1) = 2.25 + 1 = 3.25."""
    mean, variance = mean_and_variance(np.array([[1.0, 2.0], [3.0, 6.0]])[..., None])
    assert (float(mean[0]), float(variance[0])) == (3.0, 3.25)


def test_paired_differences_subtract_each_targets_own_baseline() -> None:
    words = rates_of(counts([[[0.5, 0.25], [1.0, 0.0]]]), np.array([16, 32]), (40, 41))
    assert paired_differences(words).tolist() == [[[0.25, 0.0], [0.5, -0.5]]]


# -- the permutation test, by enumeration -----------------------------------------------------

def brute_force_p(d: list[float], threshold: float) -> float:
    """One layer, W words: the share of the 2^W sign patterns whose |t| (0 below the threshold)
    reaches the observed one, with the statistics module."""
    def mass(values: list[float]) -> float:
        t = statistics.fmean(values) / (statistics.stdev(values) / math.sqrt(len(values)))
        return abs(t) if abs(t) > threshold else 0.0
    observed = mass(d)
    patterns = list(product((1, -1), repeat=len(d)))
    return sum(mass([s * x for s, x in zip(signs, d, strict=True)]) >= observed - 1e-9
               for signs in patterns) / len(patterns)


@pytest.mark.parametrize("d", [
    [0.10, 0.22, 0.31, 0.45, 0.52, 0.60, 0.08, 0.15],
    [0.10, -0.05, 0.31, 0.45, 0.02, 0.60, 0.08, 0.15],
    [0.30, 0.25, 0.35, 0.20, 0.28, 0.31],
])
def test_one_way_p_is_the_share_of_all_sign_patterns(d: list[float]) -> None:
    test = decide_layers(np.array(d).reshape(1, len(d), 1), (50,))
    assert test.exact and test.draws == 2 ** len(d)
    threshold = T_975_7 if len(d) == 8 else 2.570581835636314  # t 97.5%, 7 and 5 df (tables)
    assert test.threshold == pytest.approx(threshold, rel=1e-9)
    assert len(test.clusters) == 1
    assert test.clusters[0].p == pytest.approx(brute_force_p(d, threshold), abs=1e-12)


def test_all_positive_words_reach_p_two_over_two_to_the_w() -> None:
    """Eight words all above their baselines at one layer: only the pattern and its mirror
    image are as extreme, p = 2/256."""
    d = np.array([0.10, 0.22, 0.31, 0.45, 0.52, 0.60, 0.08, 0.15]).reshape(1, 8, 1)
    assert decide_layers(d, (50,)).clusters[0].p == 2 / 256


def test_the_band_is_the_mean_plus_minus_the_max_t_critical_value() -> None:
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 0.1, (1, 8, 5))
    test = decide_layers(d, (40, 41, 42, 43, 44))
    mean = d[0].mean(0)
    se = d[0].std(0, ddof=1) / math.sqrt(8)
    assert np.allclose(test.difference, mean)
    half = (test.upper - test.lower) / 2
    critical = half / se
    assert np.allclose(critical, critical[0])  # one critical value for every layer
    assert critical[0] > T_975_7  # wider than the pointwise band
    assert np.allclose((test.upper + test.lower) / 2, mean)


# -- what the report gets from a store --------------------------------------------------------

def test_three_words_say_why_and_do_not_crash() -> None:
    """The demo: three words a side, two layers."""
    words = rates_of(counts([[[1.0, 0.5], [0.5, 0.5], [0.0, 1.0]]], n=2), np.array([1, 2, 0]),
                     (20, 28), n=2)
    test = layer_test(words)
    assert test.why_not.startswith("n/a: 3 words;")
    assert test.flagged == ()
    assert test.difference.tolist() == pytest.approx([0.5 - 0.5, 0.6666667 - 0.5], abs=1e-6)
    assert finding_lines(test) == [f"Layer test: {test.why_not}"]


def test_no_scored_baseline_says_so() -> None:
    """Eight words with rates but no unpatched baseline scored (generate --no-baselines): the
    test says what is missing, not '0 sources x 0 targets'."""
    k = counts([[[0.5, 0.25]] * 8]).transpose(1, 0, 2).reshape(1, 8, 2)
    words = WordRates("hand", ("",), tuple(f"t{i}" for i in range(8)), (40, 41), k,
                      np.full(k.shape, 64, np.int64), np.zeros(8, np.int64),
                      np.zeros(8, np.int64))
    test = layer_test(words)
    assert test.why_not == "n/a: no word has both a scored rate and a scored unpatched baseline"
    assert test.flagged == ()


def test_the_shared_baseline_adds_its_own_variance() -> None:
    """steered_to_unsteered: every word against the one control, here 2 of 64; its variance at
    the Agresti-Coull rate (2+2)/(64+4) over 68 samples joins the words' s^2/W."""
    rates = [[[0.20, 0.10]], [[0.25, 0.05]], [[0.30, 0.10]], [[0.15, 0.0]], [[0.22, 0.05]],
             [[0.28, 0.12]], [[0.18, 0.08]], [[0.26, 0.02]]]
    k = counts(rates)
    test = layer_test(rates_of(k, np.array([2]), (40, 41)))
    assert test.design == "8 words, one shared baseline"
    d = k[:, 0, 0] / 64 - 2 / 64
    p = 4 / 68
    se = math.sqrt(statistics.variance(d) / 8 + p * (1 - p) / 68)
    assert float(test.statistic[0]) == pytest.approx(statistics.fmean(d) / se, rel=1e-9)


def test_a_missing_key_leaves_its_layer_untested() -> None:
    k = counts([[[0.5, 0.5, 0.5]] * 8]).transpose(1, 0, 2).reshape(1, 8, 3)
    n = np.full(k.shape, 64, np.int64)
    n[0, 3, 1] = 0
    words = WordRates("hand", ("",), tuple(f"t{i}" for i in range(8)), (40, 41, 42), k, n,
                      np.full(8, 16, np.int64), np.full(8, 64, np.int64))
    test = layer_test(words)
    assert math.isnan(test.difference[1]) and math.isnan(test.statistic[1])
    assert test.difference[0] == pytest.approx(0.25)


# -- per-word claims --------------------------------------------------------------------------

def fisher_by_fractions(k1: int, n1: int, k0: int, n0: int) -> float:
    """Fisher's two-sided p again, with exact fractions and math.comb."""
    total = k1 + k0
    prob = {x: Fraction(math.comb(n1, x) * math.comb(n0, total - x), math.comb(n1 + n0, total))
            for x in range(max(0, total - n0), min(total, n1) + 1)}
    return float(sum(p for p in prob.values() if p <= prob[k1]))


@pytest.mark.parametrize(("k1", "n1", "k0", "n0", "known"), [
    (3, 4, 1, 4, 17 / 35),  # the lady tasting tea, two-sided
    (6, 8, 1, 5, 0.10256410256410257),  # SciPy's documented example [[6, 2], [1, 4]]
    (32, 64, 10, 64, None),
    (0, 64, 0, 64, 1.0),
    (40, 640, 9, 64, None),
])
def test_fisher_exact(k1: int, n1: int, k0: int, n0: int, known: float | None) -> None:
    expected = fisher_by_fractions(k1, n1, k0, n0)
    if known is not None:
        assert expected == pytest.approx(known, rel=1e-12)
    assert fisher_exact(k1, n1, k0, n0) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(fisher_exact(3, 4, 0, 0))


def test_benjamini_hochberg_by_hand() -> None:
    """Sorted 0.005, 0.01, 0.03, 0.04 of 4: scaled 0.02, 0.02, 0.04, 0.04; a larger p never
    gets a smaller adjusted value (0.04 * 4/3 > 0.04 * 4/4)."""
    p = np.array([[0.01, 0.04], [0.03, 0.005], [np.nan, np.nan]])
    assert benjamini_hochberg(p)[:2].ravel().tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert np.isnan(benjamini_hochberg(p)[2]).all()
    assert benjamini_hochberg(np.array([0.5, 0.9])).tolist() == [0.9, 0.9]


def test_word_p_values_pool_a_target_over_its_sources() -> None:
    """Two sources x two targets, one layer: target t0 has 10 + 30 of 128 against 20 of 64."""
    k = np.array([[[10], [5]], [[30], [60]]], dtype=np.int64)
    words = rates_of(k, np.array([20, 40]), (40,))
    table = word_p_values(words)
    assert table.words == ("t0", "t1")
    p0, p1 = fisher_by_fractions(40, 128, 20, 64), fisher_by_fractions(65, 128, 40, 64)
    assert table.p[:, 0].tolist() == pytest.approx([p0, p1], rel=1e-9)
    assert table.adjusted[:, 0].tolist() == pytest.approx(
        sorted([min(1, 2 * min(p0, p1)), max(p0, p1)], reverse=p0 > p1), rel=1e-9)


def test_word_p_values_of_the_control_experiment_use_the_one_control() -> None:
    k = np.array([[[10]], [[3]]], dtype=np.int64)
    table = word_p_values(rates_of(k, np.array([2]), (40,)))
    assert table.words == ("s0", "s1")
    assert table.p[:, 0].tolist() == pytest.approx(
        [fisher_by_fractions(10, 64, 2, 64), fisher_by_fractions(3, 64, 2, 64)], rel=1e-9)


# -- in words and on a plot -------------------------------------------------------------------

def a_test(clusters: tuple[Cluster, ...], lower: list[float], upper: list[float],
           layers: tuple[int, ...] = (43, 44, 45, 46, 47)) -> LayerTest:
    nan = np.full(len(layers), np.nan)
    return LayerTest(layers, nan, np.array(lower), np.array(upper), nan, 2.36, clusters,
                     "8 words", 256, True)


def test_the_report_line_names_the_test_and_the_band() -> None:
    test = a_test((Cluster((43, 44, 45, 46), -1, 20.0, 0.0039),),
                  [-0.5, -0.5, -0.5, -0.1, 0.1], [-0.2, -0.2, -0.2, 0.1, 0.3])
    assert finding_lines(test) == [
        "layers 43-46 differ from the unpatched baseline, below it (cluster permutation test "
        "over 8 words, p = 0.004; max-t simultaneous band at 43-45)",
        "layer 47 differs from the unpatched baseline (max-t simultaneous band over 8 words; "
        "in no significant cluster)"]
    nothing = a_test((Cluster((44,), 1, 2.5, 0.31),), [-0.1] * 5, [0.1] * 5)
    assert finding_lines(nothing) == [
        "no layer differs from the unpatched baseline (cluster permutation test over 8 words: "
        "smallest cluster p = 0.310; the max-t simultaneous band holds 0 at every tested layer)"]


def test_shading_covers_the_flagged_layers_only() -> None:
    from matplotlib.figure import Figure

    test = a_test((Cluster((20,), 1, 9.0, 0.01), Cluster((28,), 1, 9.0, 0.01),
                   Cluster((29,), -1, 3.0, 0.4)), [0.0] * 3, [0.0] * 3, layers=(20, 28, 29))
    ax = Figure().add_subplot()
    spans = shade_layers(ax, test)
    extents = [(s.get_x(), s.get_x() + s.get_width()) for s in spans]  # data coordinates
    assert extents == [(19.5, 20.5), (27.5, 28.5)]
    assert [s.get_label() for s in spans][1] == "_nolegend_"


# -- simulated sweeps (tests/layer_sims.py) ---------------------------------------------------

def flagged_in(successes: np.ndarray, baselines: np.ndarray, flips: int = 4096) -> list[tuple]:
    return [layer_test(word_rates(successes[i], baselines[i]), flips=flips, seed=i).flagged
            for i in range(len(successes))]


def test_an_effect_at_four_contiguous_layers_is_found() -> None:
    """Eight words, each moved at layers 45-48 by its own logit shift ~ N(-2, 0.5): the test
    flags exactly those four layers in at least 80% of 200 sweeps."""
    successes, baselines = single_word(np.random.default_rng(SEED), SWEEPS, effect=True)
    found = flagged_in(successes, baselines)
    assert sum(f == EFFECT for f in found) >= 0.8 * SWEEPS


def test_the_null_bound_is_the_binomial_tail() -> None:
    def above(k: int) -> float:
        return sum(math.comb(SWEEPS, i) * 0.05 ** i * 0.95 ** (SWEEPS - i)
                   for i in range(k + 1, SWEEPS + 1))
    assert above(NULL_BOUND) < 0.01 <= above(NULL_BOUND - 1)


def test_null_sweeps_flag_a_layer_no_more_than_a_5_percent_test_does() -> None:
    successes, baselines = single_word(np.random.default_rng(SEED + 1), SWEEPS)
    assert sum(bool(f) for f in flagged_in(successes, baselines)) <= NULL_BOUND


def test_the_simultaneous_band_covers_the_truth_at_every_layer() -> None:
    """The truth: the population mean difference, 0 away from the effect and, at 45-48,
    E[expit(mu + u + delta)] - 1/2 over the word population (numerical integration here)."""
    grid = np.random.default_rng(7)
    mu = grid.beta(2, 2, 2_000_000)
    z = np.log(mu) - np.log1p(-mu) + WANDER * grid.standard_normal(mu.size)
    shifted = expit(z + grid.normal(*WORD_EFFECT, mu.size)).mean() - 0.5
    truth = np.where(np.isin(LAYERS, EFFECT), shifted, 0.0)
    successes, baselines = single_word(np.random.default_rng(SEED + 2), SWEEPS, effect=True)
    covered = 0
    for i in range(SWEEPS):
        test = layer_test(word_rates(successes[i], baselines[i]), seed=i)
        covered += bool(np.all((test.lower <= truth) & (truth <= test.upper)))
    assert covered >= 0.93 * SWEEPS


def test_pair_experiments_find_the_effect_and_hold_the_null() -> None:
    """Ten sources x eight targets, both random: source words move the rate at every layer
    (about 0 over the population) and every key wanders; 1,000 sign flips per sweep."""
    rng = np.random.default_rng(SEED + 3)
    null = flagged_in(*pairs(rng, SWEEPS), flips=1000)
    assert sum(bool(f) for f in null) <= NULL_BOUND
    effect = flagged_in(*pairs(rng, SWEEPS, effect=True), flips=1000)
    assert sum(f == EFFECT for f in effect) >= 0.8 * SWEEPS


def test_one_shared_baseline_needs_its_own_variance() -> None:
    """steered_to_unsteered: eight words against one control of 64 samples. With the
    control's sampling variance the null holds; without it (the words' spread alone) the same
    sweeps flag a layer far more often than 5%."""
    successes, control = shared_baseline(np.random.default_rng(SEED + 4), SWEEPS)
    assert sum(bool(f) for f in flagged_in(successes, control)) <= NULL_BOUND
    ignored = 0
    for i in range(SWEEPS):
        d = paired_differences(word_rates(successes[i], control[i]))
        ignored += bool(decide_layers(d, LAYERS, 0.0, seed=i).flagged)
    assert ignored > 0.15 * SWEEPS


@pytest.mark.parametrize(("p", "shown"), [
    (1.0, "1"), (0.996, "1"), (0.35, ".35"), (0.0449, ".04"), (0.004, ".004"), (0.0004, "<.001"),
    (float("nan"), "-")])
def test_p_cells(p: float, shown: str) -> None:
    assert format_cell_p(p) == shown


def test_the_printed_block_carries_the_differences_and_the_bh_p_values() -> None:
    """Two words at two layers: word t0 6/64 then 40/64 against 20/64; t1 20/64 twice against
    20/64. Differences in points: (6-20)/64 and (20-20)/64 -> mean -10.9 -> -11; (40-20)/64
    and 0 -> +15.6 -> +16. Four Fisher tests, BH over the four."""
    k = np.array([[[6, 40], [20, 20]]], dtype=np.int64)
    words = rates_of(k, np.array([20, 20]), (40, 41))
    test, table = layer_test(words), word_p_values(words)
    raw = [fisher_by_fractions(6, 64, 20, 64), fisher_by_fractions(40, 64, 20, 64), 1.0, 1.0]
    order = sorted(range(4), key=lambda i: raw[i])
    adjusted = [0.0] * 4
    running = 1.0
    for rank in range(4, 0, -1):  # step-up, by hand
        i = order[rank - 1]
        running = min(running, raw[i] * 4 / rank)
        adjusted[i] = running
    assert table.adjusted.ravel().tolist() == pytest.approx(adjusted, rel=1e-9)
    block = layer_test_block(test, table).splitlines()
    assert block[2].split() == ["diff", "-11", "+16"]
    assert block[3] == "Layer test: n/a: 2 words; a sign-flip test needs at least 6 words a " \
        "side to reach p < 0.05"
    assert "over the 4 cells of this table" in block[4]
    assert block[6].split() == ["t0", format_cell_p(adjusted[0]), format_cell_p(adjusted[1])]
    assert block[7].split() == ["t1", "1", "1"]


def test_one_steered_word_against_the_control_is_its_own_row() -> None:
    """steered_to_unsteered narrowed to one word (`--words Bread`): the row is Bread, not the
    unsteered target's empty name."""
    words = WordRates("hand", ("Bread",), ("",), (40,), np.array([[[10]]], dtype=np.int64),
                      np.full((1, 1, 1), 64, np.int64), np.array([2]), np.array([64]))
    table = word_p_values(words)
    assert table.words == ("Bread",)
    assert float(table.p[0, 0]) == pytest.approx(fisher_by_fractions(10, 64, 2, 64), rel=1e-9)
