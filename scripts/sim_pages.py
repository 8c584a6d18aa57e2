"""How continuous batching with KV by need (pages.py) keeps its rows drawing: a simulation of
refill.py's paged schedule (no model) with patchdb's own page pool and admission rule.

    python scripts/sim_pages.py                       # one H100 layer as benched: 831 rows
    python scripts/sim_pages.py --lengths uniform     # every answer to the cap, same pool
    python scripts/sim_pages.py --rows 2664 --pages 14886 --samples 236544   # H200, full sweep

Each step, running rows take the pages their next write needs (PagePool.grow: the priority row
first, the others while pages beyond its reserve are free; the rest wait a step), rows that do
not wait draw a token, and finished rows are filed and refilled once REFILL_FRACTION of the rows
are free (or a row waits), new samples starting as refill.py's _room allows (PAGE_HEADROOM_STEPS). It
prints the share of step-rows that drew a token before the drain and the rows waiting per step.
Lengths: bench_generate.py's early-stop model (`stop`), every answer at the cap (`uniform`), or
`bimodal` (60% end at once, 40% run to the cap).
"""

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from sim_refill import CAP, lengths  # noqa: E402

from patchdb.generate.batching import paged_batch_allowed  # noqa: E402
from patchdb.generate.pages import PAGE, PagePool, pages_for  # noqa: E402
from patchdb.generate.refill import PAGE_HEADROOM_STEPS, REFILL_FRACTION  # noqa: E402


def simulate(rows: int, pages: int, todo: list[int], headroom_steps: int) -> dict[str, float]:
    pool = PagePool(pages, rows, pages_for(CAP), torch.device("cpu"))
    length, count = [0] * rows, [0] * rows
    owned, ended = [False] * rows, [True] * rows
    queue = list(reversed(todo))
    threshold = max(1, int(rows * REFILL_FRACTION))
    steps = tokens = waits = 0
    drain: tuple[int, int] | None = None

    def admit() -> None:
        running = sum(o and not e for o, e in zip(owned, ended, strict=True))
        free = [r for r in range(rows) if not owned[r]]
        start = free[:pool.admissible(min(len(free), len(queue)),
                                      running * headroom_steps // PAGE)]
        for r in start:
            length[r], count[r], owned[r], ended[r] = queue.pop(), 1, True, False
        pool.start(start)

    admit()
    while any(owned):
        running = [r for r in range(rows) if owned[r] and not ended[r]]
        pool.elect(running)
        need = sorted(((r, count[r]) for r in running if count[r] > pool.capacity(r)),
                      key=lambda pair: -pair[1])
        waiting = set(pool.grow(need))
        steps += 1
        waits += len(waiting)
        for r in running:
            if r not in waiting:
                count[r] += 1
                tokens += 1
                ended[r] = count[r] >= length[r]
        if not queue and drain is None:
            drain = (steps, tokens)
        done = [r for r in range(rows) if owned[r] and ended[r]]
        if done and (len(done) >= threshold or waiting or not queue):
            for r in done:
                owned[r] = False
            pool.release(done)
            admit()
    before_steps, before_tokens = drain or (steps, tokens)
    return {"steps": steps, "row_use_before_drain": before_tokens / (before_steps * rows),
            "waiting_rows_per_step": waits / steps, "pages_most_used": pool.most_used}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=831)
    parser.add_argument("--pages", type=int, default=4642)
    parser.add_argument("--samples", type=int, default=11264)
    parser.add_argument("--lengths", choices=["stop", "uniform", "bimodal"], default="stop")
    parser.add_argument("--headroom-steps", type=int, default=PAGE_HEADROOM_STEPS)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    if args.lengths == "stop":
        todo = lengths(args.samples, args.seed)
    elif args.lengths == "uniform":
        todo = [CAP] * args.samples
    else:
        rng = random.Random(args.seed)
        todo = [2 if rng.random() < 0.6 else CAP for _ in range(args.samples)]
    counts: dict[int, int] = {}
    for n in todo:
        counts[n] = counts.get(n, 0) + 1
    out = simulate(args.rows, args.pages, todo, args.headroom_steps)
    print(f"{args.rows} rows, {args.pages} pages of {PAGE}, {args.samples} answers "
          f"({args.lengths}), headroom {args.headroom_steps} steps: {out['steps']} steps, "
          f"{out['row_use_before_drain']:.1%} of step-rows drew a token before the drain, "
          f"{out['waiting_rows_per_step']:.1f} rows waited a step, {out['pages_most_used']} "
          f"pages at most; the auto batch would page these lengths: "
          f"{paged_batch_allowed(counts, CAP)}")


if __name__ == "__main__":
    main()
