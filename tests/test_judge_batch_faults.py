"""`judge --batch` killed (SIGKILL) at seeded points between upload, create and collect.

The process stops itself at a named fault point (PATCHDB_FAULT), the n-th time it passes it,
n drawn from a fixed seed. After every kill a plain rerun ends with exactly one judgment per
key and grader, the server ran every request once, and it was asked to create exactly one
batch per batch job: a batch created just before the kill is found by its input file and
adopted, never created again. The kills run on SQLite and on PostgreSQL.
"""

import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from batch_server import BatchServer, batch_server
from conftest import run_cli
from judge_server import make_store
from pg import query

pytestmark = pytest.mark.faults

SEED = 18
N_CALLS = 64  # make_store's 32 rollouts, two graders each
PER_BATCH = 16  # so 4 batch jobs
POINTS = ("judge.batch_uploaded", "judge.batch_created", "judge.batch_collected_file",
          "judge.batch_collect_chunk")
KILL_AT = {p: random.Random(f"{SEED}:{p}").randint(1, N_CALLS // PER_BATCH) for p in POINTS}
KEY = "sk-fault-batch-0d9e8f7a6b5c"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[BatchServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", KEY)
    monkeypatch.setenv("PATCHDB_JUDGE_BATCH_POLL", "0.01")
    with batch_server() as srv:
        monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", srv.base_url)
        yield srv


def judge_killed(db: str | Path, fault: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATCHDB_FAULT": fault}
    return subprocess.run(
        [sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--batch",
         "--batch-max-requests", str(PER_BATCH), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120)


def one_row_per_key(db: str | Path) -> list[int]:
    counts = query(db, """SELECT (SELECT count(*) FROM judgments j
        WHERE j.rollout_id = r.id AND j.grader = g.grader)
        FROM rollouts r JOIN experiments e ON e.id = r.experiment_id
        JOIN (SELECT 'coherence' AS grader UNION SELECT 'detection'
              UNION SELECT 'detection_identification') g
          ON g.grader IN ('coherence', e.detection_grader)""")
    return sorted({c for (c,) in counts}) if len(counts) == N_CALLS else [-1]


@pytest.mark.parametrize("point", POINTS)
def test_kill_then_rerun_judges_each_key_once_and_runs_nothing_twice(
        store_db: str, server: BatchServer, point: str) -> None:
    db_path = store_db
    make_store(db_path)
    killed = judge_killed(db_path, f"{point}:{KILL_AT[point]}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    rerun = run_cli("judge", "--db", db_path, "--batch", "--batch-max-requests", str(PER_BATCH))
    assert rerun.exit_code == 0, rerun.output
    assert one_row_per_key(db_path) == [1]
    state = server.state
    assert len(state.billed) == N_CALLS and set(state.billed.values()) == {1}
    assert state.calls["create"] == N_CALLS // PER_BATCH
    # an upload whose file id was lost is uploaded again (files are not billed); no other is
    lost_upload = 1 if point == "judge.batch_uploaded" else 0
    assert state.calls["upload"] == N_CALLS // PER_BATCH + lost_upload
    assert query(db_path, "SELECT count(*), count(collected_at), sum(requests) "
                          "FROM judge_batches") == [(4, 4, N_CALLS)]
    status = run_cli("status", "--db", db_path)  # the killed run is seen as crashed
    assert "#1 judge     crashed" in status.output and "#2 judge     finished" in status.output


def test_ctrl_c_while_waiting_leaves_the_batches_to_collect(db_path: Path,
                                                            server: BatchServer) -> None:
    server.state.scripts = [("validating", "in_progress", "in_progress", "completed")]
    make_store(db_path)
    stopped = judge_killed(db_path, "judge.batch_poll:1:INT")
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "Interrupted; the submitted batches run on at the provider" in stopped.stderr
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT status FROM stage_runs").fetchall() == [("interrupted",)]
        assert conn.execute("SELECT count(*) FROM judge_batches WHERE collected_at IS NULL"
                            ).fetchone() == (4,)
    rerun = run_cli("judge", "--db", db_path, "--batch")
    assert rerun.exit_code == 0 and "Submitted 0 batch(es) of 0 calls; collected 4" in \
        rerun.output
    assert one_row_per_key(db_path) == [1] and set(server.state.billed.values()) == {1}


@pytest.mark.slow
def test_ten_thousand_calls_survive_a_kill_mid_collect_and_match_live() -> None:
    """The benchmark script's run: 10,016 calls, SIGKILL after 5 of 11 written chunks, a
    rerun, then a live judge of the same rollouts; it asserts the match itself (~55 s)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_judge_batch.py"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verdicts that differ: 0" in run.stdout and run.stdout.rstrip().endswith(
        "batch == live verdict for verdict")
