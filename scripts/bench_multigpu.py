"""The same mini sweep on one GPU and under torchrun on N GPUs: same keys, none missing or
duplicated, and the throughput of each.

Saves a random-init Llama-shaped model (no weights are downloaded) with the test tokenizer to a
local folder, registers one sweep in two SQLite stores, then runs `patchdb generate --device
cuda:0` on one and `patchdb generate --gpus N` on the other, timing each command end to end
(process start and model load included).

    python scripts/bench_multigpu.py --gpus 2 --out multigpu.json
"""

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64)

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
        model = LlamaForCausalLM(config).to(torch.bfloat16)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--layers", default="7-14")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=100)
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
        one, many = work / "one.sqlite", work / "many.sqlite"
        for db in (one, many):
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
    same = sum(a[k] == b.get(k) for k in a)
    results.update(
        visible=env_note, rollouts_1=len(a), rollouts_n=len(b), same_keys=set(a) == set(b),
        missing_in_n=len(set(a) - set(b)), extra_in_n=len(set(b) - set(a)), identical_texts=same,
        wall_1_s=wall_1, wall_n_s=wall_n, tokens_1=tokens, tokens_n=tokens_n,
        tok_s_1=tokens / wall_1, tok_s_n=tokens_n / wall_n, speedup=(tokens_n / wall_n) / (tokens / wall_1),
        status_n=status,
    )
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "status_n"}, indent=2, default=str))


if __name__ == "__main__":
    main()
