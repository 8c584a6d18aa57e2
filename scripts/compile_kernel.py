"""Compile patchdb's decode-attention kernel (patchdb/generate/triton_decode.py) for a GPU
architecture on a machine without a GPU: Triton's real compiler and NVIDIA's ptxas, as a launch
on the card would run them, in the variants a decode step launches. It catches what Triton's
CPU interpreter (the tests' way of running the kernel) does not: types, layouts and code the
compiler rejects. It does not run the kernel; the GPU tests do (scripts/test_gpu.sh).

    python scripts/compile_kernel.py             # sm_90 (H100, H200), the step's variants
    python scripts/compile_kernel.py --all       # every combination of the kernel's switches

Prints each variant's PTX size, global stores and barriers; exits 1 with one line if one fails.
"""

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said quietly

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POINTERS_I32 = {"len_ptr", "unit_ptr", "order_ptr", "table_ptr"}
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


def compile_variant(arch: int, dtype: str, switches: dict[str, bool]) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from patchdb.generate import triton_decode
    from patchdb.generate.pages import PAGE

    kernel = triton_decode._decode_kernel
    names = list(kernel.arg_names)
    constants: dict[str, Any] = dict(
        GROUPS=2, G_PAD=2, ROWS=8, LINES=16, DIM=128, BLOCK_L=triton_decode.DEFAULT.block,
        IEEE=dtype == "fp32", **switches)
    constants["PAGE"] = PAGE if switches["PAGE"] else 0
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS_I32:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    tuning = triton_decode.DEFAULT
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tuning.warps, "num_stages": tuning.stages})
    ptx = compiled.asm["ptx"]
    return {"ptx_lines": ptx.count("\n"), "stores": ptx.count("st.global"),
            "barriers": ptx.count("bar.sync"), "cubin_bytes": len(compiled.asm["cubin"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: sm_90)")
    parser.add_argument("--all", action="store_true", help="every combination of the switches")
    args = parser.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        print("Error: Triton is not installed (it ships with CUDA builds of torch)", file=sys.stderr)
        return 1
    done = 0
    for dtype, switches in variants(args.all):
        label = dtype + " " + " ".join(k for k, on in switches.items() if on)
        try:
            got = compile_variant(args.arch, dtype, switches)
        except Exception as exc:  # noqa: BLE001 - one line, whatever the compiler raised
            lines = [line for line in str(exc).splitlines() if line.strip()]
            where = lines[0].strip() if lines else ""  # the compiler's "at line:column:"
            why = lines[-1].strip() if lines else ""
            print(f"Error: sm_{args.arch} {label}: {type(exc).__name__} {where} {why}",
                  file=sys.stderr)
            return 1
        print(f"sm_{args.arch} {label}: {got['ptx_lines']} PTX lines, {got['stores']} global "
              f"stores, {got['barriers']} barriers, cubin {got['cubin_bytes']} bytes")
        done += 1
    print(f"{done} variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
