"""Fault injection: generate, judge and import kill themselves (SIGKILL) at seeded named points.

After every kill the store holds whole units only (all of a unit's samples or none, one row per
judged call), `patchdb status --json` calls the killed stage `crashed`, and the rerun ends with
exactly the rows of an uninterrupted run. The kills are deterministic: the process under test
stops itself at a named point (PATCHDB_FAULT, patchdb/faults.py) chosen from a fixed seed, never
after a sleep, so the same kills land on every machine however fast it is.
"""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from judge_server import FaultServer, fault_server, make_store
from pg import query as store_query
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.faults

SEED = 9  # the kill points are drawn from this seed
SAMPLES = 2
UNITS = 22  # 4 experiments x 2 keys x 2 patch layers, and 6 baselines (one per target condition)
JUDGE_SAMPLES = 6  # 8 keys x 2 layers x 6 samples = 96 rollouts, 192 judge calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "m")


def sweep_toml(path: Path, model: Path) -> Path:
    path.write_text(f"""[sweep]
name = "tiny"
model = "{model}"
dtype = "float32"
steer_layer = 1
strength = 4.0
patch_layers = "2-3"
samples = {SAMPLES}
max_new_tokens = 4
temperature = 0.0
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
""")
    return path


def query(db: str | Path, sql: str) -> list[tuple]:
    """Rows of one SELECT on a SQLite path or a PostgreSQL URL."""
    return store_query(db, sql)


def rollout_keys(db: str | Path) -> list[tuple]:
    return query(db, """SELECT e.name, r.patch_layer, r.source_word, r.target_word, r.sample_index
        FROM rollouts r JOIN experiments e ON e.id = r.experiment_id ORDER BY 1, 2, 3, 4, 5""")


def expected_keys() -> list[tuple]:
    """The keys an uninterrupted run writes (the experiments of docs/science.md; NO_STEERING is '')."""
    pairs = [("Dust", "Bread"), ("Dust", "Trees")]
    keys = {
        "failure_to_success": pairs,
        "success_to_failure": [(t, s) for s, t in pairs],
        "steered_to_unsteered": [("Bread", ""), ("Trees", "")],
        "unsteered_to_steered": [("", "Bread"), ("", "Trees")],
    }
    # and one baseline (patch layer -1, no source) per target condition of each experiment
    baselines = [("failure_to_success", "Bread"), ("failure_to_success", "Trees"),
                 ("success_to_failure", "Dust"), ("steered_to_unsteered", ""),
                 ("unsteered_to_steered", "Bread"), ("unsteered_to_steered", "Trees")]
    return sorted([(exp, layer, src, tgt, i) for exp, ks in keys.items() for layer in (2, 3)
                   for src, tgt in ks for i in range(SAMPLES)]
                  + [(exp, -1, "", tgt, i) for exp, tgt in baselines for i in range(SAMPLES)])


def assert_whole_units(db: str | Path) -> int:
    """No duplicate key, and every unit has all its samples or none; returns the rollout count."""
    dup = query(db, """SELECT count(*) FROM (SELECT experiment_id, patch_layer, source_word,
        target_word, sample_index FROM rollouts GROUP BY 1, 2, 3, 4, 5 HAVING count(*) > 1) d""")
    assert dup == [(0,)]
    sizes = query(db, """SELECT count(*) FROM rollouts
        GROUP BY experiment_id, patch_layer, source_word, target_word""")
    assert {n for (n,) in sizes} <= {SAMPLES}, sizes
    return sum(n for (n,) in sizes)


def stage_statuses(db: str | Path) -> dict[int, str]:
    """pid -> status, as `patchdb status --json` reports it."""
    result = run_cli("status", "--db", db, "--json")
    assert result.exit_code == 0, result.output
    return {s["pid"]: s["status"] for s in json.loads(result.stdout)["stages"]}


def run_until_fault(command: list[str], fault: str, env: dict[str, str] | None = None
                    ) -> subprocess.CompletedProcess[str]:
    """Run the command with PATCHDB_FAULT set: the process kills itself at that named point."""
    env = dict(os.environ if env is None else env, PATCHDB_FAULT=fault)
    return subprocess.run(command, env=env, text=True, capture_output=True, timeout=300)


def assert_killed(proc: subprocess.CompletedProcess[str]) -> None:
    """The process ended by its own SIGKILL at the fault point (not by finishing or failing)."""
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout + proc.stderr)


def count(db: str | Path, table: str) -> int:
    return int(query(db, f"SELECT count(*) FROM {table}")[0][0])  # constant table names only


def test_generate_killed_at_seeded_points_then_rerun_equals_one_run(
    tmp_path: Path, model_dir: Path, store_db: str
) -> None:
    """On SQLite and on PostgreSQL: whole units after every kill, one run's rows after the rerun."""
    rng = random.Random(SEED)
    config = sweep_toml(tmp_path / "sweep.toml", model_dir)
    killed = store_db
    assert run_cli("init", "--config", config, "--db", killed).exit_code == 0
    command = [sys.executable, "-m", "patchdb", "generate", "--db", killed, "--quiet",
               "--batch-size", "1"]
    pids = []
    for point in ("generate.unit_written", "generate.batch_decoded", "generate.unit_written"):
        before = assert_whole_units(killed)
        units_left = UNITS - before // SAMPLES
        n = rng.randint(1, units_left - 1)  # a unit that is never the last: the kill lands mid-run
        proc = run_until_fault(command, f"{point}:{n}")
        assert_killed(proc)
        present = assert_whole_units(killed)
        if point == "generate.unit_written":  # killed right after the n-th unit's commit
            assert present == before + n * SAMPLES
        else:  # killed with the n-th batch decoded but not written: that work is lost, no more
            assert before <= present < before + n * SAMPLES
        assert present < UNITS * SAMPLES
        statuses = stage_statuses(killed)
        new = [pid for pid in statuses if pid not in pids]
        assert [statuses[pid] for pid in new] == ["crashed"]
        pids += new

    rerun = subprocess.run(command, text=True, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert assert_whole_units(killed) == UNITS * SAMPLES
    assert rollout_keys(killed) == expected_keys()
    statuses = list(stage_statuses(killed).values())
    assert statuses.count("crashed") == 3 and statuses.count("finished") == 1


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server(latency_s=0.03) as srv:
        yield srv


def judge_env(server: FaultServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDB_JUDGE")}
    env.update(PATCHDB_JUDGE_BASE_URL=server.base_url, PATCHDB_JUDGE_API_KEY="sk-test",
               PATCHDB_JUDGE_BACKOFF="0.01", PATCHDB_JUDGE_PROGRESS="0")
    return env


def judgment_rows(db: str | Path) -> list[tuple]:
    return query(db, """SELECT e.name, r.patch_layer, r.source_word, r.target_word,
        r.sample_index, j.grader, j.verdict, j.raw_reply, j.error
        FROM judgments j JOIN rollouts r ON r.id = j.rollout_id
        JOIN experiments e ON e.id = r.experiment_id ORDER BY 1, 2, 3, 4, 5, 6""")


def test_judge_killed_at_seeded_points_then_rerun_equals_one_run(
    tmp_path: Path, server: FaultServer, store_db: str
) -> None:
    """On SQLite and on PostgreSQL: the killed store ends equal to an uninterrupted SQLite run."""
    rng = random.Random(SEED)
    reference, killed = tmp_path / "reference.sqlite", store_db
    n = make_store(reference, samples=JUDGE_SAMPLES)
    make_store(killed, samples=JUDGE_SAMPLES)
    env = judge_env(server)
    command = [sys.executable, "-m", "patchdb", "judge", "--db"]
    subprocess.run([*command, str(reference)], env=env, check=True, capture_output=True, timeout=120)
    assert count(reference, "judgments") == 2 * n

    pids: list[int] = []
    for point in ("judge.reply", "judge.batch_written", "judge.reply", "judge.reply"):
        before = count(killed, "judgments")
        # The n-th reply of the calls still to make, never the last one: the kill lands mid-run.
        # A write batch holds at least one reply, so batch 1 always comes before the end too.
        k = rng.randint(1, min(40, 2 * n - before - 1)) if point == "judge.reply" else 1
        proc = run_until_fault([*command, killed, "--concurrency",
                                str(rng.choice([1, 4, 8]))], f"{point}:{k}", env)
        assert_killed(proc)
        after = count(killed, "judgments")
        if point == "judge.reply":  # rows are written only for replies received
            assert before <= after <= before + k
        else:  # killed right after its first write batch committed
            assert before < after
        assert after < 2 * n
        assert query(killed, """SELECT count(*) FROM (SELECT rollout_id, grader,
            judge_config_id FROM judgments GROUP BY 1, 2, 3 HAVING count(*) > 1) d""") == [(0,)]
        assert query(killed, "SELECT count(*) FROM judgments WHERE raw_reply IS NULL "
                           "AND error IS NULL") == [(0,)]  # a stored judgment is a whole one
        statuses = stage_statuses(killed)
        new = [pid for pid in statuses if pid not in pids]
        assert [statuses[pid] for pid in new] == ["crashed"]
        pids += new

    rerun = subprocess.run([*command, killed], env=env, text=True, capture_output=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert judgment_rows(killed) == judgment_rows(reference)
    assert query(killed, "SELECT count(*) FROM judge_configs") == [(1,)]
    statuses = list(stage_statuses(killed).values())
    assert statuses.count("crashed") == 4 and statuses.count("finished") == 1


def test_import_json_killed_at_each_point_imports_all_or_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for layer in range(40, 46):
        path = tree / "unsteered_to_steered" / f"layer_{layer}" / "rollouts.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({w: [f"{w} {i} " + "words " * 200 for i in range(60)]
                                    for w in ("Bread", "Trees", "Milk")}))
    expected = 6 * 3 * 60
    reference, db = tmp_path / "reference.sqlite", tmp_path / "store.sqlite"
    for path in (reference, db):
        assert run_cli("init", "--db", path).exit_code == 0
    command = [sys.executable, "-m", "patchdb", "import-json", str(tree), "--db"]
    subprocess.run([*command, str(reference)], check=True, capture_output=True, timeout=120)
    command.append(str(db))
    # Inside the one transaction: nothing of it may remain.
    for point in ("import.rollouts_inserted", "import.before_commit"):
        assert_killed(run_until_fault(command, f"{point}:1"))
        assert count(db, "rollouts") == 0
        assert query(db, "PRAGMA integrity_check") == [("ok",)]
    # Right after the commit: all of it is there, although the process never finished.
    assert_killed(run_until_fault(command, "import.committed:1"))
    assert count(db, "rollouts") == expected
    done = subprocess.run(command, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count(db, "rollouts") == expected
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    answers = "SELECT patch_layer, target_word, sample_index, answer FROM rollouts ORDER BY 1, 2, 3"
    assert query(db, answers) == query(reference, answers)


def test_a_stage_on_another_host_is_crashed_once_its_heartbeat_is_stale(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    make_store(db)
    with sqlite3.connect(db) as conn:
        for host, age_s in (("gpu-box", 300), ("gpu-box", 5)):
            conn.execute(
                "INSERT INTO stage_runs (stage, sweep_id, arguments, host, pid, status, started_at, "
                "heartbeat_at) VALUES ('generate', 1, '{}', ?, ?, 'running', "
                "datetime('now', ?), datetime('now', ?))",
                (host, 1000 + age_s, f"-{age_s + 60} seconds", f"-{age_s} seconds"))
    assert stage_statuses(db) == {1300: "crashed", 1005: "running"}


def test_a_fault_point_fires_on_its_nth_pass_only(tmp_path: Path) -> None:
    """The fault hook itself: the signal comes on the named point's n-th pass, not before."""
    script = ("from patchdb.faults import fault_point\n"
              "for i in range(1, 6):\n"
              "    fault_point('other')\n"
              "    print(i, flush=True)\n"
              "    fault_point('here')\n")
    for fault, printed, code in (("here:3", "1 2 3", -signal.SIGKILL),
                                 ("here:2:TERM", "1 2", -signal.SIGTERM),
                                 ("nowhere:1", "1 2 3 4 5", 0)):
        proc = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True,
                              env=dict(os.environ, PATCHDB_FAULT=fault), timeout=60)
        assert (proc.stdout.split(), proc.returncode) == (printed.split(), code)
