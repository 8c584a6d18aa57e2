"""Wilson 95% intervals, checked against values worked out by hand."""

import math

import numpy as np
import pytest

from patchdb.report.stats import wilson_interval


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
