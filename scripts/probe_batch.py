"""What a decode step costs at a given batch, piece by piece, at the Gemma-3-27B shape (no model
is built): the step's linear layers at nearby row counts (how well a row count fits the matmul
tiles), the decode attention with unit prompts at uniform and at realistic ragged lengths (this
checkout's kernel, and another copy of triton_decode.py given with --old-kernel), and the
sampler on bfloat16 logits against the same logits widened to float32.

    python scripts/probe_batch.py --rows 403 --old-kernel .bench/old_triton_decode.py --out probe.json

With --tunings it also times this checkout's kernel at each launch shape (triton_decode.Tuning:
lines,block,warps,stages; `;` between shapes) in the step's own layout: one length a row, unit
prompts taken in unit order, and the step's new keys stored by the kernel. The switches a step
uses change the kernel's registers, so its programs a multiprocessor
(scripts/compile_kernel.py), which probe_decode.py's plain cases do not show.

    python scripts/probe_batch.py --rows 381 --tunings "16,32,2,3;16,16,2,4;8,32,2,2"
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_generate import SHAPES  # noqa: E402
from pick_changes import RAGGED, parse_shape, shape_name  # noqa: E402
from probe_step import cuda_ms, matmul_ms, step_linears  # noqa: E402
from stop_model import answer_lengths  # noqa: E402

from patchdb.generate import triton_decode  # noqa: E402
from patchdb.generate.kv_writes import NewKV  # noqa: E402
from patchdb.generate.sampling import Sampling, choose_tokens  # noqa: E402

DEV = "cuda:0" if torch.cuda.is_available() else "cpu"


def linears(rows_list: list[int], spec: dict[str, Any], fused: bool = False) -> list[dict[str, Any]]:
    """One layer's seven linears (four with q/k/v and gate/up each one product when `fused`)
    plus the LM head over the full depth, per row count."""
    flop_per_row = 2 * (sum(k * n for k, n in step_linears(spec)) * spec["num_hidden_layers"]
                        + spec["vocab_size"] * spec["hidden_size"])
    out = []
    for rows in rows_list:
        total = matmul_ms(rows, spec, spec["num_hidden_layers"], DEV, quiet=True, fused=fused)
        out.append({"rows": rows, "fused": fused, "ms": round(total, 3),
                    "us_per_row": round(total / rows * 1e3, 2),
                    "tflops": round(flop_per_row * rows / total / 1e9, 1)})
        print(f"linears{' (fused)' if fused else ''} at {rows} rows: {total:.2f} ms a step, "
              f"{total / rows * 1e3:.1f} us a row, {flop_per_row * rows / total / 1e9:.0f} TFLOP/s",
              flush=True)
    return out


def live_lengths(rows: int, max_new: int) -> torch.Tensor:
    """Own-cache lengths of rows in a steady continuous batch under the bench's stop-length
    model: a row is seen at a uniform point of its life, so longer answers are seen more often."""
    seeds = torch.arange(rows * 50, dtype=torch.int64)
    ends = answer_lengths(max_new)(seeds)
    total = torch.where(ends < 0, max_new, ends + 1).double()
    pick = torch.multinomial(total, rows, replacement=True, generator=torch.Generator().manual_seed(0))
    at = (torch.rand(rows, generator=torch.Generator().manual_seed(1)) * total[pick]).long() + 1
    return at.to(torch.int32)


def attention_inputs(rows: int, prefix_len: int, max_new: int) -> tuple[Any, ...]:
    """Queries, a cache of max_new positions a row and a shared prefix at the Gemma-3-27B
    attention shape (16 KV heads, 2 query heads each, head dim 128), with the generator that
    drew them, for the unit prompts drawn after."""
    kvh, groups, dim = 16, 2, 128
    g = torch.Generator(device=DEV).manual_seed(0)
    query = torch.randn(rows, kvh, groups, dim, device=DEV, dtype=torch.bfloat16, generator=g)
    key = torch.randn(rows, kvh, max_new, dim, device=DEV, dtype=torch.bfloat16, generator=g)
    value = torch.randn_like(key)
    prefix = (torch.randn(kvh, prefix_len, dim, device=DEV, dtype=torch.bfloat16, generator=g),
              torch.randn(kvh, prefix_len, dim, device=DEV, dtype=torch.bfloat16, generator=g))
    return g, query, key, value, prefix


def attention(rows: int, prefix_len: int, unit_len: int, max_new: int,
              kernels: dict[str, Any]) -> list[dict[str, Any]]:
    """Both kernels at uniform and ragged own lengths, rows of a unit side by side as refill
    admits them (runs of 64, cut where rows were refilled)."""
    kvh, dim = 16, 128
    g, query, key, value, prefix = attention_inputs(rows, prefix_len, max_new)
    n_units = 4 * -(-rows // 64) + 8
    u_k = torch.randn(n_units, kvh, unit_len, dim, device=DEV, dtype=torch.bfloat16, generator=g)
    u_v = torch.randn_like(u_k)
    runs = torch.randint(1, 16, (rows,), generator=torch.Generator().manual_seed(2))
    of_row, unit, left = [], 0, int(runs[0])
    for r in range(rows):  # runs of one unit, 1-15 rows long, units cycling through the slots
        if left == 0:
            unit, left = (unit + 1) % n_units, int(runs[r])
        of_row.append(unit)
        left -= 1
    out = []
    cases = {"uniform 50": torch.tensor(50, dtype=torch.int32, device=DEV),
             RAGGED: live_lengths(rows, max_new).to(DEV)}
    for case, length in cases.items():
        for name, mod in kernels.items():
            units = mod.UnitPrompts(u_k, u_v, torch.tensor(of_row, dtype=torch.int32, device=DEV))
            fn = lambda mod=mod, units=units, length=length: mod.decode_attention_triton(  # noqa: E731
                query, key, value, length, dim**-0.5, prefix, units=units)
            result = fn().float()
            ms = cuda_ms(fn, 50)
            out.append({"case": case, "kernel": name, "us": round(ms * 1e3, 1)})
            print(f"attention {case}, {name}: {ms * 1e3:.0f} us a layer", flush=True)
            if name != "this":
                ref = kernels["this"].decode_attention_triton(query, key, value, length,
                                                               dim**-0.5, prefix, units=mod.UnitPrompts(
                                                                   u_k, u_v, units.of_row)).float()
                out[-1]["max_diff_vs_this"] = float((result - ref).abs().max())
    return out


def step_layout(rows: int, prefix_len: int, unit_len: int, max_new: int,
                tunings: list[Any]) -> list[dict[str, Any]]:
    """The kernel at each launch shape as a decode step launches it: per-row lengths (all 50,
    and the stop model's), unit prompts in unit order, and the step's new keys and values
    stored by the kernel; each shape checked against the first."""
    kvh, dim = 16, 128
    g, query, key, value, prefix = attention_inputs(rows, prefix_len, max_new)
    n_units = -(-rows // 64) + 1
    u_k = torch.randn(n_units, kvh, unit_len, dim, device=DEV, dtype=torch.bfloat16, generator=g)
    u_v = torch.randn_like(u_k)
    of_row = torch.randint(0, n_units, (rows,), generator=torch.Generator().manual_seed(3))
    units = triton_decode.UnitPrompts(u_k, u_v, of_row.to(DEV, torch.int32),
                                      torch.argsort(of_row, stable=True).to(DEV, torch.int32))
    new = NewKV(0, torch.randn(rows, kvh, 1, dim, device=DEV, dtype=torch.bfloat16, generator=g),
                torch.randn(rows, kvh, 1, dim, device=DEV, dtype=torch.bfloat16, generator=g),
                lambda: None)
    out = []
    cases = {"all 50": torch.full((rows,), 50, dtype=torch.int32, device=DEV),
             RAGGED: live_lengths(rows, max_new).to(DEV)}
    for case, length in cases.items():
        first = None
        for tuning in tunings:
            name = shape_name(tuning)

            def fn(tuning: Any = tuning, length: torch.Tensor = length) -> torch.Tensor:
                return triton_decode.decode_attention_triton(
                    query, key, value, length, dim**-0.5, prefix, units=units, new=new,
                    tuning=tuning)

            result = fn().float()
            first = result if first is None else first
            ms = cuda_ms(fn, 50)
            out.append({"case": case, "tuning": name, "us": round(ms * 1e3, 1),
                        "max_diff_vs_first": float((result - first).abs().max())})
            print(f"step layout, {case}, shape {name}: {ms * 1e3:.0f} us a layer "
                  f"(max diff {out[-1]['max_diff_vs_first']:.1e} against the first)", flush=True)
    return out


def sampler(rows: int, vocab: int) -> dict[str, float]:
    logits = (torch.randn(rows, vocab, device=DEV) * 3).bfloat16()
    seeds = torch.arange(rows, device=DEV)
    how = Sampling(1.0, 64, 0.95)
    bf16 = cuda_ms(lambda: choose_tokens(logits, seeds, 5, how))
    widened = cuda_ms(lambda: choose_tokens(logits.float(), seeds, 5, how))
    same = bool(torch.equal(choose_tokens(logits, seeds, 5, how),
                            choose_tokens(logits.float(), seeds, 5, how)))
    print(f"sampler at {rows} rows: bf16 {bf16:.2f} ms, widened to float32 first {widened:.2f} ms, "
          f"same draws {same}", flush=True)
    return {"bf16_ms": bf16, "float32_ms": widened, "same": same}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--prefix", type=int, default=150)
    parser.add_argument("--unit-len", type=int, default=27)
    parser.add_argument("--old-kernel", type=Path, default=None)
    parser.add_argument("--near", default="", help="row counts to time the linears at, "
                        "comma-separated (default: round numbers near --rows)")
    parser.add_argument("--tunings", default="",
                        help="launch shapes to time in the step's layout: lines,block,warps,"
                        "stages, separated by ';'")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    try:
        tunings = [parse_shape(t) for t in args.tunings.split(";") if t.strip()]
    except ValueError:
        parser.error("--tunings takes shapes lines,block,warps,stages (positive integers), "
                     "separated by ';'")
    spec = SHAPES["gemma3-27b"]
    kernels: dict[str, Any] = {"this": triton_decode}
    if args.old_kernel is not None and args.old_kernel.exists():
        loader = importlib.util.spec_from_file_location("old_triton_decode", args.old_kernel)
        assert loader is not None and loader.loader is not None
        old = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(old)
        kernels["before"] = old
    r = args.rows
    near = sorted({r, r // 64 * 64, r // 128 * 128, -(-r // 128) * 128, 256, 384, 512, 640, 768,
                   1024} - {0})
    if args.near:
        near = sorted({int(x) for x in args.near.split(",")})
    if DEV == "cpu":  # smoke run: a small vocabulary and depth
        spec = dict(spec, vocab_size=4096, num_hidden_layers=2)
    results: dict[str, Any] = {"card": torch.cuda.get_device_name(0) if DEV != "cpu" else "cpu", "rows": r,
               "linears": linears(near, spec) + linears(near, spec, fused=True),
               "attention": attention(r, args.prefix, args.unit_len, 100, kernels),
               "sampler": sampler(r, spec["vocab_size"])}
    if tunings:
        results["step_layout"] = step_layout(r, args.prefix, args.unit_len, 100, tunings)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
