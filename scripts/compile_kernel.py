"""Compile patchdb's decode-attention kernel (patchdb/generate/triton_decode.py) for a GPU
architecture on a machine without a GPU: Triton's real compiler and NVIDIA's ptxas, as a launch
on the card would run them, in the variants a decode step launches. It catches what Triton's
CPU interpreter (the tests' way of running the kernel) does not: types, layouts and code the
compiler rejects. It does not run the kernel; the GPU tests do (scripts/test_gpu.sh).

    python scripts/compile_kernel.py             # sm_90 (H100, H200), the step's variants
    python scripts/compile_kernel.py --all       # every combination of the kernel's switches

Prints each variant's PTX size, global stores and barriers, and what sets how many programs a
multiprocessor holds: registers a thread (from the cubin, with NVIDIA's cuobjdump where Triton
ships it), shared memory, whether the loops' loads are pipelined (cp.async), and the programs
that fit one sm_90 multiprocessor (65,536 registers, 228 KB of shared memory). Exits 1 with
one line if one fails. The compile sees the launch's arguments as Triton's launcher specialises
them (pointers and strides divisible by 16, strides of 1 as constants), so the code is the one
a card runs: without that, Triton neither vectorises the loads nor pipelines them.

    python scripts/compile_kernel.py --tuning 16,16,2,4   # another launch shape (triton_decode.Tuning)
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said quietly

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POINTERS_I32 = {"len_ptr", "unit_ptr", "order_ptr", "table_ptr"}
# integer arguments a decode step passes that are not multiples of 16 (the rest are strides of
# 16-aligned rows, or 0); the launcher makes those equal to 1 constants
ANY_INT = {"batch", "prefix_len", "unit_len"}
SM90_REGISTERS, SM90_SHARED, SM90_WARPS = 65_536, 228 * 1024, 64
SWITCHES = ("RAGGED", "UNITS", "ORDERED", "PAGE", "WRITE")
# What decode steps launch: bf16 continuous batching (ragged rows, unit prompts in row order),
# paged and not, storing the step's keys; a fixed batch at one length; and float32 (the GPU
# tests), paged.
STEP_VARIANTS = [("bf16", dict(RAGGED=True, UNITS=True, ORDERED=True, PAGE=True, WRITE=True)),
                 ("bf16", dict(RAGGED=True, UNITS=True, ORDERED=True, PAGE=False, WRITE=True)),
                 ("bf16", dict(RAGGED=False, UNITS=False, ORDERED=False, PAGE=False, WRITE=False)),
                 ("fp32", dict(RAGGED=True, UNITS=True, ORDERED=False, PAGE=True, WRITE=True))]


def variants(every: bool) -> list[tuple[str, dict[str, bool]]]:
    if not every:
        return STEP_VARIANTS
    out = []
    for dtype in ("bf16", "fp32"):
        for values in itertools.product([False, True], repeat=len(SWITCHES)):
            switches = dict(zip(SWITCHES, values, strict=True))
            if not switches["ORDERED"] or switches["UNITS"]:  # an order needs unit prompts
                out.append((dtype, switches))
    return out


def compile_variant(arch: int, dtype: str, switches: dict[str, bool],
                    tuning: Any = None) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from patchdb.generate import triton_decode
    from patchdb.generate.pages import PAGE

    tuning = tuning or triton_decode.DEFAULT
    kernel = triton_decode._decode_kernel
    names = list(kernel.arg_names)
    rows = max(1, tuning.lines // 2)  # Gemma-3-27B: 2 query heads a KV head
    constants: dict[str, Any] = dict(
        GROUPS=2, G_PAD=2, ROWS=rows, LINES=max(16, 2 * rows), DIM=128, BLOCK_L=tuning.block,
        IEEE=dtype == "fp32", **switches)
    constants["PAGE"] = PAGE if switches["PAGE"] else 0
    prefix = triton_decode.PREFIX or (tuning.block, tuning.stages)
    constants.update(BLOCK_P=prefix[0], P_STAGES=prefix[1])
    # strides of 1: a length and a unit a row, and (unpaged) the table's stand-in
    ones = {"s_unit"} | ({"s_len"} if switches["RAGGED"] else set()) | (
        set() if switches["PAGE"] else {"s_tb"})
    constants.update(dict.fromkeys(ones, 1))
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS_I32:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
        if name not in constants and name != "scale" and name not in ANY_INT and not (
                name == "s_tb" and switches["PAGE"]):  # pages a row: any count
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tuning.warps, "num_stages": tuning.stages})
    ptx = compiled.asm["ptx"]
    out = {"ptx_lines": ptx.count("\n"), "stores": ptx.count("st.global"),
           "barriers": ptx.count("bar.sync"), "cubin_bytes": len(compiled.asm["cubin"]),
           "shared": int(compiled.metadata.shared), "pipelined": "cp.async" in ptx}
    out.update(occupancy(compiled.asm["cubin"], out["shared"], tuning.warps))
    return out


def occupancy(cubin: bytes, shared: int, warps: int) -> dict[str, Any]:
    """Registers a thread and spill stack (cuobjdump, where Triton ships it), and the programs
    one sm_90 multiprocessor holds: registers go to warps in 256s, each program's shared memory
    takes 1 KB more."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                               text=True, timeout=60).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        return {}
    regs, stack = int(found.group(1)), int(found.group(2))
    per_warp = -(-regs * 32 // 256) * 256
    programs = min(SM90_REGISTERS // per_warp // warps, SM90_SHARED // (shared + 1024),
                   SM90_WARPS // warps)
    return {"registers": regs, "spill_stack": stack, "programs_per_sm": programs}


def programs(rows: int, tuning: Any, sms: int, kv_heads: int = 16) -> int:
    """Programs a decode step of `rows` rows launches (Gemma-3-27B: 16 KV heads, 2 query heads
    each), by triton_decode's own rule for the rows a program takes."""
    from patchdb.generate import triton_decode

    lines = (tuning or triton_decode.DEFAULT).lines
    per = triton_decode.rows_per_program(rows, kv_heads, lines, 2, sms)
    return -(-rows // per) * kv_heads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: sm_90)")
    parser.add_argument("--all", action="store_true", help="every combination of the switches")
    parser.add_argument("--tuning", help="lines,block,warps,stages (default: the kernel's own)")
    parser.add_argument("--rows", type=int, help="also: the programs a step of this many rows "
                        "launches, in rounds of what the card's multiprocessors hold")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors (H100 SXM, H200: 132)")
    parser.add_argument("--prefix", help="block,stages of the shared prefix's loop "
                        "(triton_decode.PREFIX; default: the tuning's)")
    args = parser.parse_args()
    if args.prefix:
        from pick_changes import parse_prefix

        from patchdb.generate import triton_decode

        try:
            triton_decode.PREFIX = parse_prefix(args.prefix, ",")
        except ValueError:
            parser.error("--prefix takes block,stages "
                         "(a power of two of at least 16, and 1 or more)")
    tuning = None
    if args.tuning:
        from pick_changes import parse_shape

        try:
            tuning = parse_shape(args.tuning)
        except ValueError:
            parser.error("--tuning takes lines,block,warps,stages (positive integers)")
    try:
        import triton  # noqa: F401
    except ImportError:
        print("Error: Triton is not installed (it ships with CUDA builds of torch)", file=sys.stderr)
        return 1
    done = 0
    for dtype, switches in variants(args.all):
        label = dtype + " " + " ".join(k for k, on in switches.items() if on)
        try:
            got = compile_variant(args.arch, dtype, switches, tuning)
        except Exception as exc:  # noqa: BLE001 - one line, whatever the compiler raised
            lines = [line for line in str(exc).splitlines() if line.strip()]
            where = lines[0].strip() if lines else ""  # the compiler's "at line:column:"
            why = lines[-1].strip() if lines else ""
            print(f"Error: sm_{args.arch} {label}: {type(exc).__name__} {where} {why}",
                  file=sys.stderr)
            return 1
        fit = (f", {got['registers']} registers ({got['spill_stack']} B spill stack), "
               f"{got['programs_per_sm']} programs a multiprocessor" if "registers" in got else "")
        if args.rows and got.get("programs_per_sm"):
            launched = programs(args.rows, tuning, args.sms)
            fit += (f"; {args.rows} rows: {launched} programs, "
                    f"{launched / (args.sms * got['programs_per_sm']):.2f} rounds")
        print(f"sm_{args.arch} {label}: {got['ptx_lines']} PTX lines, {got['stores']} global "
              f"stores, {got['barriers']} barriers, cubin {got['cubin_bytes']} bytes, shared "
              f"{got['shared']} B, loads {'pipelined' if got['pipelined'] else 'not pipelined'}"
              f"{fit}")
        done += 1
    print(f"{done} variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
