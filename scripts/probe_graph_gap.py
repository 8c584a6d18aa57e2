"""Does the GPU sit idle before each replay of a CUDA graph, and would two graphs taken in turn
remove it? For issue #25: the H100 profile of a decode step (full_layer_gemma3-27b_h100_diverse)
shows one gap a step of 0.3-1.6 ms between the last eager kernel before the step's graph and
the graph's first kernel, while the host is most of a step ahead.

No model: a graph of N kernels (matmuls and adds on a batch of decode size, about the step's
kernel time), a few small eager kernels before it (the step's input updates) and after it (the
sampler), an event after each step that the host waits on one step later (the decode loop's
pipelining). Timed with CUDA events over many steps, for:

- `graph-only`: the graph replayed back to back, nothing between (its kernels' time);
- `eager-only`: the small kernels alone;
- `one-graph`: the loop, replaying one graph each step;
- `two-graphs`: the same loop taking two captures of the same step in turn, so a graph is never
  launched while its own previous launch is still queued;
- `queued`: the loop with no host wait (every step queued ahead).

idle a step = loop - graph-only - eager-only. eager-only is timed with the host launching each
small kernel as it goes, so it is bound by launches (about 7 us each) and the idle figures come
out negative; compare the loops with each other (`vs_queued_ms`: a loop less `queued`, where
nothing waits on the host). Each graph size is also run with fewer, longer
kernels (same total time) to see whether the idle time grows with the graph's node count.

    python scripts/probe_graph_gap.py --out probe_graph_gap.json
"""

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

DEVICE = "cuda:0"


def build_step(kernels: int, rows: int, width: int) -> tuple[Callable[[], None], dict[str, Any]]:
    """A step of `kernels` kernels: matmuls on [rows, width] with an add after every second."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(rows, width, device=DEVICE, dtype=torch.bfloat16, generator=g)
    weights = [torch.randn(width, width, device=DEVICE, dtype=torch.bfloat16, generator=g)
               / width**0.5 for _ in range(4)]
    state = {"x": x, "out": None}
    index = torch.arange(rows, device=DEVICE)

    def step() -> None:
        h = state["x"].index_select(0, index)  # the first kernel, as the decode graph's gather
        for i in range(kernels - 1):
            h = h @ weights[i % 4] if i % 2 == 0 else h + 1e-3
        state["out"] = h

    return step, state


def eager_kernels(rows: int, n: int) -> Callable[[], None]:
    """`n` small kernels on a row-sized tensor (the sampler's and the input updates' kind)."""
    a = torch.zeros(rows, device=DEVICE, dtype=torch.int64)

    def run() -> None:
        for _ in range(n):
            a.add_(1)

    return run


def capture(step: Callable[[], None], pool: Any = None) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph


def timed(fn: Callable[[], None], steps: int) -> float:
    """Milliseconds a call, over `steps` calls after a warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def loop(graphs: list[torch.cuda.CUDAGraph], before: Callable[[], None],
         after: Callable[[], None], wait: bool) -> Callable[[], None]:
    """One decode-loop step: input updates, a replay, the sampler, an event the host waits on
    one step later."""
    turn = [0]
    last: list[Any] = [None]

    def run() -> None:
        before()
        graphs[turn[0] % len(graphs)].replay()
        turn[0] += 1
        if wait and last[0] is not None:
            last[0].synchronize()  # the previous step's draw, while this step runs
        after()
        event = torch.cuda.Event()
        event.record()
        last[0] = event

    return run


def case(kernels: int, rows: int, width: int, steps: int) -> dict[str, Any]:
    step, _ = build_step(kernels, rows, width)
    pool = torch.cuda.graph_pool_handle()
    one = capture(step, pool)
    two = capture(step, pool)
    before, after = eager_kernels(rows, 6), eager_kernels(rows, 30)
    out: dict[str, Any] = {"kernels": kernels, "rows": rows, "width": width, "steps": steps}
    out["graph-only"] = timed(one.replay, steps)
    out["eager-only"] = timed(lambda: (before(), after()), steps)
    out["one-graph"] = timed(loop([one], before, after, True), steps)
    out["two-graphs"] = timed(loop([one, two], before, after, True), steps)
    out["queued"] = timed(loop([one], before, after, False), steps)
    out["one-graph again"] = timed(loop([one], before, after, True), steps)
    base = out["graph-only"] + out["eager-only"]
    out["idle_ms"] = {k: out[k] - base for k in ("one-graph", "two-graphs", "queued",
                                                 "one-graph again")}
    out["vs_queued_ms"] = {k: out[k] - out["queued"] for k in ("one-graph", "two-graphs",
                                                              "one-graph again")}
    print(f"{kernels:>5} kernels, [{rows} x {width}]: graph {out['graph-only']:.3f} ms, "
          f"eager {out['eager-only']:.3f} ms; idle a step: "
          + ", ".join(f"{k} {v * 1e3:.0f} us" for k, v in out["idle_ms"].items())
          + "; against queued: "
          + ", ".join(f"{k} {v * 1e3:+.0f} us" for k, v in out["vs_queued_ms"].items()),
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_graph_gap needs a CUDA GPU")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "cases": []}
    print(results["device"], flush=True)
    # about 1,100 kernels of ~35 us (the decode step's count and time), then 275 of ~4x longer
    for kernels, width in ((1100, 4096), (276, 8192), (1100, 2048)):
        results["cases"].append(case(kernels, args.rows, width, args.steps))
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
