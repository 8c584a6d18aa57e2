"""How full continuous batching keeps the decode step, and where the rest goes: a simulation of
refill.py's schedule (no model) on answers of the benchmark's stop-length model.

    python scripts/sim_refill.py --rows 403 --samples 11264      # one patch layer, as benched
    python scripts/sim_refill.py --rows 403 --samples 236544     # the full sweep in one process

Each sample draws a length from the distribution of the benchmarks' early-stop model
(stop_model.py: a quarter run to the 100-token cap, the rest stop after a log-normal number of
tokens, median 30), with Python's own generator rather than the seeds. Rows take samples
in order; once REFILL_FRACTION of the rows (refill.py) are idle they are refilled; when nothing is
left to start, the step moves to half, a quarter or an eighth of the rows as they fit (the
drain). A step's time is modelled as `fixed + per_row * rows` (milliseconds; defaults fitted to
an H100 with a Gemma-3-27B shape: 322 rows about 46 ms, 403 rows 47.5 ms). It prints the
useful tokens per step-row before and during the drain, and the modelled rate against the
uniform-length one at the same rows.
"""

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stop_model import STOP_CAPPED as CAPPED  # noqa: E402
from stop_model import STOP_MEDIAN as MEDIAN  # noqa: E402
from stop_model import STOP_SIGMA as SIGMA  # noqa: E402

from patchdb.generate.graphed import row_buckets  # noqa: E402
from patchdb.generate.refill import REFILL_FRACTION  # noqa: E402

CAP = 100


def lengths(n: int, seed: int) -> list[int]:
    """Tokens each answer draws (its EOS included)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < CAPPED:
            out.append(CAP)
        else:
            step = round(MEDIAN * math.exp(SIGMA * rng.gauss(0.0, 1.0)))
            out.append(min(max(step, 4), CAP - 1) + 1)
    return out


def simulate(rows: int, todo: list[int], fixed_ms: float, per_row_ms: float,
             fraction: float = REFILL_FRACTION) -> dict[str, float]:
    left = [0] * rows  # tokens still to draw per row (0: idle)
    queue = list(reversed(todo))
    threshold = max(1, int(rows * fraction))
    sizes = row_buckets(rows)
    step_rows = rows
    steps = drain_steps = 0
    tokens = drain_tokens = 0
    ms = drain_ms = 0.0

    def fill() -> None:
        for r in range(step_rows):
            if left[r] == 0 and queue:
                left[r] = queue.pop()

    fill()
    while any(left):
        live = sum(1 for x in left if x)
        if queue and rows - live >= threshold:
            fill()
            live = sum(1 for x in left if x)
        if not queue:
            fitting = min(s for s in sizes if s >= live)
            if fitting < step_rows:
                kept = [x for x in left if x]
                step_rows = fitting
                left = kept + [0] * (rows - len(kept))
        cost = fixed_ms + per_row_ms * step_rows
        drawn = sum(1 for x in left[:step_rows] if x)
        left = [x - 1 if x else 0 for x in left]
        steps += 1
        tokens += drawn
        ms += cost
        if not queue:
            drain_steps += 1
            drain_tokens += drawn
            drain_ms += cost
    uniform_rate = rows / (fixed_ms + per_row_ms * rows) * 1000
    return {
        "steps": steps, "tokens": tokens, "occupancy": tokens / (steps * rows),
        "occupancy_before_drain": (tokens - drain_tokens) / max((steps - drain_steps) * rows, 1),
        "drain_steps": drain_steps, "drain_share_of_time": drain_ms / ms,
        "rate": tokens / ms * 1000, "rate_before_drain": (tokens - drain_tokens)
        / max(ms - drain_ms, 1e-9) * 1000, "uniform_rate": uniform_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=403)
    parser.add_argument("--samples", type=int, default=11264)
    parser.add_argument("--fixed-ms", type=float, default=40.0)
    parser.add_argument("--per-row-ms", type=float, default=0.019)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refill-fraction", type=float, default=REFILL_FRACTION,
                        help="refill once this fraction of the rows is idle (refill.py's: "
                             f"{REFILL_FRACTION:.4g})")
    args = parser.parse_args()
    out = simulate(args.rows, lengths(args.samples, args.seed), args.fixed_ms, args.per_row_ms,
                   args.refill_fraction)
    print(f"{args.samples} answers through {args.rows} rows: {out['steps']} steps, "
          f"{out['tokens']} tokens")
    print(f"rows drawing a token: {out['occupancy']:.1%} of step-rows "
          f"({out['occupancy_before_drain']:.1%} before the drain)")
    print(f"drain: {out['drain_steps']} steps, {out['drain_share_of_time']:.1%} of the time")
    print(f"modelled rate {out['rate']:.0f} tok/s = {out['rate'] / out['uniform_rate']:.1%} of the "
          f"uniform-length rate at {args.rows} rows ({out['uniform_rate']:.0f}); before the drain "
          f"{out['rate_before_drain'] / out['uniform_rate']:.1%}")


if __name__ == "__main__":
    main()
