"""Probe decode-step variants on a GPU: eager DynamicCache, eager StaticCache, and a StaticCache
decode step captured in a CUDA graph. Prints step times and the largest logit difference of the
graph replay against the eager static step. For deciding how the engine should decode.

    python scripts/probe_decode.py --shape gemma3-27b --layers 8 --rows 64,128

With --attention it times the decode-attention kernel alone instead (no model): the first
kernel (one program per row and KV head, kept below as it was) against triton_decode's, at the
Gemma-3-27B attention shape, with the KV bytes each call must read, the GB/s that makes, and a
device-to-device copy measured in the same run as the ceiling; every variant is checked against
SDPA in float32 first. --sweep times the launch shapes in SWEEP too.

    python scripts/probe_decode.py --attention --sweep --out probe_decode.json
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_generate import SHAPES, build_model, copy_bandwidth  # noqa: E402

from patchdb.generate import triton_decode  # noqa: E402
from patchdb.generate.triton_decode import Tuning  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

DEVICE, DTYPE = "cuda:0", torch.bfloat16
# Launch shapes to time with --sweep. Two sweeps on an H200 (scripts/results/
# probe_decode_h200_2026-12-01_sweep*.json) chose the default: 16 lines, blocks of 32, 2 warps,
# 3 stages (199 us at 1,040 rows, prefix 150, own 77, against 478 us for the first kernel); 32 or
# 64 lines and 8 warps were slower, and one loop over the prefix and the rows (tried, then
# dropped) gained 1-2%. The 8-line shapes (4 rows a program at Gemma's 2 query heads a KV head,
# the dot's 16 lines half empty) give a batch of an H100's size (`--sweep-rows 381`) twice the
# programs: there 768 programs of 8 rows may fill an H100's 132 multiprocessors about 1.5
# times over (if a program's 3 stages of 16 KB of keys and values let four share one), so the
# last round would run half empty. Two stages fit more programs at once. Not yet measured.
SWEEP = [Tuning(16, 32, 2, 3), Tuning(16, 32, 4, 3), Tuning(16, 32, 2, 4), Tuning(16, 16, 2, 4),
         Tuning(16, 64, 4, 2), Tuning(16, 64, 4, 3), Tuning(32, 32, 4, 3), Tuning(16, 128, 8, 2),
         Tuning(16, 64, 2, 3), Tuning(16, 32, 4, 4), Tuning(8, 32, 2, 3), Tuning(8, 64, 2, 3),
         Tuning(8, 32, 1, 3), Tuning(16, 32, 2, 2), Tuning(8, 32, 2, 2)]


def label(t: Tuning) -> str:
    """A launch shape's name in the results."""
    return f"lines{t.lines}_block{t.block}_w{t.warps}_s{t.stages}"

if triton is not None:

    @triton.jit
    def _first_attend(q, k_base, v_base, s_kl, s_vl, length, scale, best, total, acc,
                      d, offs, BLOCK_L: tl.constexpr):
        for start in range(0, length, BLOCK_L):
            pos = start + offs
            ok = pos < length
            k = tl.load(k_base + pos[:, None] * s_kl + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(ok[None, :], s * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, 1))
            alpha = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_base + pos[:, None] * s_vl + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        return best, total, acc

    @triton.jit
    def _first_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, len_ptr, prefix_len, scale,
                      s_qb, s_qh, s_qg, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                      s_pkh, s_pkl, s_pvh, s_pvl, s_ob, s_oh, s_og,
                      GROUPS: tl.constexpr, G_PAD: tl.constexpr, DIM: tl.constexpr,
                      BLOCK_L: tl.constexpr):
        """The first kernel (16-bit path), as it was: one program per (row, KV head)."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        length = tl.load(len_ptr)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, DIM)
        offs = tl.arange(0, BLOCK_L)
        g_ok = g < GROUPS
        q = tl.load(q_ptr + row * s_qb + head * s_qh + g[:, None] * s_qg + d[None, :],
                    mask=g_ok[:, None], other=0.0)
        best = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, DIM], tl.float32)
        best, total, acc = _first_attend(q, pk_ptr + head * s_pkh, pv_ptr + head * s_pvh, s_pkl,
                                         s_pvl, prefix_len, scale, best, total, acc, d, offs,
                                         BLOCK_L)
        best, total, acc = _first_attend(q, k_ptr + row * s_kb + head * s_kh,
                                         v_ptr + row * s_vb + head * s_vh, s_kl, s_vl,
                                         length, scale, best, total, acc, d, offs, BLOCK_L)
        out = acc / total[:, None]
        tl.store(o_ptr + row * s_ob + head * s_oh + g[:, None] * s_og + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None])


def first_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 length: torch.Tensor, scale: float,
                 prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The first kernel's launch, as it was (16-bit inputs)."""
    batch, kv_heads, groups, dim = query.shape
    out = torch.empty_like(query)
    pk, pv = prefix if prefix is not None else (key[0], value[0])
    plen = prefix[0].shape[1] if prefix is not None else 0
    _first_kernel[(batch, kv_heads)](
        query, key, value, pk, pv, out, length, plen, scale,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUPS=groups, G_PAD=max(16, triton.next_power_of_2(groups)), DIM=dim, BLOCK_L=64,
        num_warps=4)
    return out


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
              scale: float, prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """SDPA in float32 over the prefix and each row's valid positions (rows of one length in one
    call)."""
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for n in sorted(set(lengths)):
        rows = torch.tensor([i for i, x in enumerate(lengths) if x == n], device=query.device)
        k, v = key[rows, :, :n].float(), value[rows, :, :n].float()
        if prefix is not None:
            k = torch.cat([prefix[0].float().expand(len(rows), -1, -1, -1), k], dim=2)
            v = torch.cat([prefix[1].float().expand(len(rows), -1, -1, -1), v], dim=2)
        out[rows] = torch.nn.functional.scaled_dot_product_attention(
            query[rows].float(), k, v, scale=scale)
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN (an unwritten or broken output) reads as inf."""
    err = ((out.float() - ref).norm() / ref.norm()).item()
    return err if err == err else float("inf")


def attention_case(rows: int, prefix_len: int, own: int, max_own: int, tunings: list[Tuning],
                   bandwidth: float, ragged: bool = False) -> dict[str, Any]:
    """Time the first kernel and each tuning of the current one on one cache shape."""
    kv, groups, dim, dev = 16, 2, 128, DEVICE  # Gemma-3-27B: 32 query heads over 16 KV heads
    dtype, scale = DTYPE, dim**-0.5
    g = torch.Generator(device=dev).manual_seed(rows + own + prefix_len)
    query = torch.randn(rows, kv, groups, dim, device=dev, dtype=dtype, generator=g)
    key = torch.randn(rows, kv, max_own, dim, device=dev, dtype=dtype, generator=g)
    value = torch.randn(rows, kv, max_own, dim, device=dev, dtype=dtype, generator=g)
    key[:, :, own:] = 1e4  # stale positions past the valid length must not count
    prefix = None
    if prefix_len:
        prefix = (torch.randn(kv, prefix_len, dim, device=dev, dtype=dtype, generator=g),
                  torch.randn(kv, prefix_len, dim, device=dev, dtype=dtype, generator=g))
    if ragged:  # every row its own length, up to `own`
        lengths = torch.randint(1, own + 1, (rows,), device=dev, generator=g, dtype=torch.int32)
    else:
        lengths = torch.full((rows,), own, device=dev, dtype=torch.int32)
    length = lengths if ragged else torch.tensor(own, device=dev, dtype=torch.int32)
    ref = reference(query, key, value, lengths.tolist(), scale, prefix)
    element = 2
    own_bytes = int(lengths.sum().item()) * kv * dim * 2 * element
    kv_bytes = own_bytes + kv * prefix_len * dim * 2 * element
    case: dict[str, Any] = {"rows": rows, "kv_heads": kv, "groups": groups, "dim": dim,
                            "prefix_len": prefix_len, "own_len": own, "cache_len": max_own,
                            "ragged": ragged, "kv_bytes": kv_bytes, "kernels": {}}
    runs: dict[str, Any] = {}
    if not ragged:
        runs["first"] = lambda: first_kernel(query, key, value, length, scale, prefix)
    for t in tunings:
        runs[label(t)] = (
            lambda t=t: triton_decode.decode_attention_triton(
                query, key, value, length, scale, prefix, tuning=t))
    for name, fn in runs.items():
        try:
            err = rel_error(fn(), ref)
            ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        except Exception as exc:  # a launch shape past the card's shared memory, say
            case["kernels"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            continue
        gbs = kv_bytes / ms / 1e6
        case["kernels"][name] = {"ms": ms, "gb_s": gbs, "of_copy": gbs * 1e9 / bandwidth,
                                 "rel_error": err}
    return case


def probe_attention(args: argparse.Namespace) -> None:
    """The attention kernel alone: the first against the current, at each cache shape."""
    torch.manual_seed(0)
    bandwidth = copy_bandwidth("cuda:0")
    print(f"{torch.cuda.get_device_name(0)}: copy {bandwidth / 1e9:.0f} GB/s (read + write)",
          flush=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0),
                               "torch": torch.__version__, "triton": triton.__version__,
                               "copy_bandwidth_gb_s": bandwidth / 1e9, "cases": []}
    default = triton_decode.DEFAULT
    tunings = [default]
    if args.sweep:
        n = args.sweep_rows
        results["sweep"] = [attention_case(n, 150, own, 127, SWEEP, bandwidth)
                            for own in (77, 28)]
        timed = sorted((k["ms"], name) for name, k in results["sweep"][0]["kernels"].items()
                       if "ms" in k and k["rel_error"] < 2e-2)
        first = results["sweep"][1]["kernels"]
        print(f"sweep ({n:,} rows, prefix 150, own 77 / own 28):", flush=True)
        for ms, name in timed:
            print(f"  {name}: {ms * 1e3:.0f} us / {first[name].get('ms', float('nan')) * 1e3:.0f} us",
                  flush=True)
        names = [n for _, n in timed[:3]]
        tunings += [t for t in SWEEP if label(t) in names and t != default]
    # (rows, prefix, own length, cache length): the stage's shapes with --share-prefix (150 of
    # the 177 prompt tokens shared; 127 own slots: first, mean and last decode step) and without
    # (277 slots), and a small batch.
    cases = [(1040, 150, 28, 127), (1040, 150, 77, 127), (1040, 150, 127, 127),
             (1040, 0, 227, 277), (1040, 0, 277, 277), (64, 150, 77, 127), (256, 150, 77, 127)]
    for rows, plen, own, cache_len in cases:
        results["cases"].append(attention_case(rows, plen, own, cache_len, tunings, bandwidth))
        torch.cuda.empty_cache()
    if args.sweep and args.sweep_rows != 1040:  # the batch swept, with the sweep's best
        for own in (28, 77, 127):
            results["cases"].append(attention_case(args.sweep_rows, 150, own, 127, tunings,
                                                   bandwidth))
        for own in (28, 77):  # no shared prefix: what reading it once a program costs
            results["cases"].append(attention_case(args.sweep_rows, 0, own, 127, tunings,
                                                   bandwidth))
        results["cases"].append(attention_case(args.sweep_rows, 150, 127, 127, tunings,
                                               bandwidth, ragged=True))
    results["cases"].append(attention_case(1040, 150, 127, 127, [default], bandwidth, ragged=True))
    print(f"{'rows':>5} {'prefix':>6} {'own':>4} {'MB':>6}  kernel: ms, GB/s, of copy, rel err",
          flush=True)
    for case in results["cases"]:
        for name, k in case["kernels"].items():
            head = (f"{case['rows']:>5} {case['prefix_len']:>6} {case['own_len']:>4}"
                    f"{'r' if case['ragged'] else ' '}{case['kv_bytes'] / 1e6:>6.0f}  {name}: ")
            if "ms" in k:
                print(head + f"{k['ms']:.4f} ms, {k['gb_s']:.0f} GB/s, {k['of_copy']:.2f}, "
                      f"{k['rel_error']:.1e}", flush=True)
            else:
                print(head + k["error"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="gemma3-27b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", default="64,128")
    parser.add_argument("--prompt", type=int, default=177)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attention", action="store_true", help="time the attention kernel alone")
    parser.add_argument("--sweep", action="store_true", help="with --attention: launch shapes too")
    parser.add_argument("--sweep-rows", type=int, default=1040,
                        help="with --sweep: the batch the launch shapes are timed at")
    parser.add_argument("--out", help="with --attention: write the results here (JSON)")
    args = parser.parse_args()
    if args.attention:
        probe_attention(args)
        return
    from transformers import DynamicCache, StaticCache

    SHAPES[args.shape]["num_hidden_layers"] = args.layers
    dev = "cuda:0"
    model = build_model(args.shape, dev, torch.bfloat16)
    vocab = model.config.vocab_size
    for rows in [int(r) for r in args.rows.split(",")]:
        ids = torch.randint(0, vocab, (rows, args.prompt), device=dev)
        length = args.prompt + args.steps + 2
        with torch.inference_mode():
            # eager dynamic
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            dyn = (time.perf_counter() - t) / args.steps
            print(f"rows {rows}: eager dynamic step {dyn * 1e3:.1f} ms", flush=True)
            # eager static
            try:
                scache = StaticCache(config=model.config, max_cache_len=length)
                pos = torch.arange(args.prompt, device=dev)[None].expand(rows, -1)
                out = model(input_ids=ids, cache=scache, position_ids=pos, use_cache=True,
                            logits_to_keep=1)
                tok0 = out.logits[:, -1].argmax(-1, keepdim=True)
                step_pos = torch.full((rows, 1), args.prompt, device=dev, dtype=torch.long)
                torch.cuda.synchronize()
                t = time.perf_counter()
                tok = tok0
                for i in range(args.steps):
                    step_pos.fill_(args.prompt + i)
                    out = model(input_ids=tok, cache=scache, position_ids=step_pos, use_cache=True)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                sta = (time.perf_counter() - t) / args.steps
                print(f"rows {rows}: eager static step {sta * 1e3:.1f} ms", flush=True)
            except Exception:
                traceback.print_exc()
                continue
            # graph
            try:
                gcache = StaticCache(config=model.config, max_cache_len=length)
                pos = torch.arange(args.prompt, device=dev)[None].expand(rows, -1)
                model(input_ids=ids, cache=gcache, position_ids=pos, use_cache=True, logits_to_keep=1)
                static_tok = tok0.clone()
                static_pos = torch.full((rows, 1), args.prompt, device=dev, dtype=torch.long)
                def _counter(layer):  # type: ignore[no-untyped-def]
                    c = getattr(layer, "cumulative_length", None)
                    return c.clone() if isinstance(c, torch.Tensor) else None

                snapshot = [(layer.keys.clone(), layer.values.clone(), _counter(layer))
                            for layer in gcache.layers]
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        model(input_ids=static_tok, cache=gcache, position_ids=static_pos, use_cache=True)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                t = time.perf_counter()
                with torch.cuda.graph(graph):
                    gout = model(input_ids=static_tok, cache=gcache, position_ids=static_pos, use_cache=True)
                capture = time.perf_counter() - t
                # restore the cache as it was after prefill, then replay and compare with eager static
                for layer, (k, v, c) in zip(gcache.layers, snapshot, strict=True):
                    layer.keys.copy_(k)
                    layer.values.copy_(v)
                    if c is not None:
                        layer.cumulative_length.copy_(c)
                static_tok.copy_(tok0)
                static_pos.fill_(args.prompt)
                graph.replay()
                torch.cuda.synchronize()
                scache2 = StaticCache(config=model.config, max_cache_len=length)
                model(input_ids=ids, cache=scache2, position_ids=pos, use_cache=True, logits_to_keep=1)
                ref = model(input_ids=tok0, cache=scache2, position_ids=static_pos, use_cache=True).logits
                diff = (gout.logits.float() - ref.float()).abs().max().item()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for i in range(args.steps):
                    static_pos.fill_(args.prompt + 1 + i)
                    graph.replay()
                    static_tok.copy_(gout.logits[:, -1].argmax(-1, keepdim=True))
                torch.cuda.synchronize()
                gra = (time.perf_counter() - t) / args.steps
                print(f"rows {rows}: graph static step {gra * 1e3:.1f} ms (capture {capture:.1f}s, "
                      f"max |logit diff| vs eager {diff:.3g})", flush=True)
            except Exception:
                traceback.print_exc()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
