"""Fault injection: `kill -9` generate and judge at seeded random points, then rerun.

After every kill the store holds whole units only (all of a unit's samples or none, one row per
judged call), `patchdb status --json` calls the killed stage `crashed`, and the rerun ends with
exactly the rows of an uninterrupted run.
"""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from judge_server import FaultServer, fault_server, make_store
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.faults

SEED = 9  # the kill points are drawn from this seed
SAMPLES = 2
UNITS = 16  # 4 experiments x 2 keys x 2 patch layers
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


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(db, timeout=60) as conn:
        return conn.execute(sql, params).fetchall()


def rollout_keys(db: Path) -> list[tuple]:
    return query(db, """SELECT e.name, r.patch_layer, r.source_word, r.target_word, r.sample_index
        FROM rollouts r JOIN experiments e ON e.id = r.experiment_id ORDER BY 1, 2, 3, 4, 5""")


def expected_keys() -> list[tuple]:
    """The keys an uninterrupted run writes (SPEC.md's experiments; NO_STEERING is '')."""
    pairs = [("Dust", "Bread"), ("Dust", "Trees")]
    keys = {
        "failure_to_success": pairs,
        "success_to_failure": [(t, s) for s, t in pairs],
        "steered_to_unsteered": [("Bread", ""), ("Trees", "")],
        "unsteered_to_steered": [("", "Bread"), ("", "Trees")],
    }
    return sorted((exp, layer, src, tgt, i) for exp, ks in keys.items() for layer in (2, 3)
                  for src, tgt in ks for i in range(SAMPLES))


def assert_whole_units(db: Path) -> int:
    """No duplicate key, and every unit has all its samples or none; returns the rollout count."""
    dup = query(db, """SELECT count(*) FROM (SELECT experiment_id, patch_layer, source_word,
        target_word, sample_index FROM rollouts GROUP BY 1, 2, 3, 4, 5 HAVING count(*) > 1)""")
    assert dup == [(0,)]
    sizes = query(db, """SELECT count(*) FROM rollouts
        GROUP BY experiment_id, patch_layer, source_word, target_word""")
    assert {n for (n,) in sizes} <= {SAMPLES}, sizes
    return sum(n for (n,) in sizes)


def stage_statuses(db: Path) -> dict[int, str]:
    """pid -> status, as `patchdb status --json` reports it."""
    result = run_cli("status", "--db", db, "--json")
    assert result.exit_code == 0, result.output
    return {s["pid"]: s["status"] for s in json.loads(result.stdout)["stages"]}


def wait_until(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> bool:
    """Poll until `ready()`; False if the process ended first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def kill_9(proc: subprocess.Popen[str]) -> bool:
    """SIGKILL the process; True if it was still running (the kill landed)."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return proc.returncode == -signal.SIGKILL


def has_running_stage(db: Path, pid: int) -> bool:
    try:
        return bool(query(db, "SELECT 1 FROM stage_runs WHERE pid = ?", pid))
    except sqlite3.OperationalError:  # the store is still being created
        return False


def count(db: Path, table: str) -> int:
    return int(query(db, f"SELECT count(*) FROM {table}")[0][0])  # constant table names only


def test_generate_killed_at_random_points_then_rerun_equals_one_run(
    tmp_path: Path, model_dir: Path
) -> None:
    rng = random.Random(SEED)
    config = sweep_toml(tmp_path / "sweep.toml", model_dir)
    killed = tmp_path / "killed.sqlite"
    assert run_cli("init", "--config", config, "--db", killed).exit_code == 0
    command = [sys.executable, "-m", "patchdb", "generate", "--db", str(killed), "--quiet",
               "--batch-size", "1"]
    kills = 0
    for _ in range(3):
        before = assert_whole_units(killed)
        proc = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # A random point: some rollouts after the stage starts, then a random fraction of a batch.
        more = rng.randint(0, 8)
        started = wait_until(proc, lambda pid=proc.pid: has_running_stage(killed, pid), "the stage to start")
        if started:
            wait_until(proc, lambda n=before + more: count(killed, "rollouts") >= n, "rollouts")
            time.sleep(rng.uniform(0, 0.4))
        if not kill_9(proc):
            assert proc.returncode == 0, proc.communicate()[0]
            break
        kills += 1
        present = assert_whole_units(killed)
        assert before <= present < UNITS * SAMPLES
        assert stage_statuses(killed)[proc.pid] == "crashed"
    assert kills >= 2, "the kills should land mid-run"

    rerun = subprocess.run(command, text=True, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert assert_whole_units(killed) == UNITS * SAMPLES
    assert rollout_keys(killed) == expected_keys()
    statuses = list(stage_statuses(killed).values())
    assert statuses.count("crashed") == kills and statuses.count("finished") == 1


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server(latency_s=0.03) as srv:
        yield srv


def judge_env(server: FaultServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDB_JUDGE")}
    env.update(PATCHDB_JUDGE_BASE_URL=server.base_url, PATCHDB_JUDGE_API_KEY="sk-test",
               PATCHDB_JUDGE_BACKOFF="0.01", PATCHDB_JUDGE_PROGRESS="0")
    return env


def judgment_rows(db: Path) -> list[tuple]:
    return query(db, """SELECT r.experiment_id, r.patch_layer, r.source_word, r.target_word,
        r.sample_index, j.grader, j.verdict, j.raw_reply, j.error
        FROM judgments j JOIN rollouts r ON r.id = j.rollout_id ORDER BY 1, 2, 3, 4, 5, 6""")


def test_judge_killed_at_random_points_then_rerun_equals_one_run(
    tmp_path: Path, server: FaultServer
) -> None:
    rng = random.Random(SEED)
    reference, killed = tmp_path / "reference.sqlite", tmp_path / "killed.sqlite"
    n = make_store(reference, samples=JUDGE_SAMPLES)
    make_store(killed, samples=JUDGE_SAMPLES)
    env = judge_env(server)
    command = [sys.executable, "-m", "patchdb", "judge", "--db"]
    subprocess.run([*command, str(reference)], env=env, check=True, capture_output=True, timeout=120)
    assert count(reference, "judgments") == 2 * n

    kills = 0
    for _ in range(4):
        before = count(killed, "judgments")
        target = before + rng.randint(1, 40)
        proc = subprocess.Popen([*command, str(killed), "--concurrency", str(rng.choice([1, 4, 8]))],
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if wait_until(proc, lambda n=target: count(killed, "judgments") >= n, "judgments"):
            time.sleep(rng.uniform(0, 0.05))
        if not kill_9(proc):
            assert proc.returncode == 0, proc.communicate()[0]
            break
        kills += 1
        assert before <= count(killed, "judgments") < 2 * n
        assert query(killed, """SELECT count(*) FROM (SELECT rollout_id, grader, judge_config_id
            FROM judgments GROUP BY 1, 2, 3 HAVING count(*) > 1)""") == [(0,)]
        assert query(killed, "SELECT count(*) FROM judgments WHERE raw_reply IS NULL "
                     "AND error IS NULL") == [(0,)]  # a stored judgment is a whole one
        assert stage_statuses(killed)[proc.pid] == "crashed"
    assert kills >= 3, "the kills should land mid-run"

    rerun = subprocess.run([*command, str(killed)], env=env, text=True, capture_output=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert judgment_rows(killed) == judgment_rows(reference)
    assert query(killed, "SELECT count(*) FROM judge_configs") == [(1,)]
    statuses = list(stage_statuses(killed).values())
    assert statuses.count("crashed") == kills and statuses.count("finished") == 1


def test_import_json_killed_at_random_points_imports_all_or_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
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
    started = time.monotonic()
    subprocess.run([*command, str(reference)], check=True, capture_output=True, timeout=120)
    whole_run_s = time.monotonic() - started
    command.append(str(db))
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(rng.uniform(0.3, 0.95) * whole_run_s)
        if kill_9(proc):
            kills += 1
        assert count(db, "rollouts") in (0, expected)  # one transaction: all of it or none
        if count(db, "rollouts"):
            break
    done = subprocess.run(command, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert count(db, "rollouts") == expected
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    answers = "SELECT patch_layer, target_word, sample_index, answer FROM rollouts ORDER BY 1, 2, 3"
    assert query(db, answers) == query(reference, answers)
    assert kills >= 1


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
