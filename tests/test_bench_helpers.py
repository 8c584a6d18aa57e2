"""The full-layer bench's bookkeeping (scripts/full_layer_runs.py, scripts/phases.py): the
figures quoted in docs/performance.md come from these functions, so their arithmetic is
checked here on hand-made inputs whose answers are worked out in the comments."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from full_layer_runs import (  # noqa: E402
    FULL_SWEEP_ROLLOUTS,
    answer_spread,
    changes,
    differing_rows,
    diverse_answers,
    experiment_name,
    one_drain_minutes,
    run_context,
    run_specs,
    summarize_full_layer,
    uniform_base,
    without_changes,
    without_window,
)
from phases import PhaseClock, gap_report  # noqa: E402

from patchdb.generate import refill, sampling, triton_decode  # noqa: E402
from patchdb.generate.triton_decode import Tuning  # noqa: E402


def test_runs_parse_kinds_and_fixed_rows() -> None:
    assert run_specs("defaults,defaults@384,stop-refill", 400) == [
        ("defaults", "defaults", 400), ("defaults@384", "defaults", 384),
        ("stop-refill", "stop-refill", 400)]
    assert run_specs("compile-off", None) == [("compile-off", "compile-off", None)]


def test_runs_carry_changes_and_name_their_experiments() -> None:
    runs = "defaults-diverse+attn=16-16-2-4+topk=64@512,defaults-diverse+topk=0"
    assert run_specs(runs, None) == [
        ("defaults-diverse+attn=16-16-2-4+topk=64@512", "defaults-diverse", 512),
        ("defaults-diverse+topk=0", "defaults-diverse", None)]
    assert changes("defaults+attn=8-32-2-2+topk=32") == [("attn", Tuning(8, 32, 2, 2)),
                                                         ("topk", 32)]
    assert changes("defaults") == []
    assert experiment_name("gemma3-27b", "defaults+attn=16-16-2-4@384") == \
        "gemma3-27b-defaults-attn-16-16-2-4-at-384"
    assert experiment_name("s", "compile-off") == "s-compile-off"


def test_run_context_sets_and_restores_the_changes() -> None:
    before_tuning, before_slices = triton_decode.DEFAULT, sampling.TOPK_SLICES
    with run_context("defaults+attn=8-16-2-4+topk=64@100", None):
        assert triton_decode.DEFAULT == Tuning(8, 16, 2, 4)
        assert sampling.TOPK_SLICES == 64
    assert (triton_decode.DEFAULT, sampling.TOPK_SLICES) == (before_tuning, before_slices)


def test_run_context_switches_the_draw_and_prefill_back_and_restores_them() -> None:
    assert changes("defaults+draw=triton+prefill=burst") == [("draw", "triton"),
                                                             ("prefill", "burst")]
    before = (sampling.SLICE_KERNELS, refill.PREFILLS_PER_STEP, refill.TOP_UP_BELOW)
    assert before == (False, 1, 2)
    with run_context("defaults+draw=triton+prefill=burst@100", None):
        assert sampling.SLICE_KERNELS is True
        assert (refill.PREFILLS_PER_STEP, refill.TOP_UP_BELOW) == (None, 1)
    assert (sampling.SLICE_KERNELS, refill.PREFILLS_PER_STEP, refill.TOP_UP_BELOW) == before
    with run_context("defaults+draw=torch", None):
        assert sampling.SLICE_KERNELS is False and refill.PREFILLS_PER_STEP == 1
    assert triton_decode.PREFIX is None
    with run_context("defaults+prefix=64-2@1464", None):
        assert triton_decode.PREFIX == (64, 2)
    assert triton_decode.PREFIX is None


@pytest.mark.parametrize("runs", ["defaults,nonsense", "defaults@0", "defaults@x",
                                  "defaults,defaults", "defaults@", "@384", "defaults+attn=1-2-3",
                                  "defaults+attn=16-0-2-3", "defaults+attn=16-64-4-2-1",
                                  "defaults+topk=x", "defaults+fast", "defaults+draw=cuda",
                                  "defaults+prefill=1", "defaults+draw", "defaults+prefix=24-1",
                                  "defaults+prefix=64-0", "defaults+prefix=64",
                                  "nonsense+topk=4"])
def test_runs_reject_what_they_do_not_know(runs: str) -> None:
    with pytest.raises(ValueError):
        run_specs(runs, None)


def test_answer_spread() -> None:
    # unit A: 2 distinct of 4 samples; unit B: 1 of 2. Answers: "a b a b" 2/4 distinct words,
    # "c" 1/1, "a a" 1/2, "d e" 2/2, "x" 1/1, "x" 1/1.
    unit_a, unit_b = ("e", 40, "w", "t"), ("e", 40, "w", "u")
    answers = {(*unit_a, 0): ("a b a b", 0, 0), (*unit_a, 1): ("a b a b", 0, 0),
               (*unit_a, 2): ("c", 0, 0), (*unit_a, 3): ("a a", 0, 0),
               (*unit_b, 0): ("x", 0, 0), (*unit_b, 1): ("x", 0, 0)}
    spread = answer_spread(answers)
    assert spread["distinct_fraction"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    words = [0.5, 0.5, 1.0, 0.5, 1.0, 1.0]
    assert spread["distinct_words_fraction"] == pytest.approx(sum(words) / len(words))


def test_without_window_takes_the_profiled_steps_out() -> None:
    run = {"wall_s": 110.0, "tokens": 1000, "setup_s": 10.0, "tok_s_before_drain": 1.0,
           "refill_stats": [{"drain_tokens": 200, "drain_s": 20.0}]}
    without_window(run, 10.0)
    assert run["wall_s"] == 100.0
    assert run["tok_s"] == pytest.approx(10.0)
    assert run["tok_s_steady"] == pytest.approx(1000 / 90)
    assert run["tok_s_before_drain"] == pytest.approx(800 / 70)


def test_one_drain_projection() -> None:
    run = {"tok_s_before_drain": 100.0, "setup_s": 30.0,
           "refill_stats": [{"drain_tokens": 1000, "drain_s": 60.0}]}
    # (10,000 - 1,000) tokens at 100 a second, then set-up and the drain once: 90 + 30 + 60 s
    assert one_drain_minutes(run, 10_000) == pytest.approx(3.0)
    assert one_drain_minutes({**run, "refill_stats": []}, 10_000) is None
    assert one_drain_minutes({**run, "tok_s_before_drain": None}, 10_000) is None


def test_differing_rows_counts_keys_both_runs_hold() -> None:
    a = {1: "x", 2: "y", 3: "z"}
    b = {1: "x", 2: "Y", 4: "w"}
    out = differing_rows({"defaults": a, "compile-off": b, "defaults@384": {1: "q"}})
    assert out["defaults vs compile-off"] == {"rows": 2, "differ": 1}
    assert out["defaults vs defaults@384"] == {"rows": 1, "differ": 1}
    assert "stop-refill vs stop-shrink" not in out


def test_runs_with_changes_pair_with_the_same_run_without_them() -> None:
    assert without_changes("defaults+attn=8-32-2-2@381") == "defaults@381"
    assert without_changes("stop-refill+topk=64") == "stop-refill"
    assert uniform_base("stop-refill-diverse+topk=64@381") == "defaults-diverse+topk=64@381"
    assert uniform_base("stop-paged@400") == "defaults@400"
    out = differing_rows({"defaults@381": {1: "x", 2: "y"},
                          "defaults+attn=8-32-2-2@381": {1: "x", 2: "z"}})
    assert out == {"defaults@381 vs defaults+attn=8-32-2-2@381": {"rows": 2, "differ": 1}}


def test_diverse_answers_restores_the_embedding_bit_for_bit() -> None:
    embedding = torch.nn.Embedding(64, 16, dtype=torch.bfloat16)
    model = SimpleNamespace(get_input_embeddings=lambda: embedding)
    before = embedding.weight.detach().clone()
    with diverse_answers(model):
        assert torch.equal(embedding.weight, before * 0.5)
    assert torch.equal(embedding.weight, before)
    with pytest.raises(RuntimeError), diverse_answers(model):
        raise RuntimeError("a run that fails still restores the weights")
    assert torch.equal(embedding.weight, before)


def _run(tok_s_steady: float, setup_s: float, before: float | None = None) -> dict[str, object]:
    return {"tok_s_steady": tok_s_steady, "tok_s": tok_s_steady, "setup_s": setup_s,
            "batch_size": 384, "rollouts": 11264, "peak_reserved_gib": 72.0, "card_gib": 80.0,
            "tok_s_before_drain": before}


def test_summary_projects_the_full_sweep_and_the_early_stop_ratio() -> None:
    results = {"new_tokens": 100, "full_layer": {"runs": {
        "defaults": _run(10_000.0, 60.0, 10_400.0),
        "stop-refill": _run(9_000.0, 60.0, 9_880.0),
        "defaults-diverse": _run(8_000.0, 60.0),
        "stop-refill-diverse": _run(7_600.0, 60.0),
        "defaults+topk=8@381": _run(5_000.0, 60.0),
        "stop-refill+topk=8@381": _run(4_000.0, 60.0),
        "stop-keep@381": _run(4_000.0, 60.0)}}}
    weights, flops = 27_000_000_000, 1e15
    summarize_full_layer(results, weights, flops)
    out = results["full_layer"]
    tokens = FULL_SWEEP_ROLLOUTS * 100
    assert out["full_sweep_tokens"] == tokens
    assert out["compute_floor_min"] == pytest.approx(tokens * 2 * weights / flops / 60)
    runs = out["runs"]
    assert runs["defaults"]["projected_full_sweep_min"] == pytest.approx((tokens / 10_000 + 60) / 60)
    assert runs["stop-refill"]["of_uniform_rate"] == pytest.approx(0.9)
    assert runs["stop-refill"]["of_uniform_rate_before_drain"] == pytest.approx(0.95)
    # a -diverse early-stop run is compared with defaults-diverse, not with defaults
    assert runs["stop-refill-diverse"]["of_uniform_rate"] == pytest.approx(0.95)
    # runs with changes or rows pair with the uniform run of the same changes and rows
    assert runs["stop-refill+topk=8@381"]["of_uniform_rate"] == pytest.approx(0.8)
    assert "of_uniform_rate" not in runs["stop-keep@381"]  # no defaults@381 ran
    assert runs["defaults"]["floor_fraction"] == pytest.approx(
        out["compute_floor_min"] / runs["defaults"]["projected_full_sweep_min"])


def _event(start: float, end: float, name: str) -> SimpleNamespace:
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name,
                           device_type="DeviceType.CUDA")


def test_gap_report_buckets_idle_time_between_kernels() -> None:
    events = [_event(0, 10, "a"), _event(12, 20, "b"),  # 2 us: a launch inside a graph
              _event(15, 18, "inside b"),  # overlaps b: no gap
              _event(40, 50, "c"),  # 20 us
              _event(150, 160, "graph start"),  # 100 us: a long wait
              SimpleNamespace(time_range=SimpleNamespace(start=0, end=500), name="host",
                              device_type="DeviceType.CPU")]  # not the GPU's: left out
    report = gap_report(events, steps=2)
    assert report["busy_us"] == pytest.approx((10 + 8 + 10 + 10) / 2)
    assert report["span_us"] == pytest.approx(160 / 2)
    assert report["idle_us"] == {"under 5 us": 1.0, "5 to 50 us": 10.0, "50 us and over": 50.0}
    assert report["idle_count"] == {"under 5 us": 0.5, "5 to 50 us": 0.5, "50 us and over": 0.5}
    assert report["longest_gaps"] == [[100.0, "c", "graph start"]]
    assert gap_report([], steps=1) == {}


class _Timed:
    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, end: object) -> float:
        return self.ms


def test_phase_report_gives_the_median_call_beside_the_sum() -> None:
    clock = PhaseClock()
    # the first step compiles and captures (900 ms); the others take about 40 ms
    for ms in (900.0, 40.0, 41.0, 39.0, 40.5):
        clock.events["decode step (graph replay)"].append((_Timed(ms), None))
    clock.host["decode step (graph replay)"] = 0.25
    phase = clock.report()["phases"]["decode step (graph replay)"]
    assert phase["calls"] == 5
    assert phase["gpu_s"] == pytest.approx(1.0605, abs=1e-3)  # rounded to the millisecond
    assert phase["gpu_ms_median"] == pytest.approx(40.5)
    assert phase["host_s"] == 0.25


def test_sampler_bench_times_each_top_k_and_finds_no_token_that_differs() -> None:
    from sampler_times import sampler_times

    out = sampler_times("cpu", rows=4, vocab=40_000, repeats=1)
    assert set(out["topk_slices"]) == {"0", "512", "1024", "2048", "4096", "8192"}
    assert set(out["topk_slices_torch"]) == {"1024"}
    for slices in [*out["topk_slices"].values(), *out["topk_slices_torch"].values()]:
        assert slices["tokens"] == 16 and slices["tokens_differ"] == 0
        assert slices["draw_ms"] > 0 and slices["select_ms"] > 0


def test_the_profiler_window_keeps_only_the_steps_after_its_warm_up() -> None:
    """Steps 1-2 before the window, step 3 its warm-up (after the sync that opens it: not kept),
    steps 4-5 recorded, steps 6-7 after it; each step runs an op of its own kind."""
    clock = PhaseClock(window_at=3, window_steps=2, activity=torch.profiler.ProfilerActivity.CPU)
    a = torch.randn(32, 32)
    for step in range(1, 8):
        clock._window()
        op = torch.tan if step < 3 else torch.cos if step == 3 else (
            torch.sin if step <= 5 else torch.exp)
        for _ in range(step):
            op(a)
    names = set(clock.kernels)
    assert "aten::sin" in names
    assert not names & {"aten::tan", "aten::cos", "aten::exp"}
    assert clock._prof is None and clock.window_s > 0
    assert clock.gaps["busy_us"] > 0


def test_pick_changes_takes_only_clear_wins_that_draw_the_same() -> None:
    from pick_changes import parse_shape, pick_attention, pick_topk, shape_name

    default = shape_name(triton_decode.DEFAULT)
    assert shape_name(Tuning(16, 64, 4, 2)) == "16,64,4,2"
    assert parse_shape(shape_name(Tuning(16, 64, 4, 2))) == Tuning(16, 64, 4, 2)  # reads it back
    assert parse_shape("8-32-2-2", "-") == Tuning(8, 32, 2, 2)
    for bad in ("16,32", "16,0,2,3", "16,32,2,3,1", "a,b,c,d", ""):
        with pytest.raises(ValueError):
            parse_shape(bad)
    ragged = "ragged (stop model)"
    batch = {"step_layout": [
        {"case": "all 50", "tuning": "8,16,2,4", "us": 10.0, "max_diff_vs_first": 0.0},
        {"case": ragged, "tuning": default, "us": 100.0, "max_diff_vs_first": 0.0},
        {"case": ragged, "tuning": "16,16,2,4", "us": 90.0, "max_diff_vs_first": 1e-3},
        {"case": ragged, "tuning": "8,32,2,2", "us": 80.0, "max_diff_vs_first": 0.5}]}
    # 8,32,2,2 is fastest but its output differs; 16,16,2,4 is 10% faster: taken at a 5% margin
    assert pick_attention(batch, 0.05) == "+attn=16-16-2-4"
    assert pick_attention(batch, 0.15) == ""
    assert pick_attention({"step_layout": []}, 0.05) == ""
    base = str(sampling.TOPK_SLICES)
    splits = {base: {"draw_ms": 3.0, "tokens_differ": 0},
              "9991": {"draw_ms": 1.0, "tokens_differ": 2},
              "9992": {"draw_ms": 2.0, "tokens_differ": 0}}
    assert pick_topk({"topk_slices": splits}, 0.05) == "+topk=9992"
    assert pick_topk({"topk_slices": splits}, 0.5) == ""
    assert pick_topk({}, 0.05) == ""


@pytest.mark.parametrize("script, args", [
    ("compile_kernel.py", ["--tuning", "16,0,2,3"]),
    ("probe_batch.py", ["--rows", "8", "--tunings", "16,32,2,3;16,32"]),
])
def test_scripts_refuse_a_launch_shape_they_cannot_read(script: str, args: list[str]) -> None:
    import subprocess

    path = Path(__file__).resolve().parents[1] / "scripts" / script
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: --tuning")
