"""Where a graphed decode step spends its time: replay time, a kernel table from the profiler,
the sampler, and the step's matmuls alone at the same row count. For deciding what to speed up.

    python scripts/probe_step.py --shape gemma3-27b --layers 16 --rows 162,360
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_generate import SHAPES, build_model, set_drawn  # noqa: E402


def cuda_ms(fn: Any, n: int = 20) -> float:
    """The mean over n calls after one warm-up, in milliseconds (CUDA events); on a machine
    without CUDA, one call's wall time (a smoke run of a script)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def step_linears(spec: dict[str, Any]) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's seven linears: q, k, v, o, gate, up, down."""
    h, i = spec["hidden_size"], spec["intermediate_size"]
    q = spec["num_attention_heads"] * spec["head_dim"]
    kv = spec["num_key_value_heads"] * spec["head_dim"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def fused_linears(spec: dict[str, Any]) -> list[tuple[int, int]]:
    """The same products as step_linears with q, k, v as one and gate, up as one."""
    (h, q), (_, k), (_, v), o, (_, gate), (_, up), down = step_linears(spec)
    return [(h, q + k + v), o, (h, gate + up), down]


def matmul_ms(rows: int, spec: dict[str, Any], layers: int, dev: str, quiet: bool = False,
              fused: bool = False) -> float:
    """The decode step's linear layers alone (per layer x layers, plus the LM head)."""
    total = 0.0
    for k, n in (fused_linears(spec) if fused else step_linears(spec)):
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        ms = cuda_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w), 20)
        gb = n * k * 2 / 1e9
        if not quiet:
            print(f"  linear [{rows}x{k}] x [{k}x{n}]: {ms * 1e3:.0f} us, {gb / ms * 1e3:.0f} "
                  f"GB/s, {2 * rows * n * k / ms / 1e9:.0f} TFLOP/s", flush=True)
        total += ms
    x = torch.randn(rows, spec["hidden_size"], device=dev, dtype=torch.bfloat16)
    w = torch.randn(spec["vocab_size"], spec["hidden_size"], device=dev, dtype=torch.bfloat16)
    head = cuda_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w), 10)
    return total * layers + head


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="gemma3-27b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rows", default="162,360")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--variants", default="sdpa,fast,fast+compile")
    parser.add_argument("--check", action="store_true", help="compare greedy texts across variants")
    parser.add_argument("--matmuls", action="store_true")
    args = parser.parse_args()
    from tiny_models import tiny_tokenizer

    from patchdb.config import DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL
    from patchdb.generate.engine import Engine, TargetUnit
    from patchdb.generate.layers import find_layers
    from patchdb.generate.prompt import render_prompt
    from patchdb.generate.sampling import choose_tokens

    spec = dict(SHAPES[args.shape])
    SHAPES[args.shape]["num_hidden_layers"] = args.layers
    dev = "cuda:0"
    model = build_model(args.shape, dev, torch.bfloat16)
    prompt = render_prompt(tiny_tokenizer(), DEFAULT_PROMPT_INTRO, DEFAULT_PROMPT_TRIAL)
    n_patch = len(prompt.input_ids) - prompt.injection_start
    hidden = spec["hidden_size"]
    variants = {"sdpa": (False, False), "fast": (True, False), "fast+compile": (True, True)}
    chosen = args.variants.split(",")
    for rows in [int(r) for r in args.rows.split(",")]:
        units = [TargetUnit(steer=torch.randn(hidden, device=dev, dtype=torch.bfloat16),
                            patch_layer=args.layers // 2 + 1,
                            patch_values=torch.randn(n_patch, hidden, device=dev, dtype=torch.bfloat16),
                            seeds=list(range(j * 64, min(rows, (j + 1) * 64))))
                 for j in range((rows + 63) // 64)]
        greedy: dict[str, list[list[int]]] = {}
        for name in chosen:
            fast, compiled = variants[name]
            engine = Engine(model, find_layers(model), prompt.input_ids, prompt.injection_start,
                            args.layers // 2, [], graph_rows=rows, fast_attention=fast,
                            compile_decode=compiled)
            t = time.perf_counter()
            engine.generate(units, args.new_tokens, 1.0)
            torch.cuda.synchronize()
            first = time.perf_counter() - t
            decoder = engine._decoder
            assert decoder is not None and decoder.current.graph is not None
            graph = decoder.current.graph
            set_drawn(decoder, 41)
            replay = cuda_ms(graph.replay, 20)
            full = replay * spec["num_hidden_layers"] / args.layers
            print(f"rows {rows} [{name}]: first generate (capture) {first:.1f} s; replay {replay:.2f} ms "
                  f"for {args.layers} layers (~{full:.1f} ms at full depth)", flush=True)
            set_drawn(decoder, 41)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    graph.replay()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10,
                                            max_name_column_width=70), flush=True)
            if args.check:
                out = engine.generate(units[:2], args.new_tokens, 0.0)
                greedy[name] = [c.token_ids for unit in out for c in unit]
            del engine, decoder, graph
            torch.cuda.empty_cache()
        for name in chosen[1:]:
            if args.check:
                pairs = list(zip(greedy[chosen[0]], greedy[name], strict=True))
                same = sum(a == b for a, b in pairs)
                print(f"rows {rows}: greedy {name} vs {chosen[0]}: {same}/{len(pairs)} identical", flush=True)
        logits = torch.randn(rows, spec["vocab_size"], device=dev)
        seeds = torch.arange(rows, device=dev)
        sample = cuda_ms(lambda: choose_tokens(logits, seeds, 3, 1.0), 20)  # noqa: B023
        print(f"rows {rows}: sampler {sample:.2f} ms", flush=True)
        if args.matmuls:
            mm = matmul_ms(rows, spec, args.layers, dev)
            print(f"rows {rows}: matmuls alone {mm:.2f} ms for {args.layers} layers + head", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
