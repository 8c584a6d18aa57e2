"""`judge --batch` at 10,000 calls against the loopback batch server, killed mid-collect.

Builds two identical stores (5,008 rollouts, 10,016 judge calls), judges one with
`judge --batch` in a child process that kills itself (SIGKILL) after the 5th chunk of
judgments of the collection is written, reruns it, then judges the other live through the same
server's chat-completions endpoint, and compares the two verdict for verdict. The server
answers deterministically from directives in the answers ([[reply=NO]], [[reply=none]]).

    .venv/bin/python scripts/bench_judge_batch.py [--samples 313] [--concurrency 32]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from batch_server import batch_server  # noqa: E402
from judge_server import make_store  # noqa: E402


def answer(i: int, word: str) -> str:
    return f"I notice a thought about {word}. ({i})" + ["", " [[reply=NO]]", "",
                                                       " [[reply=none]]", " [[reply=NO]]"][i % 5]


def patchdb(db: Path, env: dict[str, str], *args: str) -> tuple[int, float, str]:
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "patchdb", "judge", "--db", str(db),
                          "--no-progress", *args], env=env, capture_output=True, text=True)
    return run.returncode, time.monotonic() - started, run.stdout + run.stderr


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def verdicts(db: Path) -> dict[tuple[str, str], object]:
    return {(a, g): v for a, g, v in rows(db, """SELECT r.answer, j.grader, j.verdict
        FROM judgments j JOIN rollouts r ON r.id = j.rollout_id""")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=313)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--kill-chunk", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    batch_db, live_db = tmp / "batch.sqlite", tmp / "live.sqlite"
    n_rollouts = make_store(batch_db, answer, samples=args.samples)
    make_store(live_db, answer, samples=args.samples)
    calls = 2 * n_rollouts
    print(f"{n_rollouts:,} rollouts, {calls:,} judge calls per store")
    with batch_server() as server:
        env = {**os.environ, "PATCHDB_JUDGE_BASE_URL": server.base_url,
               "PATCHDB_JUDGE_API_KEY": "sk-bench", "PATCHDB_JUDGE_BATCH_POLL": "0.05"}
        killed_env = {**env, "PATCHDB_FAULT": f"judge.batch_collect_chunk:{args.kill_chunk}"}
        code, first_s, out = patchdb(batch_db, killed_env, "--batch")
        assert code == -signal.SIGKILL, out
        (written,) = rows(batch_db, "SELECT count(*) FROM judgments")[0]
        print(f"batch run killed mid-collect after {first_s:.1f} s with {written:,} judgments "
              f"written (exit {code})")
        code, rerun_s, out = patchdb(batch_db, env, "--batch")
        assert code == 0, out
        summary = next(x for x in out.splitlines() if x.startswith("Submitted"))
        print(f"batch rerun: {rerun_s:.1f} s; {summary}")
        billed = server.state.billed
        code, live_s, out = patchdb(live_db, env, "--concurrency", str(args.concurrency))
        assert code == 0, out
        print(f"live run: {live_s:.1f} s; {out.strip().splitlines()[0]}")
        print(f"server: {dict(server.state.calls)}, live chat calls {server.state.live_calls:,}, "
              f"batch requests run {sum(billed.values()):,} for {len(billed):,} custom_ids "
              f"(most for one: {max(billed.values())})")
    live, batch = verdicts(live_db), verdicts(batch_db)
    differ = [k for k in live if live[k] != batch.get(k)]
    counts = rows(batch_db, "SELECT max(n), count(*) FROM (SELECT count(*) AS n FROM judgments "
                            "GROUP BY rollout_id, grader, judge_config_id)")[0]
    print(f"judgments: batch {len(batch):,}, live {len(live):,}; most rows for one key "
          f"{counts[0]} over {counts[1]:,} keys; verdicts that differ: {len(differ)}")
    tally = rows(batch_db, "SELECT verdict, count(*) FROM judgments GROUP BY 1 ORDER BY 1")
    print(f"batch verdicts (NULL = unparsed, 0 = NO, 1 = YES): {tally}")
    assert not differ and len(batch) == len(live) == calls and counts[0] == 1
    assert max(billed.values()) == 1 and len(billed) == calls
    print("OK: one judgment per key, nothing run twice, batch == live verdict for verdict")


if __name__ == "__main__":
    main()
