"""Wilson score intervals, and the band `report --ci-method samples` draws around a bold line
(kept for comparison: it counts every sample as an independent draw; the default band is over
words, patchdb.report.clusters).

A bold line is the unweighted mean of its keys' rates (each key counts once, whatever its number
of scored samples). Its band is the Wilson interval of that mean taken at an effective sample
size: if every key had the same true rate p, the mean of K key rates with n_1..n_K scored samples
has variance p(1-p) * sum(1/n_k) / K^2, which is that of one proportion over
n_eff = K^2 / sum(1/n_k) samples. With equal n_k this is the pooled count K*n, where the band is
exactly the pooled Wilson interval; and a Wilson interval always contains its own estimate, so
the band always contains the line it is drawn around.
"""

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


def effective_n(scored: list[int]) -> float:
    """K^2 / sum(1/n_k) over the keys with scored samples: the sample size of a mean of key
    rates (0.0 when no key is scored)."""
    counts = [n for n in scored if n > 0]
    return len(counts) ** 2 / sum(1.0 / n for n in counts) if counts else 0.0


def mean_rate_band(
    rates: list[float], n_effective: list[float], z: float = Z_95
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The band of a bold line: Wilson bounds of each mean rate at its effective sample size."""
    p = np.asarray(rates, dtype=float)
    n = np.asarray(n_effective, dtype=float)
    return wilson_interval(np.where(n > 0, p * n, 0.0), n, z)
