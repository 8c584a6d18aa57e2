"""The layer test on many simulated sweeps (tests/layer_sims.py): how often it flags a layer
when none differs, how often it finds an effect at layers 45-48 exactly, how often the max-t
band covers the truth at every layer, and what the alternatives rejected in docs/statistics.md
would do. The tests assert the same on 200 sweeps; this gives the rates with small error.

    python scripts/sim_layer_test.py --sweeps 20000 --pair-sweeps 4000
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from layer_sims import (  # noqa: E402
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

from patchdb.report.clusters import cluster_bootstrap  # noqa: E402
from patchdb.report.layer_test import decide_layers, layer_test, paired_differences  # noqa: E402

BATCH = 500


def rate(hits: int, n: int) -> str:
    p = hits / n
    return f"{100 * p:5.2f}% +- {100 * math.sqrt(p * (1 - p) / n):.2f} ({hits}/{n})"


def single_word_truth() -> np.ndarray:
    grid = np.random.default_rng(7)
    mu = grid.beta(2, 2, 4_000_000)
    z = np.log(mu) - np.log1p(-mu) + WANDER * grid.standard_normal(mu.size)
    shifted = expit(z + grid.normal(*WORD_EFFECT, mu.size)).mean() - 0.5
    return np.where(np.isin(LAYERS, EFFECT), shifted, 0.0)


def run(name: str, draw, sweeps: int, flips: int, seed: int, truth: np.ndarray | None,
        extra: dict) -> None:
    """Count flags, exact finds and band coverage over `sweeps` sweeps drawn in batches."""
    rng = np.random.default_rng(seed)
    any_flag = exact = covered = 0
    others = dict.fromkeys(extra, 0)
    start = time.perf_counter()
    done = 0
    while done < sweeps:
        successes, baselines = draw(rng, min(BATCH, sweeps - done))
        for i in range(len(successes)):
            words = word_rates(successes[i], baselines[i])
            test = layer_test(words, flips=flips, seed=done + i)
            any_flag += bool(test.flagged)
            exact += test.flagged == EFFECT
            if truth is not None:
                covered += bool(np.all((test.lower <= truth) & (truth <= test.upper)))
            d = paired_differences(words)
            for label, alternative in extra.items():
                others[label] += bool(alternative(d, done + i).flagged)
        done += len(successes)
    seconds = time.perf_counter() - start
    print(f"{name}: {sweeps} sweeps, {seconds:.0f} s")
    print(f"  flags a layer          {rate(any_flag, sweeps)}")
    print(f"  flags exactly 45-48    {rate(exact, sweeps)}")
    if truth is not None:
        print(f"  band covers the truth  {rate(covered, sweeps)}")
    for label, hits in others.items():
        print(f"  {label:<22} {rate(hits, sweeps)}")


def bootstrap_band(sweeps: int, seed: int) -> None:
    """The band rejected in docs/statistics.md: max-t over the pairs cluster bootstrap of
    words (patchdb.report.clusters), each layer's spread its bootstrap standard deviation."""
    rng = np.random.default_rng(seed)
    covered = 0
    for start in range(0, sweeps, BATCH):
        successes, baselines = single_word(rng, min(BATCH, sweeps - start))
        for i in range(len(successes)):
            d = paired_differences(word_rates(successes[i], baselines[i]))
            mean = d.mean((0, 1))
            draws = cluster_bootstrap(d, 2000, seed=start + i)
            sd = draws.std(0, ddof=1)
            critical = np.quantile((np.abs(draws - mean) / sd).max(1), 0.95)
            covered += bool(np.all(np.abs(mean) <= critical * sd))
    print(f"  pairs-bootstrap max-t band covers the truth {rate(covered, sweeps)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=2000, help="single-word sweeps per case")
    parser.add_argument("--pair-sweeps", type=int, default=1000, help="pair sweeps per case")
    args = parser.parse_args()
    zero = np.zeros(len(LAYERS))
    print("single word (8 words, own baselines; every one of the 256 sign patterns)")
    run("  null", single_word, args.sweeps, 4096, 1, zero, {})
    bootstrap_band(min(args.sweeps, 2000), 6)
    run("  effect", lambda r, n: single_word(r, n, effect=True), args.sweeps, 4096, 2,
        single_word_truth(), {})
    print("one shared baseline (8 words against one control of 64 samples)")
    ignored = {"without the control's variance":
               lambda d, s: decide_layers(d, LAYERS, 0.0, seed=s)}
    run("  null", shared_baseline, args.sweeps, 4096, 3, zero, ignored)
    print("pairs (10 sources x 8 targets, both random; 1,000 flips)")
    one_factor = {
        "flipping targets only": lambda d, s: decide_layers(d.mean(0)[None], LAYERS, seed=s),
        "flipping sources only": lambda d, s: decide_layers(d.mean(1)[:, None], LAYERS, seed=s),
    }
    run("  null", pairs, args.pair_sweeps, 1000, 4, zero, one_factor)
    run("  effect", lambda r, n: pairs(r, n, effect=True), args.pair_sweeps, 1000, 5, None, {})


if __name__ == "__main__":
    main()
