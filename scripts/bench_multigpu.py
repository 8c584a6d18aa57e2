"""The same mini sweep on one GPU and under torchrun on N GPUs: same keys, none missing or
duplicated, and the throughput of each.

Saves a random-init Llama-shaped model (no weights are downloaded) with the test tokenizer to a
local folder, registers one sweep in two SQLite stores, then runs `patchdb generate --device
cuda:0` on one and `patchdb generate --gpus N` on the other, timing each command end to end
(process start and model load included). Then, on a third store and a few layers, one model copy
spread over the N cards (`--gpus N --gpus-per-model N`, eager decode), checked against the
one-GPU keys of those layers.

    python scripts/bench_multigpu.py --gpus 2 --out multigpu.json
"""

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPE: dict[str, Any] = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64)

CONFIG = """
[sweep]
name = "multigpu"
model = "{model}"
dtype = "bfloat16"
steer_layer = 6
strength = 4.0
patch_layers = "{layers}"
samples = {samples}
max_new_tokens = {new_tokens}
temperature = 1.0
positive_words = ["Bread", "Trees", "Origami", "Volcanoes", "Lightning", "Satellites"]
negative_words = ["Dust", "Milk", "Silence", "Sugar"]
"""


def save_model(folder: Path, device: str) -> None:
    from tiny_models import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **SHAPE)
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def patchdb(*args: str) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "patchdb", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"patchdb {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return wall, proc.stdout


def rows(db: Path) -> dict[tuple[object, ...], str]:
    con = sqlite3.connect(db)
    got = con.execute(
        "SELECT e.name, r.patch_layer, r.source_word, r.target_word, r.sample_index, r.answer "
        "FROM rollouts r JOIN experiments e ON e.id = r.experiment_id").fetchall()
    keys = [tuple(row[:5]) for row in got]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"{db}: duplicated keys")
    return {tuple(row[:5]): row[5] for row in got}


def spread_run(db: Path, one: dict[tuple[object, ...], str], args: argparse.Namespace,
               device: str) -> dict[str, object]:
    """One model copy over all N cards on a few layers, against the one-GPU rows of those layers."""
    cards = ["--gpus", str(args.gpus), "--gpus-per-model", str(args.gpus)] if device != "cpu" else [
        "--device", "cpu"]
    wall, out = patchdb("generate", "--db", str(db), "--layers", args.spread_layers, *cards, "--quiet")
    print(f"1 model over {args.gpus} GPUs, layers {args.spread_layers}: {wall:.1f} s\n{out}", flush=True)
    got = rows(db)
    layers = {key[1] for key in got}
    want = {k: v for k, v in one.items() if k[1] in layers}
    tokens = sqlite3.connect(db).execute("SELECT sum(n_tokens) FROM rollouts").fetchone()[0]
    return {"layers": args.spread_layers, "rollouts": len(got), "same_keys": set(got) == set(want),
            "missing": len(set(want) - set(got)), "extra": len(set(got) - set(want)),
            "identical_texts": sum(want[k] == got.get(k) for k in want), "wall_s": wall,
            "tokens": tokens, "tok_s": tokens / wall, "stdout": out.strip()}


def stage_seconds(stdout: str) -> float:
    """The generate stage's own time (model loaded), the slowest rank's when there are several."""
    return max(float(x) for x in re.findall(r"tokens in ([0-9.]+) s", stdout))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--layers", default="7-14")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--spread-layers", default="7-8",
                        help="layers for the one-model-over-N-cards run ('' skips it)")
    parser.add_argument("--out", type=Path, default=Path("multigpu.json"))
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, to check the script")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda:0"
    if args.smoke:
        SHAPE.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16)
    results: dict[str, object] = {"gpus": args.gpus,
                                  "card": torch.cuda.get_device_name(0) if not args.smoke else "cpu",
                                  "shape": {"family": "llama", **SHAPE}, "layers": args.layers,
                                  "samples": args.samples, "new_tokens": args.new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_model(work / "model", device)
        config = work / "sweep.toml"
        config.write_text(CONFIG.format(model=work / "model", layers=args.layers,
                                        samples=args.samples, new_tokens=args.new_tokens))
        one, many, spread = work / "one.sqlite", work / "many.sqlite", work / "spread.sqlite"
        for db in (one, many, spread):
            patchdb("init", "--config", str(config), "--db", str(db))
        env_note = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
        wall_1, out_1 = patchdb("generate", "--db", str(one), "--device", device, "--quiet")
        print(f"1 GPU: {wall_1:.1f} s\n{out_1}", flush=True)
        wall_n, out_n = patchdb("generate", "--db", str(many), "--gpus", str(args.gpus), "--quiet")
        print(f"{args.gpus} GPUs: {wall_n:.1f} s\n{out_n}", flush=True)
        a, b = rows(one), rows(many)
        tokens = sqlite3.connect(one).execute("SELECT sum(n_tokens) FROM rollouts").fetchone()[0]
        tokens_n = sqlite3.connect(many).execute("SELECT sum(n_tokens) FROM rollouts").fetchone()[0]
        status = json.loads(patchdb("status", "--db", str(many), "--json")[1])
        if args.spread_layers:
            results["spread"] = spread_run(spread, a, args, device)
    same = sum(a[k] == b.get(k) for k in a)
    results.update(
        visible=env_note, rollouts_1=len(a), rollouts_n=len(b), same_keys=set(a) == set(b),
        missing_in_n=len(set(a) - set(b)), extra_in_n=len(set(b) - set(a)), identical_texts=same,
        wall_1_s=wall_1, wall_n_s=wall_n, tokens_1=tokens, tokens_n=tokens_n,
        tok_s_1=tokens / wall_1, tok_s_n=tokens_n / wall_n, speedup=(tokens_n / wall_n) / (tokens / wall_1),
        stage_s_1=stage_seconds(out_1), stage_s_n=stage_seconds(out_n),
        stage_speedup=(tokens_n / stage_seconds(out_n)) / (tokens / stage_seconds(out_1)),
        status_n=status, stdout_1=out_1.strip(), stdout_n=out_n.strip(),
    )
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "status_n"}, indent=2, default=str))


if __name__ == "__main__":
    main()
