"""Benchmark `patchdb report --html` on a synthetic store the size of the default sweep.

    python scripts/bench_report_html.py                      # 236,544 rollouts, 473,088 judgments
    python scripts/bench_report_html.py --samples 4          # a quick, smaller run
    python scripts/bench_report_html.py --work /tmp/b --keep # reuse the store built last time
    python scripts/bench_report_html.py --profile            # also where write_html_report's time goes
    python scripts/bench_report_html.py --work /tmp/b --keep --against /tmp/old  # A/B, see below

The store is scripts/bench_report.py's (every rollout of the default sweep, two judgments each,
bulk inserted). It times `patchdb report --html` end to end in a new process (wall and CPU
seconds), then prints the size of report.html and of the rollout pages beside it.

On a shared machine CPU seconds grow with the load (the other processes' work slows this one's
caches and cores), so a figure from another hour is no baseline. `--against DIR` times the
patchdb of another source tree too (for instance `git archive <commit> | tar -x -C DIR`), its
runs alternating with this tree's, so both see the same load.
"""

import argparse
import cProfile
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import build_store  # noqa: E402  (a sibling script, not a package)

from patchdb.report.html import write_html_report  # noqa: E402
from patchdb.store import open_store  # noqa: E402


def report_cli(db: Path, out: Path, tree: Path | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of `patchdb report --html` in a new process (into an empty folder),
    with the patchdb of `tree` where given."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "patchdb", "report", "--db", str(db), "--html",
                    "--out", str(out)], check=True, capture_output=True, env=env,
                   cwd=tree or Path.cwd())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def sizes(out: Path) -> str:
    """report.html's size, and the other HTML pages under `out` (count, total, largest)."""
    page = out / "report.html"
    others = [p for p in out.rglob("*.html") if p != page]
    text = f"report.html {page.stat().st_size / 1e6:.2f} MB"
    if others:
        total = sum(p.stat().st_size for p in others)
        largest = max(others, key=lambda p: p.stat().st_size)
        text += (f"; {len(others)} more pages, {total / 1e6:.1f} MB in all, the largest "
                 f"{largest.stat().st_size / 1e3:.0f} kB ({largest.relative_to(out)})")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="samples per key (64: full size)")
    parser.add_argument("--work", type=Path, help="folder for the store and report (default: temp)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the store already in --work (built with the same --samples)")
    parser.add_argument("--runs", type=int, default=3, help="report runs (the best is quoted)")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="also time the patchdb of this source tree, runs alternating")
    parser.add_argument("--profile", action="store_true",
                        help="also profile write_html_report in this process (top 25, cumulative)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="patchdb-bench-html-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "bench.sqlite"
    if not (args.keep and db.exists()):
        for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            stale.unlink(missing_ok=True)
        start = time.perf_counter()
        n_rollouts, n_judgments = build_store(db, args.samples)
        print(f"built {n_rollouts:,} rollouts and {n_judgments:,} judgments in "
              f"{time.perf_counter() - start:.1f} s ({db.stat().st_size / 1e6:.0f} MB store)")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    trees: dict[str, Path | None] = {"this tree": None}
    if args.against is not None:
        trees[str(args.against)] = args.against.resolve()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for i in range(args.runs):
        for name, tree in trees.items():
            out = work / f"report_{i}" if tree is None else work / f"against_{i}"
            load = os.getloadavg()[0]
            wall, cpu = report_cli(db, out, tree)
            runs[name].append((wall, cpu))
            print(f"`patchdb report --html` run {i + 1} ({name}): {wall:.2f} s wall, "
                  f"{cpu:.2f} s CPU, load average {load:.2f}")
    for name, timed in runs.items():
        best = min(timed)
        print(f"{name}: best of {len(timed)} {best[0]:.2f} s wall ({best[1]:.2f} s CPU); median "
              f"{statistics.median(w for w, _ in timed):.2f} s wall, "
              f"{statistics.median(c for _, c in timed):.2f} s CPU")
    print(sizes(work / f"report_{args.runs - 1}"))
    if args.profile:
        store = open_store(str(db))
        profiler = cProfile.Profile()
        try:
            profiler.runcall(write_html_report, store, None, work / "profiled")
        finally:
            store.close()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    print(f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
