"""How long the in-process judge takes to exit after Ctrl-C, and what it keeps.

Builds a store of 64 answered rollouts whose sweep judges with the demo's in-process judge
(SmolLM2-135M, batches of 16, 24 new tokens, logprobs verdicts), starts `patchdb judge`, sends
SIGINT `--after` seconds after the model has loaded (mid-batch), and prints the seconds from the
signal to the exit, the exit code and the judgments stored. Timed by hand, not a test.

    python scripts/bench_judge_ctrl_c.py [--after 3] [--grace 10]
"""

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from patchdb.config import config_from_dict
from patchdb.store import open_store
from patchdb.store.models import Rollout
from patchdb.store.sweeps import expected_units, get_experiments, register_sweep

SWEEP = {"name": "bench", "model": "smollm2-135m", "steer_layer": 1, "patch_layers": "2-3",
         "samples": 2, "positive_words": ["Bread", "Trees"], "negative_words": ["Dust"],
         "experiments": ["steered_to_unsteered", "unsteered_to_steered"]}
JUDGE = {"backend": "hf", "model": "smollm2-135m", "reasoning": "none", "batch_size": 16,
         "max_new_tokens": 24, "verdict": "logprobs", "max_attempts": 1}


def make_store(db: Path) -> int:
    config = config_from_dict({"sweep": SWEEP, "judge": JUDGE})
    store = open_store(str(db), create=True)

    def fill(session: object) -> int:
        sweep, _ = register_sweep(session, config)  # type: ignore[arg-type]
        n = 0
        for unit in expected_units(config, get_experiments(session, sweep)):  # type: ignore[arg-type]
            for sample in range(config.samples):
                word = unit.target_word or unit.source_word
                session.add(Rollout(  # type: ignore[attr-defined]
                    experiment_id=unit.experiment_id, patch_layer=unit.patch_layer,
                    source_word=unit.source_word, target_word=unit.target_word,
                    sample_index=sample, answer=f"Yes, I notice a thought about {word}.",
                    n_tokens=10, finish_reason="stop", seed=sample))
                n += 1
        return n

    try:
        return store.transact(fill)
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=float, default=3.0, help="seconds after the load")
    parser.add_argument("--grace", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "store.sqlite"
        rollouts = make_store(db)
        proc = subprocess.Popen(
            [sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--no-progress",
             "--grace", str(args.grace)],
            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("Loaded "):
                break
        time.sleep(args.after)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        code = proc.wait()
        took = time.monotonic() - sent
        with sqlite3.connect(db) as conn:
            stored = conn.execute("SELECT count(*) FROM judgments").fetchone()[0]
    print(f"{2 * rollouts} calls in batches of 16; SIGINT {args.after:g} s after the load, "
          f"--grace {args.grace:g}: exit {code} after {took:.1f} s, {stored} judgments stored")
    print(rest.strip().splitlines()[-2] if rest.strip() else "(no output)")


if __name__ == "__main__":
    main()
