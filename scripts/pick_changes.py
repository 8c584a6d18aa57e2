"""The run changes the probes favour, for the full-layer bench to A/B in the model: the fastest
launch shape of the decode attention in the step's layout at realistic lengths
(probe_batch.py --tunings) and the fastest top-k split (bench_generate.py --sampler-only),
each only where it beats the default by `--margin` and draws the same tokens. Prints a run
name's changes (`+attn=16-16-2-4+topk=64`, bench_generate.py --runs), empty where none wins.

    python scripts/pick_changes.py --batch probe_batch.json --sampler sampler.json
"""

import argparse
import json
from pathlib import Path
from typing import Any

from patchdb.generate.sampling import TOPK_SLICES
from patchdb.generate.triton_decode import DEFAULT, Tuning

RAGGED = "ragged (stop model)"


def shape_name(tuning: Tuning) -> str:
    """A launch shape as probe_batch.py writes it: lines,block,warps,stages."""
    return ",".join(str(x) for x in (tuning.lines, tuning.block, tuning.warps, tuning.stages))


def parse_shape(text: str, sep: str = ",") -> Tuning:
    """A launch shape written as shape_name writes it (`sep` between the fields): four positive
    integers lines,block,warps,stages. Raises ValueError on anything else."""
    numbers = [int(x) for x in text.split(sep)]
    if len(numbers) != 4 or min(numbers) < 1:
        raise ValueError(f"not a launch shape: {text!r}")
    return Tuning(*numbers)


def parse_prefix(text: str, sep: str) -> tuple[int, int]:
    """`block<sep>stages` of the prefix loop (triton_decode.PREFIX); ValueError if not a power
    of two of at least 16 and a positive count."""
    parts = text.split(sep)
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(text)
    block, stages = int(parts[0]), int(parts[1])
    if block < 16 or block & (block - 1) or stages < 1:
        raise ValueError(text)
    return block, stages


def pick_attention(batch: dict[str, Any], margin: float) -> str:
    """`+attn=...` for the fastest shape at realistic lengths, if it beats the default's time
    by `margin` (a fraction) and its output matches the first shape's to bf16 rounding."""
    timed = [r for r in batch.get("step_layout", []) if r["case"] == RAGGED]
    base = next((r["us"] for r in timed if r["tuning"] == shape_name(DEFAULT)), None)
    good = [r for r in timed if r["max_diff_vs_first"] < 1e-2]
    if base is None or not good:
        return ""
    best = min(good, key=lambda r: r["us"])
    if best["us"] > base * (1 - margin):
        return ""
    return "+attn=" + best["tuning"].replace(",", "-")


def pick_topk(sampler: dict[str, Any], margin: float) -> str:
    """`+topk=N` for the fastest split of the top-k selection with no token changed, if it
    beats the current setting's draw by `margin`."""
    splits = sampler.get("topk_slices", {})
    base = splits.get(str(TOPK_SLICES))
    same = {k: v for k, v in splits.items() if v["tokens_differ"] == 0}
    if base is None or not same:
        return ""
    best = min(same, key=lambda k: same[k]["draw_ms"])
    if int(best) == TOPK_SLICES or same[best]["draw_ms"] > base["draw_ms"] * (1 - margin):
        return ""
    return f"+topk={best}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=Path, help="probe_batch.py --out (with --tunings)")
    parser.add_argument("--sampler", type=Path, help="bench_generate.py --sampler-only --out")
    parser.add_argument("--margin", type=float, default=0.05)
    args = parser.parse_args()
    out = ""
    if args.batch and args.batch.exists():
        out += pick_attention(json.loads(args.batch.read_text()), args.margin)
    if args.sampler and args.sampler.exists():
        out += pick_topk(json.loads(args.sampler.read_text()).get("sampler", {}), args.margin)
    print(out)


if __name__ == "__main__":
    main()
