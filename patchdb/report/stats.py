"""Wilson score intervals: the 95% band drawn around the bold lines with `report --ci`."""

import numpy as np
from numpy.typing import NDArray

Z_95 = 1.959963984540054


def wilson_interval(
    successes: NDArray[np.float64] | float, n: NDArray[np.float64] | float, z: float = Z_95
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Lower and upper Wilson bounds of successes/n, element-wise; NaN where n is 0."""
    k = np.asarray(successes, dtype=float)
    total = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / total
        z2 = z * z
        centre = (p + z2 / (2 * total)) / (1 + z2 / total)
        half = z * np.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
        lower = np.where(total > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
        upper = np.where(total > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    return lower, upper
