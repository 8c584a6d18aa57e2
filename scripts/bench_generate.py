"""Generate throughput on one GPU: today's per-key loop (a) against patchdb's generate stage (b).

Builds a random-init model of a real shape (default: Gemma-3-27B's text stack in bf16; no
weights are downloaded, and throughput does not depend on weight values), then runs, on the same
keys and layers, with EOS disabled:

  (a) the reference loop users run today: for each key at each layer, a 64-row source forward
      pass recording MLP outputs, then a 64-row HF `generate` with steering and patch hooks;
  (b) patchdb's generate stage, writing rollouts to a SQLite store.

It prints rollout tokens per second, decode-step time, peak memory, the fraction of the memory
roofline (weights + KV bytes read per decode step over the copy bandwidth measured here), the
compute floor (the step's FLOPs over the bf16 matmul rate measured here; at large batches the step
is bound by arithmetic, not reads), and warm-up time for each, then the ratio (b)/(a), and writes
a JSON results file.

    python scripts/bench_generate.py --shape gemma3-27b --out results.json

`--full-layer` is the headline run instead: the default sweep's units on its first patch layer
(176 units x 64 samples x 100 tokens), the stage with its defaults, with and without compiling,
and with answers that end early (EOS forced at lengths drawn per seed: stop_model.py) with
and without moving finished rows out of the step, plus the per-key loop on a few units; it
prints tok/s, set-up, the projected full sweep, the speed-up over the loop, the fraction of the
compute floor and peak memory:

    python scripts/bench_generate.py --full-layer --out full_layer.json
"""

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from clocks import ClockLog  # noqa: E402
from full_layer_runs import (  # noqa: E402
    FULL_LAYER_RUNS,
    answer_spread,
    differing_rows,
    experiment_name,
    run_context,
    run_specs,
    summarize_full_layer,
    without_window,
)
from phases import PhaseClock, print_report  # noqa: E402
from sampler_times import sampler_times, sync  # noqa: E402
from stage_run import run_stage  # noqa: E402
from stop_model import STOP_CAPPED, STOP_MEDIAN, STOP_SIGMA, answer_lengths, length_counts  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # google/gemma-3-27b-it text config
    "gemma3-27b": dict(family="gemma3", vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                       num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
                       head_dim=128, sliding_window=1024),
    # meta-llama/Llama-3.1-8B-Instruct
    "llama-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    # a small Gemma-3 shape, for float32 equivalence checks on a GPU
    "gemma3-small": dict(family="gemma3", vocab_size=262208, hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=128, sliding_window=1024),
    # a small shape to check the script on a CPU
    "tiny": dict(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


# The sampling settings of google/gemma-3-27b-it's generation config, given to the random-init
# Gemma shapes so the stage samples as it would for the real model.
GEMMA_SAMPLING = {"top_k": 64, "top_p": 0.95}


def build_model(shape: str, device: str, dtype: torch.dtype) -> Any:
    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    if family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config: Any = Gemma3TextConfig(**spec, max_position_embeddings=4096)
        cls: Any = Gemma3ForCausalLM
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**spec, max_position_embeddings=4096)
        cls = LlamaForCausalLM
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy, counting read plus write."""
    if not device.startswith("cuda"):
        return float("nan")
    n = 1 << 30  # 2 GiB of bf16
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / sorted(times)[len(times) // 2]


@dataclass
class Work:
    prompt_ids: list[int]
    injection_start: int
    steer_layer: int
    layers: list[int]
    keys: list[tuple[int, int]]  # (source vector index, target vector index)
    samples: int
    new_tokens: int
    vectors: torch.Tensor  # [n_words, hidden]


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    c: Any = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim(c) * 2


def full_weights(model: Any) -> list[torch.nn.Parameter]:
    """The weights one decode step reads in full: all but an input embedding table that is not
    also the output head (a step reads one row of it per token)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    return [p for p in model.parameters() if tied or p is not embed]


def weight_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads in full."""
    return sum(p.numel() * p.element_size() for p in full_weights(model))


def matmul_flops(device: str) -> float:
    """Dense bf16 FLOP/s of an 8192^3 matrix product on this card (median of ten)."""
    if not device.startswith("cuda"):
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / sorted(times)[len(times) // 2]


def compute_step_s(model: Any, rows: int, context: int, flops: float) -> float:
    """Fewest seconds a decode step's arithmetic takes at the measured matmul rate: 2 FLOPs per
    weight read in full per row, plus attention scores and values over the context."""
    weights = sum(p.numel() for p in full_weights(model))
    c = model.config
    attention = 4 * c.num_hidden_layers * c.num_attention_heads * head_dim(c) * context
    return rows * (2 * weights + attention) / flops


def roofline_step_s(model: torch.nn.Module, rows: int, context: int, bandwidth: float,
                    shared: int = 0) -> float:
    """Fewest bytes a decode step must read (all weights, every row's KV; a shared prefix of
    `shared` positions once) over bandwidth."""
    tokens = shared + rows * (context - shared)
    return (weight_bytes(model) + tokens * kv_bytes_per_token(model)) / bandwidth


# ---------------------------------------------------------------- (a) the reference loop

def reference_loop(model: Any, work: Work, device: str, timing: dict[str, float]) -> int:
    """What users do today: per key per layer, a 64-row source forward then a 64-row generate."""
    from patchdb.generate.layers import find_layers

    layer_map = find_layers(model)
    start = work.injection_start
    n_prompt = len(work.prompt_ids)
    ids = torch.tensor([work.prompt_ids] * work.samples, device=device)
    tokens = 0
    state: dict[str, Any] = {}

    def steer_hook(module: Any, args: Any, output: Any) -> Any:
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        vec = state["steer"]
        if vec is None:
            return output
        if hidden.shape[1] > 1:
            hidden = hidden.clone()
            hidden[:, start:] += vec
        else:
            hidden = hidden + vec
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    def record_hook(layer: int) -> Any:
        def hook(module: Any, args: Any, output: torch.Tensor) -> None:
            if state.get("record"):
                state["acts"][layer] = output[:, start:].clone()
        return hook

    def patch_hook(layer: int) -> Any:
        def hook(module: Any, args: Any, output: torch.Tensor) -> Any:
            if state.get("patch_layer") == layer and output.shape[1] == n_prompt:
                output = output.clone()
                output[:, start:] = state["acts"][layer]
            return output
        return hook

    handles = [layer_map.layers[work.steer_layer].register_forward_hook(steer_hook)]
    for i in range(len(layer_map.mlps)):
        handles.append(layer_map.mlps[i].register_forward_hook(record_hook(i)))
        handles.append(layer_map.mlps[i].register_forward_hook(patch_hook(i)))
    try:
        with torch.inference_mode():
            for layer in work.layers:
                for src, tgt in work.keys:
                    state.update(steer=work.vectors[src], record=True, acts={}, patch_layer=None)
                    model(input_ids=ids)
                    state.update(steer=work.vectors[tgt], record=False, patch_layer=layer)
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                         max_new_tokens=work.new_tokens,
                                         min_new_tokens=work.new_tokens, pad_token_id=0)
                    tokens += (out.shape[1] - n_prompt) * out.shape[0]
    finally:
        for h in handles:
            h.remove()
    sync(device)
    return tokens


def reference_step_time(model: Any, work: Work, device: str) -> float:
    """Decode-step time of plain HF generate at 64 rows: (t(1+N) - t(1)) / N."""
    ids = torch.tensor([work.prompt_ids] * work.samples, device=device)

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    run(2)
    n = min(work.new_tokens, 50)
    return (run(1 + n) - run(1)) / n


# ---------------------------------------------------------------- (b) patchdb's generate stage

def bench_config(shape: str, n_layers: int, samples: int, new_tokens: int) -> str:
    """A sweep of 2 layers x 8 pair keys (2 sources x 4 targets), scaled to the model's depth."""
    steer = min(round(n_layers * 38 / 62), n_layers - 4)
    first = steer + 2
    return f"""
[sweep]
name = "bench-{shape}"
model = "random-init-{shape}"
dtype = "bfloat16"
steer_layer = {steer}
strength = 4.0
patch_layers = "{first}-{first + 1}"
samples = {samples}
max_new_tokens = {new_tokens}
temperature = 1.0
positive_words = ["Bread", "Trees", "Origami", "Volcanoes"]
negative_words = ["Dust", "Milk"]
experiments = ["failure_to_success"]
"""


def set_drawn(decoder: Any, drawn: int) -> None:
    """Put every row of a graphed decoder at `drawn` tokens drawn (to time steps at a chosen
    length): its own prompt and the drawn - 1 tokens fed so far are attended to."""
    decoder.drawn.fill_(drawn)
    decoder.mask.fill_(False)
    decoder.mask[..., :decoder.prompt_slots + drawn - 1] = True


@torch.inference_mode()
def engine_step_time(model: Any, work: Work, device: str, rows: int,
                     compile_decode: bool = False, share_prefix: bool = False,
                     full_softmax: list[float] | None = None) -> float:
    """Decode-step time of patchdb's engine at exactly `rows` rows: the graphed step plus the
    sampler (as the stage resolves it for this model), timed over 50 steps on a decoder already
    captured (and compiled) by a first run. Given a list, `full_softmax` also gets the same step
    with the full-softmax sampler (no top-k/top-p), timed on the same decoder."""
    from patchdb.generate.engine import Engine, TargetUnit
    from patchdb.generate.layers import find_layers
    from patchdb.generate.sampling import Sampling, choose_tokens, resolve_sampling

    sampling = resolve_sampling(model.generation_config, 1.0, None, None)

    engine = Engine(model, find_layers(model), work.prompt_ids, work.injection_start,
                    work.steer_layer, [], graph_rows=rows, compile_decode=compile_decode,
                    share_prefix=share_prefix)
    n_patch = len(work.prompt_ids) - work.injection_start
    hidden = work.vectors.shape[1]
    units = [TargetUnit(steer=work.vectors[i % len(work.vectors)], patch_layer=work.layers[0],
                        patch_values=torch.zeros(n_patch, hidden, device=device, dtype=model.dtype),
                        seeds=list(range(start, min(rows, start + work.samples))))
             for i, start in enumerate(range(0, rows, work.samples))]
    n = min(work.new_tokens - 1, 50)

    def run(tokens: int) -> float:
        sync(device)
        t = time.perf_counter()
        engine.generate(units, tokens, sampling)
        sync(device)
        return time.perf_counter() - t

    run(work.new_tokens)
    decoder = engine._decoder
    if decoder is None:  # no graphs (CPU): difference of two eager runs
        return (run(1 + n) - run(1)) / n
    seeds = torch.arange(rows, device=device)

    def steps(how: Sampling) -> float:
        tokens = torch.zeros(rows, dtype=torch.long, device=device)
        set_drawn(decoder, 1)
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            tokens = choose_tokens(decoder.step(tokens), seeds, decoder.current.drawn, how)
            decoder.advance()
        sync(device)
        return (time.perf_counter() - t) / n

    if full_softmax is not None:  # the same captured step with the full-softmax sampler
        full_softmax.append(steps(Sampling(1.0)))
    return steps(sampling)


@torch.inference_mode()
def equivalence(model: Any, work: Work, device: str, units: int = 4, samples: int = 8,
                new_tokens: int = 32, share_prefix: bool = False) -> dict[str, Any]:
    """Greedy texts with the CUDA-graph decode against the eager decode, same units."""
    from patchdb.generate.engine import Engine, TargetUnit
    from patchdb.generate.layers import find_layers

    n_patch = len(work.prompt_ids) - work.injection_start
    hidden = work.vectors.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(3)
    todo = [TargetUnit(steer=work.vectors[i % len(work.vectors)].to(model.dtype),
                       patch_layer=work.layers[i % len(work.layers)],
                       patch_values=torch.randn(n_patch, hidden, generator=gen).to(device, model.dtype),
                       seeds=list(range(i * samples, (i + 1) * samples)))
            for i in range(units)]
    out = {}
    variants = [("eager", False, True, False), ("graph", True, True, False),
                ("graph_sdpa", True, False, False)]
    if share_prefix:
        variants.append(("graph_shared", True, True, True))
    for name, graphs, fast, shared in variants:
        engine = Engine(model, find_layers(model), work.prompt_ids, work.injection_start,
                        work.steer_layer, [], use_graphs=graphs, fast_attention=fast,
                        share_prefix=shared)
        out[name] = [[c.token_ids for c in unit] for unit in engine.generate(todo, new_tokens, 0.0)]

    def compare(x: str, y: str) -> tuple[int, float]:
        rows = [(a, b) for ua, ub in zip(out[x], out[y], strict=True) for a, b in zip(ua, ub, strict=True)]
        prefix = sum(next((i for i, (p, q) in enumerate(zip(a, b, strict=True)) if p != q), len(a))
                     for a, b in rows) / len(rows)
        return sum(a == b for a, b in rows), prefix

    same, prefix = compare("eager", "graph")
    same_sdpa, prefix_sdpa = compare("eager", "graph_sdpa")
    same_kernels, _ = compare("graph", "graph_sdpa")
    extra: dict[str, Any] = {}
    if share_prefix:
        extra["identical_shared_vs_graph"], extra["mean_common_prefix_shared"] = compare(
            "graph", "graph_shared")
    return {**extra, "rows": units * samples, "identical": same, "mean_common_prefix": prefix,
            "identical_graph_sdpa_vs_eager": same_sdpa, "mean_common_prefix_graph_sdpa": prefix_sdpa,
            "identical_triton_vs_sdpa_graph": same_kernels, "tokens": new_tokens, "dtype": str(model.dtype)}


def layer_config(shape: str, n_layers: int, samples: int, new_tokens: int) -> tuple[str, int, int]:
    """The default sweep (every experiment and word) narrowed to its first patch layer, scaled
    to the model's depth; returns the TOML text, the steer layer and the patch layer."""
    steer = min(round(n_layers * 38 / 62), n_layers - 4)
    text = f"""
[sweep]
name = "layer-{shape}"
model = "random-init-{shape}"
dtype = "bfloat16"
steer_layer = {steer}
patch_layers = "{steer + 2}"
samples = {samples}
max_new_tokens = {new_tokens}
"""
    return text, steer, steer + 2


def full_layer(args: argparse.Namespace, model: Any, tokenizer: Any, device: str,
               results: dict[str, Any], flops: float) -> None:
    """The headline run: the default sweep's units on one patch layer through the generate
    stage, each variant on a fresh store in this process, and the per-key loop on a few units."""
    from patchdb.config import DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL
    from patchdb.generate.prompt import render_prompt

    n_layers = model.config.num_hidden_layers
    text, steer, layer = layer_config(args.shape, n_layers, args.samples, args.new_tokens)
    results["full_layer"] = {"patch_layer": layer, "steer_layer": steer,
                             "stop_lengths": {"capped": STOP_CAPPED, "median": STOP_MEDIAN,
                                              "sigma": STOP_SIGMA}}
    if args.reference_units:
        prompt = render_prompt(tokenizer, DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL)
        torch.manual_seed(1)
        vectors = torch.randn(2, model.config.hidden_size, device=device, dtype=model.dtype) * 4.0
        work = Work(prompt.input_ids, prompt.injection_start, steer, [layer],
                    [(0, 1)] * args.reference_units, args.samples, args.new_tokens, vectors)
        model.generation_config.eos_token_id = None
        reference_loop(model, Work(work.prompt_ids, work.injection_start, steer, [layer], [(0, 1)],
                                   args.samples, 2, vectors), device, {})  # warm-up
        t = time.perf_counter()
        tokens = reference_loop(model, work, device, {})
        wall = time.perf_counter() - t
        results["full_layer"]["loop"] = {"units": args.reference_units, "tokens": tokens,
                                         "wall_s": wall, "tok_s": tokens / wall}
        args.out.write_text(json.dumps(results, indent=2))
    runs: dict[str, Any] = {}
    answers: dict[str, dict[Any, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, rows in run_specs(args.runs, args.batch_size):
            compile_decode, stop, shrink, refill = FULL_LAYER_RUNS[kind]
            stop_at = answer_lengths(args.new_tokens) if stop else None
            # the profiled steps mid-answer: uniform answers all end, and rows refill, about
            # every new_tokens steps, so step 300 could fall on a refill (rows' caches empty)
            clock = PhaseClock(window_at=int(3.5 * args.new_tokens)) if args.phases else None
            if clock is not None:
                clock.install()
            card = torch.device(device).index or 0
            changed = run_context(name, model)
            try:
                with (ClockLog(card) if device.startswith("cuda") else nullcontext()) as log, \
                        changed:
                    r = run_stage(model, tokenizer, experiment_name(args.shape, name),
                                  text, device, rows, Path(tmp), compile_decode, True, stop_at,
                                  shrink, args.stop_words if stop else None, refill,
                                  length_counts(args.new_tokens) if kind == "stop-paged"
                                  else None)
            finally:
                if clock is not None:
                    clock.uninstall()
            if log is not None and (clocks := log.summary()) is not None:
                r["clocks"] = clocks  # a card at its power cap runs slower on some data
                print(f"[{name}] SM clock {clocks['sm_mhz_median']:.0f} MHz (median, loaded), "
                      f"{clocks['power_w_mean']:.0f} W, power-capped "
                      f"{clocks['power_capped_fraction']:.0%} of the time", flush=True)
            if clock is not None:
                r["phases"] = clock.report()
                without_window(r, r["phases"]["profiler_window_s"])
                print_report(name, r["phases"])
            answers[name] = r.pop("_answers")
            r["answer_spread"] = answer_spread(answers[name])
            if r.get("clocks") and r.get("tok_s_before_drain"):
                # under a power cap, energy a token sets the rate (the run's mean power, the
                # rate before the drain: close enough to compare runs)
                r["mj_per_token"] = 1e3 * r["clocks"]["power_w_mean"] / r["tok_s_before_drain"]
            print(f"[{name}] answers: {r['answer_spread']['distinct_fraction']:.0%} distinct within "
                  f"a unit, {r['answer_spread']['distinct_words_fraction']:.0%} distinct words "
                  f"within an answer" + (f"; {r['mj_per_token']:.1f} mJ a token"
                                         if "mj_per_token" in r else ""), flush=True)
            runs[name] = r
            print(f"[{name}] {r['rollouts']} rollouts, {r['tokens']} tokens in {r['wall_s']:.1f} s: "
                  f"{r['tok_s']:.0f} tok/s ({r['tok_s_steady']:.0f} after {r['setup_s']:.1f} s set-up) "
                  f"at {r['batch_size']} rows, peak {r['peak_reserved_gib']:.1f} of "
                  f"{r['card_gib']:.1f} GiB; batches {r['batches']}", flush=True)
            results["full_layer"]["runs"] = runs
            args.out.write_text(json.dumps(results, indent=2))
    results["full_layer"]["differing_rows"] = differing_rows(answers)
    summarize_full_layer(results, sum(p.numel() for p in full_weights(model)), flops)
    args.out.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-27b")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="default: auto")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--reference-keys", type=int, default=None,
                        help="time (a) on this many keys per layer (its tok/s is per unit)")
    parser.add_argument("--compile", action="store_true", help="patchdb generate --compile")
    parser.add_argument("--share-prefix", action="store_true", help="patchdb generate --share-prefix")
    parser.add_argument("--equivalence-only", action="store_true",
                        help="only compare greedy texts of graph and eager decoding")
    parser.add_argument("--sampler-rows", type=int, default=1000,
                        help="rows of the sampler timing (random logits over the shape's vocabulary)")
    parser.add_argument("--sampler-only", action="store_true",
                        help="only time the sampler (no model is built)")
    parser.add_argument("--full-layer", action="store_true",
                        help="the headline run: the default sweep's units on one patch layer")
    parser.add_argument("--runs", default="defaults,defaults-diverse,stop-refill-diverse,compile-off",
                        help=f"--full-layer runs, in order, from {', '.join(FULL_LAYER_RUNS)}; "
                             "kind@rows runs a kind at that batch (defaults,defaults@384); "
                             "kind+attn=L-B-W-S or +topk=N with the decode attention's launch "
                             "shape or the top-k split changed (defaults+attn=8-32-2-2); "
                             "+draw=triton|torch switches the draw's slice kernels on or off, "
                             "+prefill=burst the spread prefills off")
    parser.add_argument("--stop-words", nargs="*", default=None,
                        help="the early-stop runs' words (default: all, the full layer)")
    parser.add_argument("--reference-units", type=int, default=3,
                        help="--full-layer: units of the per-key loop to time (0: none)")
    parser.add_argument("--phases", action="store_true",
                        help="--full-layer: time each phase of the decode loop and profile a few "
                             "steps' kernels (scripts/phases.py)")
    parser.add_argument("--out", type=Path, default=Path("bench_generate.json"))
    args = parser.parse_args()
    if args.full_layer:
        try:
            run_specs(args.runs, args.batch_size)
        except ValueError as exc:
            parser.error(str(exc))
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)

    from tiny_models import tiny_tokenizer

    from patchdb.config import DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL
    from patchdb.generate.prompt import render_prompt

    results: dict[str, Any] = {"shape": args.shape, "compile": args.compile,
                               "share_prefix": args.share_prefix, **SHAPES[args.shape],
                               "device": device,
                               "card": (torch.cuda.get_device_name(device)
                                        if device.startswith("cuda") else "cpu"),
                               "torch": torch.__version__}
    import transformers
    results["transformers"] = transformers.__version__
    results["new_tokens"] = args.new_tokens
    if args.full_layer:
        from tiny_models import tiny_tokenizer as _tokenizer

        model = build_model(args.shape, device, dtype)
        if SHAPES[args.shape]["family"] == "gemma3":
            for key, value in GEMMA_SAMPLING.items():
                setattr(model.generation_config, key, value)
        flops = matmul_flops(device)
        results["matmul_tflops"] = flops / 1e12
        results["copy_bandwidth_gbs"] = copy_bandwidth(device) / 1e9
        full_layer(args, model, _tokenizer(), device, results, flops)
        return
    results["sampler"] = sampler_times(device, args.sampler_rows, SHAPES[args.shape]["vocab_size"])
    sampler = results["sampler"]
    print(f"sampler at {sampler['rows']} rows x {sampler['vocab']} vocab: top-k 64 + top-p 0.95 "
          f"{sampler['top_k64_top_p095_ms']:.2f} ms, full softmax {sampler['full_softmax_ms']:.2f} ms, "
          f"top-p 0.95 alone {sampler['top_p095_only_ms']:.2f} ms", flush=True)
    if args.sampler_only:
        args.out.write_text(json.dumps(results, indent=2))
        return
    t = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    if SHAPES[args.shape]["family"] == "gemma3":
        for key, value in GEMMA_SAMPLING.items():
            setattr(model.generation_config, key, value)
    results["sampling"] = {k: getattr(model.generation_config, k) for k in ("top_k", "top_p")}
    results["build_s"] = time.perf_counter() - t
    bandwidth = copy_bandwidth(device)
    results["copy_bandwidth_gbs"] = bandwidth / 1e9
    flops = matmul_flops(device)
    results["matmul_tflops"] = flops / 1e12
    tokenizer = tiny_tokenizer()
    prompt = render_prompt(tokenizer, DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL)
    n_layers = model.config.num_hidden_layers
    config_text = bench_config(args.shape, n_layers, args.samples, args.new_tokens)
    steer = min(round(n_layers * 38 / 62), n_layers - 4)
    torch.manual_seed(1)
    hidden = model.config.hidden_size
    vectors = torch.randn(6, hidden, device=device, dtype=dtype) * 4.0
    work = Work(prompt.input_ids, prompt.injection_start, steer, [steer + 2, steer + 3],
                [(s, t) for s in (4, 5) for t in (0, 1, 2, 3)], args.samples, args.new_tokens, vectors)
    results["prompt_tokens"] = len(prompt.input_ids)
    results["units"] = len(work.layers) * len(work.keys)
    context = len(prompt.input_ids) + args.new_tokens // 2
    print(f"model {args.shape} built in {results['build_s']:.1f}s; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s; prompt {len(prompt.input_ids)} tokens", flush=True)

    results["equivalence"] = equivalence(model, work, device, share_prefix=args.share_prefix)
    print(f"greedy graph vs eager: {results['equivalence']}", flush=True)
    if args.equivalence_only:
        args.out.write_text(json.dumps(results, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        b = run_stage(model, tokenizer, args.shape, config_text, device, args.batch_size, Path(tmp),
                      args.compile, args.share_prefix)
        # The same sweep again in a fresh store: what a long sweep runs at once warmed up.
        warm = run_stage(model, tokenizer, args.shape + "-warm", config_text, device, args.batch_size,
                         Path(tmp), args.compile, args.share_prefix)
    b.pop("_answers")
    b.update(warm_wall_s=warm["wall_s"], tok_s_warm=warm["tokens"] / warm["wall_s"],
             compile_s=max(0.0, b["wall_s"] - warm["wall_s"]))
    rows = b["batch_size"]
    t = time.perf_counter()
    full: list[float] = []
    step_b = engine_step_time(model, work, device, rows, args.compile, args.share_prefix, full)
    shared = work.injection_start if args.share_prefix else 0
    roof_b = roofline_step_s(model, rows, context, bandwidth, shared)
    comp_b = compute_step_s(model, rows, context, flops)
    b.update(tok_s=b["tokens"] / b["wall_s"], step_ms=step_b * 1e3, rows=rows,
             roofline_step_ms=roof_b * 1e3, roofline_fraction=roof_b / step_b,
             compute_step_ms=comp_b * 1e3, floor_fraction=max(roof_b, comp_b) / step_b,
             warmup_s=b["compile_s"], step_probe_s=time.perf_counter() - t,
             step_ms_full_softmax=full[0] * 1e3 if full else None)
    results["b"] = b
    print(f"(b) patchdb: {b['tok_s']:.0f} tok/s, step {step_b * 1e3:.1f} ms at {rows} rows "
          f"(auto={args.batch_size is None}), roofline {roof_b * 1e3:.1f} ms; the same step with "
          f"the full-softmax sampler {b['step_ms_full_softmax'] or float('nan'):.1f} ms", flush=True)
    if not args.skip_reference:
        model.generation_config.eos_token_id = None
        t = time.perf_counter()
        step_a = reference_step_time(model, work, device)
        warm_a = time.perf_counter() - t
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        ref_work = work if args.reference_keys is None else Work(
            work.prompt_ids, work.injection_start, work.steer_layer, work.layers,
            work.keys[: args.reference_keys], work.samples, work.new_tokens, work.vectors)
        tokens_a = reference_loop(model, ref_work, device, {})
        wall_a = time.perf_counter() - t
        roof_a = roofline_step_s(model, args.samples, context, bandwidth)
        comp_a = compute_step_s(model, args.samples, context, flops)
        results["a"] = {"tokens": tokens_a, "wall_s": wall_a, "tok_s": tokens_a / wall_a,
                        "step_ms": step_a * 1e3, "rows": args.samples,
                        "roofline_step_ms": roof_a * 1e3, "roofline_fraction": roof_a / step_a,
                        "compute_step_ms": comp_a * 1e3,
                        "floor_fraction": max(roof_a, comp_a) / step_a,
                        "warmup_s": warm_a,
                        "peak_gib": (torch.cuda.max_memory_allocated() / 2**30
                                     if device.startswith("cuda") else 0)}
        print(f"(a) reference: {tokens_a / wall_a:.0f} tok/s, step {step_a * 1e3:.1f} ms at "
              f"{args.samples} rows, roofline {roof_a * 1e3:.1f} ms", flush=True)

    full_tokens = 236_544 * 100
    # A full sweep runs warmed up and pays compile and capture once.
    results["projected_full_sweep_h_b"] = (full_tokens / b["tok_s_warm"] + b["compile_s"]) / 3600
    if "a" in results:
        results["ratio_b_over_a"] = b["tok_s"] / results["a"]["tok_s"]
        results["projected_full_sweep_h_a"] = full_tokens / results["a"]["tok_s"] / 3600
        results["ratio_full_sweep"] = (results["projected_full_sweep_h_a"]
                                       / results["projected_full_sweep_h_b"])
    args.out.write_text(json.dumps(results, indent=2))
    print("\n| run | tok/s | step ms | rows | roofline ms | roofline frac | compute ms "
          "| floor frac | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("a", "b"):
        if name in results:
            r = results[name]
            print(f"| ({name}) | {r['tok_s']:.0f} | {r['step_ms']:.1f} | {r['rows']} | "
                  f"{r['roofline_step_ms']:.1f} | {r['roofline_fraction']:.2f} | "
                  f"{r['compute_step_ms']:.1f} | {r['floor_fraction']:.2f} | {r['peak_gib']:.1f} |")
    print(f"(b) warmed up: {b['tok_s_warm']:.0f} tok/s; compile and capture {b['compile_s']:.1f} s")
    if "ratio_b_over_a" in results:
        print(f"ratio (b)/(a) on this sweep, compile included: {results['ratio_b_over_a']:.2f}; "
              f"over the full default sweep: {results['ratio_full_sweep']:.2f}")
    print(f"projected full default sweep on this card: {results['projected_full_sweep_h_b']:.2f} h "
          f"(b)" + (f", {results['projected_full_sweep_h_a']:.1f} h (a)" if "a" in results else ""))
    if not math.isfinite(bandwidth):
        print("(no GPU: roofline figures are not meaningful)")


if __name__ == "__main__":
    main()
