"""Where the continuous-batching loop's time goes, for the full-layer bench (bench_generate.py
--phases): each phase of Refill (prefill, admitting rows, harvesting, handing units over,
drawing) and the decoder's step, timed on the host and on the GPU's stream, and a profiler
window of a few steps mid-run that lists the kernels of a step.

CUDA events bracket each call in stream order. For a phase that launches GPU work (the step,
the draw, a prefill) the pair measures that work; for a phase that runs on the host alone (the
store write of a finished unit, harvesting) it measures how long the GPU waited for the host,
because the end event is recorded only when the host is done. The loop's own bookkeeping
between phases (the one sync a step) is what the phases leave of the run's wall time.
"""

import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

# (module attribute path, method, phase name); the refill module and the decoder class are
# looked up when installed, so a checkout without them is timed without those phases.
PHASES = [
    ("patchdb.generate.unit_queue:UnitQueue", "prefill", "prefill"),
    ("patchdb.generate.refill:Refill", "_prefill", "prefill"),  # before unit_queue.py
    ("patchdb.generate.refill:Refill", "_admit", "admit (prefill included)"),
    ("patchdb.generate.refill:Refill", "_harvest", "harvest"),
    ("patchdb.generate.refill:Refill", "_flush", "hand units over (store writes)"),
    ("patchdb.generate.refill:Refill", "_draw", "draw (sampler)"),
    ("patchdb.generate.refill:Refill", "_shrink", "shrink"),
    ("patchdb.generate.refill:Refill", "_wait", "host waits for the last draw"),
    ("patchdb.generate.graphed:GraphedDecoder", "step", "decode step (graph replay)"),
]

KERNEL_KINDS = [  # first match wins
    ("attention", re.compile(r"_decode_kernel|flash|fmha|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|splitK|cublas", re.I)),
    ("sampler", re.compile(r"topk|sort|radix|scan|cumsum|searchsorted|bitonic|softmax", re.I)),
    ("fused (compiled)", re.compile(r"^triton_", re.I)),
]


def _lookup(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        mod = __import__(module, fromlist=[name])
    except ImportError:
        return None
    return getattr(mod, name, None)


class PhaseClock:
    """Install with `install()`, run the stage, then `report()` (after a sync)."""

    def __init__(self, window_at: int = 350, window_steps: int = 3,
                 activity: Any = None) -> None:
        # what the profiler records: the GPU's kernels (CPU ops in the CPU tests)
        self.activity = activity if activity is not None else torch.profiler.ProfilerActivity.CUDA
        self.events: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
        self.host: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.window_at, self.window_steps = window_at, window_steps
        self.window_s = 0.0
        self.kernels: dict[str, float] = {}  # kernel name -> GPU microseconds in the window
        self._prof: Any = None
        self._window_t0 = 0.0
        self._restore: list[tuple[Any, str, Callable[..., Any]]] = []
        self.run_wall = 0.0
        self.gaps: dict[str, Any] = {}

    def install(self) -> None:
        for path, method, label in PHASES:
            owner = _lookup(path)
            if owner is None or not hasattr(owner, method):
                continue
            real = getattr(owner, method)
            self._restore.append((owner, method, real))
            setattr(owner, method, self._timed(real, label, method == "step"))
        refill = _lookup("patchdb.generate.refill:Refill")
        if refill is not None:
            real_run = refill.run
            self._restore.append((refill, "run", real_run))
            clock = self

            def run(self_: Any) -> None:
                t0 = time.perf_counter()
                try:
                    real_run(self_)
                finally:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    clock.run_wall += time.perf_counter() - t0

            refill.run = run

    def uninstall(self) -> None:
        for owner, method, real in reversed(self._restore):
            setattr(owner, method, real)
        self._restore.clear()

    def _timed(self, real: Callable[..., Any], label: str, is_step: bool) -> Callable[..., Any]:
        clock = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if is_step:
                clock._window()
            cuda = torch.cuda.is_available()
            start = torch.cuda.Event(enable_timing=True) if cuda else None
            end = torch.cuda.Event(enable_timing=True) if cuda else None
            if start is not None:
                start.record()
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                if end is not None:
                    end.record()
                clock.host[label] += time.perf_counter() - t0
                clock.events[label].append((start, end))

        return timed

    def _window(self) -> None:
        """Open the profiler before step window_at and record the window_steps steps after it;
        close it after them. Step window_at itself is a warm-up the profiler does not keep: the
        sync before opening empties the GPU's queue, so that step starts only once the host has
        launched it, an idle gap no other step has (the host is otherwise a step ahead)."""
        self.steps += 1
        if self.steps == self.window_at:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._window_t0 = time.perf_counter()
            self._prof = torch.profiler.profile(
                activities=[self.activity],
                schedule=torch.profiler.schedule(wait=0, warmup=1, active=self.window_steps,
                                                 repeat=1),
                on_trace_ready=self._read_window)
            self._prof.__enter__()
        elif self._prof is not None:
            last = self.steps == self.window_at + 1 + self.window_steps
            if last and torch.cuda.is_available():
                torch.cuda.synchronize()  # the last recorded step's kernels have all run
            self._prof.step()
            if last:
                self._prof.__exit__(None, None, None)
                self._prof = None
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.window_s += time.perf_counter() - self._window_t0

    def _read_window(self, prof: Any) -> None:
        kind = str(self.activity).rpartition(".")[2].lower()
        for avg in prof.key_averages():
            total = (avg.self_device_time_total if kind == "cuda"
                     else getattr(avg, "self_cpu_time_total", 0))
            if total > 0 and kind in str(avg.device_type).lower():
                self.kernels[avg.key] = total / self.window_steps
        self.gaps = gap_report(prof.events(), self.window_steps, kind)

    def report(self) -> dict[str, Any]:
        """Per phase: calls, host seconds, GPU-stream seconds; the kernels of one step by kind
        and the 20 largest (microseconds a step, from the profiler window)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        phases: dict[str, Any] = {}
        for label, pairs in self.events.items():
            times = sorted(s.elapsed_time(e) for s, e in pairs if s is not None)
            # the median call: a step's sum includes the first steps' compile and graph capture
            median = times[len(times) // 2] if times else 0.0
            phases[label] = {"calls": len(pairs), "host_s": round(self.host[label], 3),
                             "gpu_s": round(sum(times) / 1e3, 3), "gpu_ms_median": round(median, 3)}
        kinds: dict[str, float] = defaultdict(float)
        for name, us in self.kernels.items():
            kind = next((k for k, rx in KERNEL_KINDS if rx.search(name)), "other")
            kinds[kind] += us
        top = sorted(self.kernels.items(), key=lambda kv: -kv[1])[:20]
        return {"run_wall_s": round(self.run_wall, 3), "profiler_window_s": round(self.window_s, 3),
                "steps": self.steps, "phases": phases,
                "step_kernels_us": {k: round(v, 1) for k, v in sorted(kinds.items())},
                "step_kernels_total_us": round(sum(self.kernels.values()), 1),
                "top_kernels_us": [[name[:90], round(us, 1)] for name, us in top],
                "gaps_per_step": self.gaps}


GAP_BUCKETS_US = (5.0, 50.0)  # under 5 us: a kernel launch inside a graph; 50 us and over: a wait
# outside the graph's kernels (the GPU waiting for the host). Before the window had a warm-up
# step, its first step showed one such gap of 0.2-1.6 ms before the graph: the opening sync had
# emptied the queue, and the GPU waited for the host to launch the graph.


def gap_report(events: Any, steps: int, kind: str = "cuda") -> dict[str, Any]:
    """Per step, from the profiler window's GPU events: how long the GPU ran something (busy),
    and its idle time between one event's end and the next one's start, by the gap's length.
    Small gaps are launch latency between kernels of one graph; long ones, the GPU waiting for
    the host. The profiler's own overhead shows up here too, so compare runs with each other,
    not with the step time measured without it."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if kind in str(e.device_type).lower() and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    busy = 0.0
    gaps = [0.0] * (len(GAP_BUCKETS_US) + 1)
    counts = [0] * len(gaps)
    longest: list[tuple[float, str, str]] = []  # (gap, the event before it, the one after)
    start, end, last = spans[0]
    for s, e, name in spans[1:]:
        if s > end:
            busy += end - start
            bucket = sum(s - end >= b for b in GAP_BUCKETS_US)
            gaps[bucket] += s - end
            counts[bucket] += 1
            if s - end >= GAP_BUCKETS_US[-1]:
                longest.append((s - end, last, name))
            start, end = s, e
        elif e > end:
            end = e
        if e >= end:
            last = name
    busy += end - start
    low, high = GAP_BUCKETS_US
    names = [f"under {low:g} us", f"{low:g} to {high:g} us", f"{high:g} us and over"]
    return {"busy_us": round(busy / steps, 1),
            "span_us": round((end - spans[0][0]) / steps, 1),
            "idle_us": {n: round(g / steps, 1) for n, g in zip(names, gaps, strict=True)},
            "idle_count": {n: round(c / steps, 1) for n, c in zip(names, counts, strict=True)},
            # where the GPU waited longest: what ran before each gap and what ended it
            "longest_gaps": [[round(g, 1), before[:60], after[:60]]
                             for g, before, after in sorted(longest, reverse=True)[:6]]}


def print_report(name: str, report: dict[str, Any]) -> None:
    print(f"[{name}] phases over {report['run_wall_s']:.1f} s of the decode loop "
          f"({report['steps']} steps; profiler window {report['profiler_window_s']:.1f} s):",
          flush=True)
    for label, p in report["phases"].items():
        print(f"  {label}: {p['calls']} calls, host {p['host_s']:.2f} s, GPU stream "
              f"{p['gpu_s']:.2f} s (median call {p.get('gpu_ms_median', 0.0):.2f} ms)", flush=True)
    if report["step_kernels_us"]:
        kinds = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in report["step_kernels_us"].items())
        print(f"  one step's kernels (ms): {kinds}; total "
              f"{report['step_kernels_total_us'] / 1e3:.2f}", flush=True)
        for kname, us in report["top_kernels_us"][:12]:
            print(f"    {us / 1e3:7.3f} ms  {kname}", flush=True)
    gaps = report.get("gaps_per_step")
    if gaps:
        idle = ", ".join(f"{k} {v / 1e3:.2f} ms ({gaps['idle_count'][k]:.0f})"
                         for k, v in gaps["idle_us"].items())
        print(f"  a step on the GPU (profiled): busy {gaps['busy_us'] / 1e3:.2f} ms of "
              f"{gaps['span_us'] / 1e3:.2f}; idle gaps {idle}", flush=True)
        for gap, before, after in gaps.get("longest_gaps", []):
            print(f"    idle {gap:7.1f} us after {before} before {after}", flush=True)
