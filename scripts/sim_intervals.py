"""How often each kind of 95% band covers the truth, on simulated sweeps (docs/statistics.md).

    python scripts/sim_intervals.py               # 2,000 simulated sweeps per row
    python scripts/sim_intervals.py --sweeps 200  # as many as the tests use

A simulated sweep has the default sweep's shape: each word's rate is drawn from a Beta (the
population of words a reader generalises over), each key's rate at each of 21 layers is drawn
around its word's (Beta(20 p, 20 (1 - p)): the samples of a key share a latent rate), and each
key gets 64 samples. The truth is the population mean. For each design the script prints the
share of bands (every layer of every sweep) that cover it, and their mean width, for:

- words: what `report` draws (patchdb.report.clusters: Wilson-t over words, two-way ANOVA
  variance for crossed sources and targets);
- t: the plain t interval on the word means (mean +/- t s / sqrt(W));
- boot: the percentile bootstrap over words (2,000 draws; pigeonhole for two-way);
- samples: Wilson over samples (`--ci-method samples`).
"""

import argparse
import math
import time

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from patchdb.report.clusters import (
    bootstrap_counts,
    one_way_band,
    resampled_means,
    t_quantile,
    two_way_band,
)
from patchdb.report.stats import wilson_interval

SAMPLES = 64
LAYERS = 21
KAPPA = 20.0
BOOT_DRAWS = 2000


def key_counts(rng: np.random.Generator, word_rates: np.ndarray) -> np.ndarray:
    """(..., LAYERS) successes of SAMPLES each, around each word's rate."""
    p = np.repeat(word_rates[..., None], LAYERS, axis=-1)
    return rng.binomial(SAMPLES, rng.beta(KAPPA * p + 1e-9, KAPPA * (1 - p) + 1e-9))


def one_way(rng: np.random.Generator, sweeps: int, words: int, a: float,
            b: float) -> dict[str, tuple[float, float]]:
    truth = a / (a + b)
    found: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in
                                                              ("words", "t", "boot", "samples")}
    t = t_quantile(0.975, words - 1)
    counts = bootstrap_counts(words, 1, BOOT_DRAWS, seed=1)
    for _ in range(sweeps):
        k = key_counts(rng, rng.beta(a, b, words))  # (W, L)
        r = k / SAMPLES
        band = one_way_band(r, np.full(r.shape, float(SAMPLES)))
        found["words"].append((band.lower, band.upper))
        m, half = r.mean(0), t * r.std(0, ddof=1) / math.sqrt(words)
        found["t"].append((m - half, m + half))
        means = resampled_means(r[:, None, :], counts)
        found["boot"].append(tuple(np.percentile(means, [2.5, 97.5], axis=0)))  # type: ignore[arg-type]
        found["samples"].append(wilson_interval(k.sum(0), words * SAMPLES))
    return {name: _score(bands, truth) for name, bands in found.items()}


def two_way(rng: np.random.Generator, sweeps: int, mu: float, sd_s: float, sd_t: float,
            sd_e: float) -> dict[str, tuple[float, float]]:
    x, w = hermegauss(80)
    truth = float(np.sum(w / (1 + np.exp(-(mu + math.hypot(sd_s, sd_t, sd_e) * x)))) / w.sum())
    found: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in
                                                              ("words", "boot", "samples")}
    counts = bootstrap_counts(10, 8, BOOT_DRAWS, seed=1)
    for _ in range(sweeps):
        logit = (mu + rng.normal(0, sd_s, (10, 1, 1)) + rng.normal(0, sd_t, (1, 8, 1))
                 + rng.normal(0, sd_e, (10, 8, LAYERS)))
        k = rng.binomial(SAMPLES, 1 / (1 + np.exp(-logit)))
        r = k / SAMPLES
        band = two_way_band(r, np.full(r.shape, float(SAMPLES)))
        found["words"].append((band.lower, band.upper))
        found["boot"].append(tuple(np.percentile(resampled_means(r, counts), [2.5, 97.5],  # type: ignore[arg-type]
                                                 axis=0)))
        found["samples"].append(wilson_interval(k.sum((0, 1)), 80 * SAMPLES))
    return {name: _score(bands, truth) for name, bands in found.items()}


def _score(bands: list[tuple[np.ndarray, np.ndarray]], truth: float) -> tuple[float, float]:
    lower = np.concatenate([np.asarray(b[0]) for b in bands])
    upper = np.concatenate([np.asarray(b[1]) for b in bands])
    return float(np.mean((lower <= truth) & (truth <= upper))), float(np.mean(upper - lower))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    print(f"{args.sweeps} simulated sweeps per row, {LAYERS} layers, {SAMPLES} samples per key; "
          "coverage of the population mean (mean band width)")
    print(f"{'design':<46} {'words':>14} {'t':>14} {'boot':>14} {'samples':>14}")
    for words, what in ((8, "single-word mean, 8 words"),
                        (10, "pair line, 10 sources"),
                        (3, "demo mean, 3 words")):
        for a, b in ((1.0, 3.0), (2.0, 2.0), (0.5, 4.5), (5.0, 45.0)):
            scores = one_way(rng, args.sweeps, words, a, b)
            cells = " ".join(f"{scores[k][0]:>6.1%} ({scores[k][1]:.2f})" for k in
                             ("words", "t", "boot", "samples"))
            print(f"{what + f', Beta({a:g}, {b:g})':<46} {cells}")
    for mu, sd_s, sd_t, sd_e in ((-1.0, 0.8, 0.8, 0.5), (0.0, 1.0, 0.3, 0.3),
                                 (-2.5, 1.0, 1.0, 1.0)):
        scores = two_way(rng, args.sweeps, mu, sd_s, sd_t, sd_e)
        cells = " ".join(f"{scores[k][0]:>6.1%} ({scores[k][1]:.2f})" if k in scores
                         else f"{'':>14}" for k in ("words", "t", "boot", "samples"))
        print(f"{f'two-way 10 x 8, logit N({mu:g}; {sd_s:g}, {sd_t:g}, {sd_e:g})':<46} {cells}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
