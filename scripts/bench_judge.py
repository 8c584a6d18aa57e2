"""Benchmark `patchdb judge` against a bare AsyncOpenAI loop on a loopback server.

Builds a synthetic store of --rollouts rollouts, starts tests/judge_server.py's asyncio server
in a separate process (fixed reply after --latency seconds), then measures calls per second

  1. for `python -m patchdb judge` at --concurrency (reads, renders, writes every judgment),
  2. for a bare loop of AsyncOpenAI calls at the same concurrency that writes nothing, once
     with one client (one connection pool of --concurrency connections) and once with the
     same small pools patchdb uses (patchdb.judge.client.POOL_SIZE connections per client).

Usage: python scripts/bench_judge.py [--rollouts 50000] [--calls N] [--concurrency 256]
"""

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from judge_server import serve_fast  # noqa: E402

from patchdb.config import SweepConfig  # noqa: E402
from patchdb.judge.client import POOL_SIZE  # noqa: E402
from patchdb.judge.templates import DEFAULT_TEMPLATES  # noqa: E402
from patchdb.store import Rollout, open_store  # noqa: E402
from patchdb.store.sweeps import expected_units, get_experiments, register_sweep  # noqa: E402

ANSWER = ("I do notice something unusual: a thought about {word} keeps surfacing, as if it "
          "had been placed there. It feels separate from the question. ({i})")


def build_store(path: Path, n_rollouts: int) -> int:
    """A default-word sweep with enough layers and samples, cut to exactly n_rollouts rows."""
    samples = 64
    n_layers = -(-n_rollouts // (176 * samples))
    config = SweepConfig(name="bench", patch_layers=f"40-{39 + n_layers}", samples=samples)
    store = open_store(str(path), create=True)

    def fill(session: object) -> int:
        sweep, _ = register_sweep(session, config)  # type: ignore[arg-type]
        rows = []
        for unit in expected_units(config, get_experiments(session, sweep)):  # type: ignore
            for sample in range(samples):
                if len(rows) == n_rollouts:
                    break
                rows.append({
                    "experiment_id": unit.experiment_id, "patch_layer": unit.patch_layer,
                    "source_word": unit.source_word, "target_word": unit.target_word,
                    "sample_index": sample, "answer": ANSWER.format(
                        word=unit.target_word or unit.source_word, i=len(rows)),
                    "n_tokens": 40, "finish_reason": "length", "seed": sample,
                })
        session.execute(Rollout.__table__.insert(), rows)  # type: ignore[attr-defined]
        return len(rows)

    try:
        return store.transact(fill)
    finally:
        store.close()


async def bare_loop(url: str, n_calls: int, concurrency: int, per_pool: int) -> float:
    """Calls per second of a loop that only calls the API (prompts like the judge's)."""
    import httpx2
    import openai

    per_pool = min(per_pool, concurrency)
    limits = httpx2.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
    clients = [
        openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=60,
                           http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=60))
        for _ in range(-(-concurrency // per_pool))
    ]
    prompts = [DEFAULT_TEMPLATES.render("coherence", "Trial 1?", ANSWER.format(word="Bread", i=i),
                                        "Bread") for i in range(n_calls)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)

    async def worker(slot: int) -> None:
        client = clients[slot // per_pool]
        while not queue.empty():
            prompt = queue.get_nowait()
            reply = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": prompt}],
                extra_body={"reasoning": {"effort": "medium"}},
            )
            assert reply.choices[0].finish_reason == "stop"

    started = time.monotonic()
    await asyncio.gather(*(worker(s) for s in range(concurrency)))
    elapsed = time.monotonic() - started
    for c in clients:
        await c.close()
    return n_calls / elapsed


def run_patchdb(db: Path, url: str, n_calls: int, concurrency: int) -> tuple[float, str]:
    env = {**os.environ, "PATCHDB_JUDGE_API_KEY": "bench"}
    cmd = [sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--base-url", url,
           "--concurrency", str(concurrency), "--limit", str(n_calls), "--no-progress"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    match = re.search(r"\(([\d.]+) calls/s\)", out)
    assert match, out
    return float(match.group(1)), out.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=50_000)
    ap.add_argument("--calls", type=int, default=None,
                    help="calls to time per variant (default: every call, 2 per rollout)")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.1)
    args = ap.parse_args()
    ready: mp.Queue[int] = mp.Queue()
    server = mp.Process(target=serve_fast, args=(0, args.latency, ready), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ready.get()}/v1"
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.sqlite"
        started = time.monotonic()
        n = build_store(db, args.rollouts)
        n_calls = args.calls or 2 * n
        print(f"store: {n:,} rollouts ({2 * n:,} calls) built in {time.monotonic() - started:.1f}s;"
              f" timing {n_calls:,} calls per variant at concurrency {args.concurrency}, "
              f"server latency {args.latency * 1000:.0f} ms, {os.cpu_count()} CPUs")
        rate, out = run_patchdb(db, url, n_calls, args.concurrency)
        print(f"patchdb judge:                      {rate:8.1f} calls/s   [{out.splitlines()[0]}]")
        pooled = asyncio.run(bare_loop(url, n_calls, args.concurrency, POOL_SIZE))
        print(f"bare AsyncOpenAI, pools of {POOL_SIZE:<3}:      {pooled:8.1f} calls/s")
        single = asyncio.run(bare_loop(url, n_calls, args.concurrency, args.concurrency))
        print(f"bare AsyncOpenAI, one pool:         {single:8.1f} calls/s")
        print(f"patchdb / bare (same pools): {rate / pooled:.0%};  "
              f"patchdb / bare (one pool): {rate / single:.0%}")
    server.terminate()


if __name__ == "__main__":
    main()
