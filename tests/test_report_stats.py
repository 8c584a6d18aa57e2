"""Wilson 95% intervals, checked against values worked out by hand."""

import math

import numpy as np
import pytest

from patchdb.report.stats import effective_n, mean_rate_band, wilson_interval


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (5, 10, 0.236593, 0.763407),
    (0, 10, 0.0, 0.277533),
    (10, 10, 0.722467, 1.0),
    (32, 64, 0.381021, 0.618979),
])
def test_wilson_bounds(k: int, n: int, low: float, high: float) -> None:
    lower, upper = wilson_interval(k, n)
    assert float(lower) == pytest.approx(low, abs=1e-6)
    assert float(upper) == pytest.approx(high, abs=1e-6)


def test_no_samples_is_no_interval() -> None:
    lower, upper = wilson_interval(np.array([0, 3]), np.array([0, 4]))
    assert math.isnan(lower[0]) and math.isnan(upper[0])
    assert 0 < lower[1] < 0.75 < upper[1] <= 1


def wilson_by_formula(k: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """A second, independent computation: the Wilson score interval written out with math."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (8, 10, 0.4902, 0.9433),  # published 95% Wilson bounds for 8 of 10
    (2, 10, 0.0567, 0.5098),  # its mirror image: 1 - the bounds above, swapped
    (0, 10, 0.0, 0.2775),
])
def test_wilson_orientation(k: int, n: int, low: float, high: float) -> None:
    """Lower below k/n below upper, the band on the side of the rate it belongs to."""
    assert wilson_by_formula(k, n) == pytest.approx((low, high), abs=5e-5)
    lower, upper = wilson_interval(k, n)
    assert (float(lower), float(upper)) == pytest.approx((low, high), abs=5e-5)
    assert float(lower) <= k / n <= float(upper)


def test_effective_n_of_a_mean_of_rates() -> None:
    assert effective_n([10, 10, 10]) == pytest.approx(30.0)  # equal counts: the pooled count
    assert effective_n([10, 1, 0]) == pytest.approx(4 / (1 / 10 + 1 / 1))  # unscored key left out
    assert effective_n([0, 0]) == 0.0


def test_mean_rate_band_contains_its_line() -> None:
    """Keys at 10/10 and 0/1: the mean line is 0.5, the pooled rate 10/11. The pooled Wilson
    band (0.6226, 0.9838) would miss the line; the band at n_eff = 40/11 holds it."""
    assert wilson_by_formula(10, 11)[0] > 0.5
    lower, upper = mean_rate_band([0.5], [40 / 11])
    expected = wilson_by_formula(0.5 * 40 / 11, 40 / 11)
    assert (float(lower[0]), float(upper[0])) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx((0.1416, 0.8584), abs=5e-5)
