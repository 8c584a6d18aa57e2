"""PPI++ corrected rates: hand-computed estimates, the band's level, and simulated sweeps with a
known truth where the judge's errors change with the layer (tests/ppi_sim.py)."""

import math

import numpy as np
import pytest
from ppi_sim import Judge, simulate

from patchdb.report.corrected import ScoreCalibration, rogan_gladen_lines
from patchdb.report.ppi import empty_counts, power_tuning, ppi_lines

RUNS = 200
T7_975 = 2.364624251592785  # Student's t, 7 degrees of freedom, 0.975 quantile (tables)


def two_words():
    """One layer, two words (single-word experiment), lambda given as 0.5.

    w0: 4 rollouts the judge detected (3 judged scores YES), 2 of them labeled: judged YES and
        true, judged NO and false; 4 it did not detect, 1 labeled, true.
    w1: 2 detected (both judged YES), 1 labeled: judged YES but false; 10 not detected, 2
        labeled, both false.
    r_YES = mean(1 - 0.5, 0 - 0, 0 - 0.5) = 0; r_NO = mean(1, 0, 0) = 1/3.
    w0: labeled truths 2, unlabeled detected 2 judged YES -> 0.5 x 2 + 2 x 0, unlabeled not
        detected 3 x 1/3: (2 + 1 + 1) / 8 = 0.5.
    w1: truths 0, unlabeled detected 1 judged YES -> 0.5, 8 not detected x 1/3:
        (0.5 + 8/3) / 12 = 0.263889.
    The line is their mean, 0.381944 (pooling the counts would give (4 + 3.1667) / 20 = 0.3583).
    """
    c = empty_counts("steered_to_unsteered", ("w0", "w1"), ("",), (40,))
    for word, values in enumerate([
            # (n, judged, labeled, labeled_true, labeled_judged, labeled_both) for NO, YES
            ((4, 0, 1, 1, 0, 0), (4, 3, 2, 1, 1, 1)),
            ((10, 0, 2, 0, 0, 0), (2, 2, 1, 0, 1, 0))]):
        for h, (n, judged, labeled, true, lj, both) in enumerate(values):
            at = (word, 0, 0, h)
            c.n[at], c.judged[at], c.labeled[at] = n, judged, labeled
            c.labeled_true[at], c.labeled_judged[at], c.labeled_both[at] = true, lj, both
    return c


def test_ppi_estimate_is_the_mean_of_corrected_key_rates() -> None:
    line = ppi_lines(two_words(), 0.5, [""], draws=50)[0]
    assert line.estimate[0] == pytest.approx((0.5 + (0.5 + 8 / 3) / 12) / 2)
    assert line.estimate[0] == pytest.approx(0.3819444, abs=1e-6)


def test_rogan_gladen_corrects_the_mean_of_key_rates() -> None:
    """Raw key rates 3/8 and 2/12, mean 0.270833; Se 0.8, Sp 0.9 (as in test_corrected):
    (0.270833 + 0.9 - 1) / 0.7 = 0.244048 (pooled 5/20 would give 0.214286)."""
    calibration = ScoreCalibration.two_classes(31, 24, 69, 6, 0.31)
    line = rogan_gladen_lines(two_words(), calibration, [""], draws=50)[0]
    assert line.estimate[0] == pytest.approx(0.2440476, abs=1e-6)


def test_power_tuning_by_hand() -> None:
    """The YES stratum: N 6 of the cell's 20 (share 0.3), judged YES 5 of 6 (Var f = 5/36),
    3 labeled (f, y) = (1, 1), (0, 0), (1, 0): Cov = (1 - 2 x 1 / 3) / 2 = 1/6, U = 3, g = 1/2.
    lambda = 0.09 x 0.5 x (1/6) / 3 / (0.09 x 0.25 x 5/36 x (1/3 + 1/3)) = 0.0025 / 0.00208333
    = 1.2, clipped to 1."""
    assert power_tuning([two_words()]) == 1.0
    c = two_words()
    c.labeled_both[0, 0, 0, 1] = 0  # now (1, 0), (0, 0), (1, 0): Cov = -1/3 x ... < 0 -> 0
    c.labeled_true[0, 0, 0, 1] = 0
    assert power_tuning([c]) == 0.0


def test_a_stratum_without_labels_makes_the_layer_n_a() -> None:
    c = two_words()
    c.labeled[..., 0] = 0
    c.labeled_true[..., 0] = 0
    line = ppi_lines(c, 0.5, [""], draws=50)[0]
    assert math.isnan(line.estimate[0]) and math.isnan(line.lower[0])
    assert line.reasons == ("n/a: a verdict stratum has no labeled score",)


def wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """The Wilson score interval written out (a second computation of the band's last step)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def test_the_band_is_95_percent_on_words_minus_one_degrees_of_freedom() -> None:
    sweep = simulate(np.random.default_rng(5), (0.3,), SAME)
    line = ppi_lines(sweep.counts, power_tuning([sweep.counts]), [""])[0]
    p, var = float(line.estimate[0]), float(line.variance[0])
    assert line.words[0] == 8 and var > 0
    n = min(p * (1 - p) / var, float(sweep.counts.n.sum()))
    assert (line.lower[0], line.upper[0]) == pytest.approx(wilson(p, n, T7_975), abs=1e-9)


# The judge's detection errors change with the layer (coherence judged alike throughout).
VARYING = Judge(0.95, 0.9, (0.95, 0.8, 0.6), (0.98, 0.85, 0.6))
SAME = Judge(0.95, 0.9, (0.85,), (0.9,))


def coverage(judge: Judge, means: tuple[float, ...], seed: int) -> dict[str, np.ndarray]:
    """Over RUNS simulated sweeps: per layer, how often each band covers the truth, and the
    bands' mean widths."""
    rng = np.random.default_rng(seed)
    hits = {"ppi": np.zeros(len(means)), "rg": np.zeros(len(means))}
    widths = {"ppi": np.zeros(len(means)), "rg": np.zeros(len(means))}
    for _ in range(RUNS):
        sweep = simulate(rng, means, judge, labels_per_stratum=20, concentration=30)
        for name, line in (
                ("ppi", ppi_lines(sweep.counts, power_tuning([sweep.counts]), [""])[0]),
                ("rg", rogan_gladen_lines(sweep.counts, sweep.calibration, [""])[0])):
            hits[name] += (line.lower <= sweep.truth) & (sweep.truth <= line.upper)
            widths[name] += (line.upper - line.lower) / RUNS
    return {"ppi": hits["ppi"] / RUNS, "rg": hits["rg"] / RUNS,
            "ppi_width": widths["ppi"], "rg_width": widths["rg"]}


def test_ppi_covers_where_the_judges_error_changes_with_the_layer_and_rogan_gladen_does_not(
        ) -> None:
    """Three layers, true rates 0.24 each; the judge's detection Sp falls from 0.98 to 0.6.
    Rogan-Gladen takes one Se and Sp for every layer, so at the last layer it leaves most of
    the false positives in; PPI corrects each layer with that layer's labels."""
    result = coverage(VARYING, (0.3, 0.3, 0.3), seed=20261201)
    assert (result["ppi"] >= 0.93).all(), result
    assert result["rg"][2] <= 0.6, result


def test_where_both_are_valid_the_ppi_band_is_no_wider() -> None:
    """One layer, so one Se and Sp is right for every layer: both cover, PPI's band is no
    wider on average."""
    result = coverage(SAME, (0.3,), seed=20261202)
    assert result["ppi"][0] >= 0.93 and result["rg"][0] >= 0.93, result
    assert result["ppi_width"][0] <= result["rg_width"][0], result
