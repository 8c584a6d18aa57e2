"""Benchmark several `patchdb judge` workers on one store: calls sent, judgments stored, wall time.

For each worker count in --workers: builds a fresh store with --calls pending judge calls (two a
rollout), starts a loopback OpenAI-compatible server in a process of its own that answers every
request after --latency seconds and counts the requests, runs that many real
`python -m patchdb judge --concurrency C` processes side by side, and prints the calls the
server was sent, the judgments stored, the calls each worker said it made, the wall time from
the first start to the last exit, that time as a share of the first worker count's, and the
CPU seconds the workers used together (on a busy machine, what they could not get shows as
wall time).

Usage: python scripts/bench_judge_workers.py --workers 1,2,4 [--db postgresql://host/db]
       [--calls 2000] [--latency 0.1] [--concurrency 4] [--json scripts/results/NAME.json]

Without --db each run's store is a SQLite file in a temporary folder. With a PostgreSQL URL,
each run gets a fresh database on that server, named after the URL's with a random suffix
(its user must be allowed to create databases), dropped afterwards.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_judge import build_store  # noqa: E402
from judge_server import completion_body  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from patchdb.store import open_store  # noqa: E402
from patchdb.store.engine import with_driver  # noqa: E402


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes,
                  latency_s: float, sent: Any) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:].strip())
            if length:
                await reader.readexactly(length)
            with sent.get_lock():
                sent.value += 1
            await asyncio.sleep(latency_s)
            writer.write(response)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _serve(latency_s: float, sent: Any, ready: Any) -> None:
    data = json.dumps(completion_body("Reasoned briefly. Verdict: YES")).encode()
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    server = await asyncio.start_server(
        lambda r, w: _answer(r, w, response, latency_s, sent), "127.0.0.1", 0, backlog=2048)
    ready.put(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def serve_counting(latency_s: float, sent: Any, ready: Any) -> None:
    """Process target: answer every request after latency_s, counting requests in `sent`."""
    asyncio.run(_serve(latency_s, sent, ready))


@contextmanager
def fresh_store(db: str | None, tmp: Path, run: int) -> Iterator[str]:
    """A location for an empty store: a SQLite file, or a new database on db's server."""
    if db is None:
        yield str(tmp / f"bench-{run}.sqlite")
        return
    url = make_url(with_driver(db))
    name = f"{url.database}_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))  # a generated name, not user input
        yield url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def judged(db: str) -> int:
    store = open_store(db)
    try:
        with store.read() as session:
            return int(session.execute(text("SELECT count(*) FROM judgments")).scalar_one())
    finally:
        store.close()


def run_workers(db: str, n_workers: int, latency_s: float, concurrency: int) -> dict[str, Any]:
    """Start n_workers judge processes on db at once against a fresh counting server."""
    sent = mp.Value("q", 0)
    ready: mp.Queue[int] = mp.Queue()
    server = mp.Process(target=serve_counting, args=(latency_s, sent, ready), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{ready.get()}/v1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDB_")}
    env.update(PATCHDB_DB=db, PATCHDB_JUDGE_API_KEY="bench")  # a URL stays off the command line
    cmd = [sys.executable, "-m", "patchdb", "judge", "--base-url", url, "--concurrency",
           str(concurrency), "--no-progress"]
    cpu_before = _children_cpu()
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(n_workers)]
    outputs = [p.communicate() for p in procs]
    wall = time.monotonic() - started
    cpu = _children_cpu() - cpu_before
    server.terminate()
    server.join()  # reaped now, so its CPU is not counted in the next run
    for p, (out, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"a judge worker exited {p.returncode}:\n{out}{err}")
    each = [int(m.group(1).replace(",", "")) if (m := re.search(r"Judged ([\d,]+) calls", out))
            else -1 for out, _err in outputs]
    # each worker's own time from its first claim to its exit (its summary line)
    runs = [float(m.group(1)) if (m := re.search(r"calls in ([\d.]+)s", out)) else 0.0
            for out, _err in outputs]
    return {"sent": sent.value, "judged": judged(db), "each": each, "wall": wall, "cpu": cpu,
            "worker_s": runs}


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's children that have exited."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4",
                    help="worker counts to run, comma-separated (default 1,2,4)")
    ap.add_argument("--db", help="a PostgreSQL URL whose server gets a fresh database per run "
                                 "(default: a SQLite file)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write the rows and the settings here")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    where = "PostgreSQL" if args.db else "SQLite"
    print(f"{where} store, {args.calls:,} calls, server latency {args.latency * 1000:.0f} ms, "
          f"--concurrency {args.concurrency} per worker, {os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'calls sent':>10} {'judgments':>9} {'sent/judged':>11} "
          f"{'wall s':>7} {'vs first':>8} {'worker CPU s':>12}  calls (s) per worker")
    first, rows = None, []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for run, n_workers in enumerate(counts):
            with fresh_store(args.db, Path(tmp), run) as db:
                rollouts = build_store(db, args.calls // 2)  # type: ignore[arg-type]
                assert 2 * rollouts == args.calls
                got = run_workers(db, n_workers, args.latency, args.concurrency)
            first = first or got["wall"]
            rows.append({"workers": n_workers, **got, "wall_vs_first": got["wall"] / first})
            print(f"{n_workers:>7} {got['sent']:>10,} {got['judged']:>9,} "
                  f"{got['sent'] / max(1, got['judged']):>11.3f} {got['wall']:>7.1f} "
                  f"{got['wall'] / first:>8.2f} {got['cpu']:>12.1f}  "
                  f"{' '.join(f'{c} ({t:.1f})' for c, t in zip(got['each'], got['worker_s'], strict=True))}")
    load = (load_before, os.getloadavg())
    print(f"load average (1, 5, 15 min) before: {load[0][0]:.1f} {load[0][1]:.1f} "
          f"{load[0][2]:.1f}; after: {load[1][0]:.1f} {load[1][1]:.1f} {load[1][2]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({
            "store": where, "calls": args.calls, "latency_s": args.latency,
            "concurrency": args.concurrency, "cpus": os.cpu_count(), "load_average": load,
            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
