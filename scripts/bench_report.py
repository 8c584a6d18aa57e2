"""Benchmark the report stage on a synthetic store the size of the default sweep (docs/science.md).

    python scripts/bench_report.py              # 236,544 rollouts, 473,088 judgments
    python scripts/bench_report.py --samples 4  # a quick, smaller run

It times, in one run: the aggregation query alone (rates of every key at every layer, through
the layer_rates view); `report` end to end with plots and the JSON export; and the same rates
computed the way the JSON layout forces (load every judgments file, count in Python).
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from patchdb.config import SweepConfig
from patchdb.experiments import EXPERIMENTS, experiment_keys, key_label
from patchdb.report import build_report
from patchdb.report.aggregate import sweep_rates
from patchdb.report.importer import import_tree, read_tree
from patchdb.store import JudgeConfig, Judgment, Rollout, Store, open_store
from patchdb.store.sweeps import get_experiments, get_sweep, register_sweep, sweep_config

PHRASES = [
    "I do detect an injected thought.", "It seems to be about {w}.", "Nothing unusual here.",
    "I notice something like {w}, warm and familiar.", "I am not sure what I am sensing.",
    "There is a faint pattern, maybe {w}?", "No, I do not detect an injected thought.",
    "The thought feels vivid and specific.", "I keep coming back to the idea of {w}.",
]


def synthetic_answer(rng: random.Random, word: str) -> str:
    """About 300 characters, like a 100-token answer."""
    return " ".join(rng.choice(PHRASES).format(w=word or "nothing") for _ in range(8))


def build_store(db: Path, samples: int, seed: int = 0) -> tuple[int, int]:
    """A default sweep with every rollout and two judgments each; returns the row counts."""
    rng = random.Random(seed)
    store = open_store(str(db), create=True)
    config = SweepConfig(samples=samples)
    try:
        def fill(session: Any) -> tuple[int, int]:
            sweep, _ = register_sweep(session, config)
            judge = JudgeConfig(model="openai/gpt-5-nano", reasoning="medium",
                                template_version="bench", backend="openai")
            session.add(judge)
            session.flush()
            rollouts: list[dict[str, Any]] = []
            judgments: list[dict[str, Any]] = []
            for exp in get_experiments(session, sweep):
                d = EXPERIMENTS[exp.name]
                for source, target in experiment_keys(d, config.positive_words,
                                                      config.negative_words):
                    for layer in config.layers:
                        p = rng.random()  # each key and layer has its own success rate
                        for index in range(samples):
                            rid = len(rollouts) + 1
                            rollouts.append(dict(
                                id=rid, experiment_id=exp.id, patch_layer=layer,
                                source_word=source, target_word=target, sample_index=index,
                                answer=synthetic_answer(rng, target or source), n_tokens=100,
                                finish_reason="length", seed=index))
                            for grader in ("coherence", d.detection_grader):
                                roll = rng.random()
                                verdict = None if roll < 0.03 else roll < p
                                judgments.append(dict(rollout_id=rid, grader=grader,
                                                      judge_config_id=judge.id, verdict=verdict))
            session.execute(insert(Rollout), rollouts)
            session.execute(insert(Judgment), judgments)
            return len(rollouts), len(judgments)

        return store.transact(fill)
    finally:
        store.close()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds and the value; the CPU seconds go to the log (the machine may be busy)."""
    start, cpu = time.perf_counter(), time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    value = fn()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = time.process_time() - cpu + (after.ru_utime + after.ru_stime) - (
        children.ru_utime + children.ru_stime)
    CPU_LOG.append(used)
    return time.perf_counter() - start, value


CPU_LOG: list[float] = []


def cpu() -> str:
    return f"cpu {CPU_LOG[-1]:.2f} s"


def aggregate(store: Store) -> int:
    """The aggregation alone: one pass over layer_rates picks the judge config and the rates."""
    with store.read() as session:
        sweep = get_sweep(session, None)
        config = sweep_config(sweep)
        names = [e.name for e in get_experiments(session, sweep)]
        _, rates = sweep_rates(session, sweep, config, names)
    return sum(len(r.keys) for r in rates)


def rates_from_json(root: Path) -> dict[str, dict[int, dict[str, float | None]]]:
    """What a script on the JSON layout does: open every judgments file, count per key."""
    result: dict[str, dict[int, dict[str, float | None]]] = {}
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        grader = EXPERIMENTS[exp_dir.name].detection_grader
        for layer_dir in sorted(exp_dir.glob("layer_*")):
            coherence = json.loads((layer_dir / "judgments_coherence.json").read_text())
            # the plan's names: in a pair experiment judgments_detection.json holds det+id
            name = f"judgments_{grader}.json"
            if not (layer_dir / name).exists():
                name = "judgments_detection.json"
            detected = json.loads((layer_dir / name).read_text())
            layer: dict[str, float | None] = {}
            for key, verdicts in coherence.items():
                scored = [c and d for c, d in zip(verdicts, detected[key], strict=True)
                          if c is not None and d is not None]
                layer[key] = sum(scored) / len(scored) if scored else None
            result.setdefault(exp_dir.name, {})[int(layer_dir.name[6:])] = layer
    return result


def check_agreement(store: Store, from_json: dict[str, dict[int, dict[str, float | None]]]) -> None:
    """The two ways must give the same numbers, or the benchmark compares nothing."""
    with store.read() as session:
        sweep = get_sweep(session, None)
        config = sweep_config(sweep)
        names = [e.name for e in get_experiments(session, sweep)]
        _, all_rates = sweep_rates(session, sweep, config, names)
        for rates in all_rates:
            d = EXPERIMENTS[rates.name]
            for line in rates.keys:
                for i, layer in enumerate(rates.layers):
                    want = from_json[rates.name][layer][key_label(d, line.source_word,
                                                                  line.target_word)]
                    got = line.rate_at(i)
                    assert (want is None and got is None) or abs((want or 0) - (got or 0)) < 1e-9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="samples per key (64: full size)")
    parser.add_argument("--work", type=Path, help="folder for the store and report (default: temp)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="patchdb-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "bench.sqlite"
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    t_build, (n_rollouts, n_judgments) = timed(lambda: build_store(db, args.samples))
    print(f"built {n_rollouts:,} rollouts and {n_judgments:,} judgments in {t_build:.1f} s "
          f"({db.stat().st_size / 1e6:.0f} MB store; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores)")
    store = open_store(str(db))
    try:
        runs = []
        for _ in range(3):
            runs.append((*timed(lambda: aggregate(store)), CPU_LOG[-1]))
        print(f"aggregation query alone: {runs[0][0]:.2f} s first, "
              f"{min(r[0] for r in runs):.2f} s best of 3 "
              f"(cpu {min(r[2] for r in runs):.2f} s; {runs[0][1]} key lines)")
        out = work / "report"
        t_plots, _ = timed(lambda: build_report(store, out_dir=work / "plots_only"))
        print(f"report in-process, 4 plots, no export: {t_plots:.2f} s ({cpu()})")
        t_report, report = timed(lambda: build_report(store, out_dir=out, export_json=True))
        files = sum(len(e.exported) for e in report.experiments)
        print(f"report in-process, 4 plots + JSON export ({files} files): {t_report:.2f} s "
              f"({cpu()})")
        t_cli, _ = timed(lambda: subprocess.run(
            [sys.executable, "-m", "patchdb", "report", "--db", str(db), "--export-json",
             "--out", str(work / "report_cli")], check=True, capture_output=True))
        print(f"`patchdb report --export-json` end to end (new process): {t_cli:.2f} s "
              f"({cpu()})")
        t_json, from_json = timed(lambda: rates_from_json(out))
        print(f"same rates from the JSON layout (load every judgments file): {t_json:.2f} s "
              f"({cpu()})")
        check_agreement(store, from_json)
        print("the SQL rates and the JSON-layout rates agree")
        fresh = open_store(str(work / "imported.sqlite"), create=True)
        try:
            t_import, result = timed(lambda: import_tree(fresh, read_tree(out, "default")))
            print(f"import-json of the exported tree into a new store: {t_import:.2f} s "
                  f"({cpu()}; {result.new_rollouts:,} rollouts, {result.new_judgments:,} "
                  "judgments)")
            t_again, _ = timed(lambda: import_tree(fresh, read_tree(out, "default")))
            print(f"the same import again (nothing new): {t_again:.2f} s ({cpu()})")
        finally:
            fresh.close()
        print(f"load average now {os.getloadavg()[0]:.1f}")
    finally:
        store.close()


if __name__ == "__main__":
    main()
