"""How long `patchdb CMD --help` takes from a cold interpreter: the median of N runs per
subcommand, each a fresh `python -m patchdb CMD --help` (what a user waits for).

    .venv/bin/python scripts/bench_cli_help.py [--runs 7] [--json FILE] [CMD ...]

Point PYTHONPATH at another checkout's folder to time that code with the same interpreter.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT = ["", "init", "status", "generate", "judge", "report", "label", "calibrate", "sweep",
           "merge", "sweeps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", help="also write the timings to this file")
    parser.add_argument("commands", nargs="*", default=DEFAULT)
    args = parser.parse_args()
    results = {}
    print(f"{'command':<26} median s   min s  ({args.runs} runs each, load {os.getloadavg()[0]:.1f})")
    for cmd in args.commands:
        argv = [sys.executable, "-m", "patchdb", *([cmd] if cmd else []), "--help"]
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        name = f"patchdb {cmd} --help".replace("  ", " ")
        results[name] = {"median_s": statistics.median(times), "min_s": min(times),
                         "runs": args.runs}
        print(f"{name:<26} {statistics.median(times):8.2f} {min(times):7.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
                       "pythonpath": os.environ.get("PYTHONPATH", ""), "results": results},
                      out, indent=1)


if __name__ == "__main__":
    main()
