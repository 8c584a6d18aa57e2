"""`python -m patchdb judge` as real processes: two at once, kill -9 and rerun, Ctrl-C, --follow."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from judge_server import FaultServer, fault_server, make_store

from patchdb.store import open_store
from patchdb.store.runs import stage_run

SAMPLES = 6  # 8 keys x 2 layers x 6 samples = 96 rollouts, 192 calls


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server(latency_s=0.02) as srv:
        yield srv


def judge_cmd(db: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "patchdb", "judge", "--db", str(db), *args]


def judge_env(server: FaultServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PATCHDB_") and k not in ("OPENROUTER_API_KEY", "OPENAI_API_KEY")}
    env.update(PATCHDB_JUDGE_BASE_URL=server.base_url, PATCHDB_JUDGE_API_KEY="sk-test",
               PATCHDB_JUDGE_BACKOFF="0.01", PATCHDB_JUDGE_POLL="0.2")
    return env


def count(db: Path) -> int:
    with sqlite3.connect(db, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM judgments").fetchone()[0])


def judgment_rows(db: Path) -> list[tuple]:
    """What a judgment says, without ids, times or run numbers."""
    with sqlite3.connect(db) as conn:
        return conn.execute("""SELECT r.experiment_id, r.patch_layer, r.source_word, r.target_word,
                r.sample_index, j.grader, j.verdict, j.raw_reply, j.error
            FROM judgments j JOIN rollouts r ON r.id = j.rollout_id ORDER BY 1, 2, 3, 4, 5, 6
        """).fetchall()


def wait_for_rows(db: Path, proc: subprocess.Popen[str], at_least: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = count(db) if db.exists() else 0
        if n >= at_least:
            return n
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the judge wrote nothing in 60 s")


def answer(i: int, word: str) -> str:
    return f"I notice {word} ({i})" + (" [[reply=NO]]" if i % 3 == 0 else
                                       " [[reply=none]]" if i % 7 == 0 else "")


def test_two_processes_at_once_duplicate_nothing(tmp_path: Path, server: FaultServer) -> None:
    db = tmp_path / "store.sqlite"
    n = make_store(db, answer, samples=SAMPLES)
    env = judge_env(server)
    procs = [subprocess.Popen(judge_cmd(db, "--concurrency", "8"), env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert count(db) == 2 * n
    with sqlite3.connect(db) as conn:
        assert conn.execute("""SELECT count(*) FROM (SELECT rollout_id, grader, judge_config_id
            FROM judgments GROUP BY 1, 2, 3 HAVING count(*) > 1)""").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM judge_configs").fetchone()[0] == 1


def test_kill_9_then_rerun_matches_an_uninterrupted_run(
    tmp_path: Path, server: FaultServer
) -> None:
    reference, killed = tmp_path / "reference.sqlite", tmp_path / "killed.sqlite"
    n = make_store(reference, answer, samples=SAMPLES)
    make_store(killed, answer, samples=SAMPLES)
    env = judge_env(server)
    subprocess.run(judge_cmd(reference), env=env, check=True, capture_output=True, timeout=120)
    assert count(reference) == 2 * n

    # the process kills itself right after its first committed batch of 16 (no call starts
    # while a batch is unwritten, so at most 16 + 4 results were pending then)
    proc = subprocess.run(judge_cmd(killed, "--concurrency", "4", "--write-batch", "16"),
                          env=dict(env, PATCHDB_FAULT="judge.batch_written:1"), text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert 1 <= count(killed) < 2 * n  # killed mid-run
    rerun = subprocess.run(judge_cmd(killed), env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert judgment_rows(killed) == judgment_rows(reference)
    status = subprocess.run([sys.executable, "-m", "patchdb", "status", "--db", str(killed)],
                            env=env, capture_output=True, text=True, timeout=60).stdout
    assert "crashed" in status  # the killed run is shown as such


def test_ctrl_c_saves_what_finished_and_exits_130(tmp_path: Path, server: FaultServer) -> None:
    db = tmp_path / "store.sqlite"
    n = make_store(db, answer, samples=SAMPLES)
    env = judge_env(server)
    proc = subprocess.Popen(judge_cmd(db, "--concurrency", "4"), text=True,
                            env=dict(env, PATCHDB_FAULT="judge.reply:10:INT"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "Interrupted; what finished is saved" in out and "Traceback" not in out
    saved = count(db)
    assert 10 <= saved < 2 * n
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM stage_runs").fetchall() == [("interrupted",)]
    rerun = subprocess.run(judge_cmd(db), env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and f"Judged {2 * n - saved} calls" in rerun.stdout


def test_follow_judges_rollouts_while_generate_writes_them(
    tmp_path: Path, server: FaultServer
) -> None:
    db = tmp_path / "store.sqlite"
    first = make_store(db, answer, last=10, samples=SAMPLES)
    store = open_store(str(db))
    env = judge_env(server)
    with stage_run(store, "generate", {"layers": "2-3"}, sweep_id=1):
        proc = subprocess.Popen(judge_cmd(db, "--follow"), env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for_rows(db, proc, 2 * first)
        time.sleep(0.5)
        assert proc.poll() is None  # generate is still running: keep following
        rest = make_store(db, answer, first=10, samples=SAMPLES)
        wait_for_rows(db, proc, 2 * (first + rest))
    out = proc.communicate(timeout=60)[0]  # generate finished and nothing is missing: stop
    assert proc.returncode == 0, out
    assert count(db) == 2 * (first + rest)
    store.close()


def test_follow_without_a_running_generate_stops_when_done(
    tmp_path: Path, server: FaultServer
) -> None:
    db = tmp_path / "store.sqlite"
    n = make_store(db, answer)
    result = subprocess.run(judge_cmd(db, "--follow"), env=judge_env(server), text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0 and f"Judged {2 * n} calls" in result.stdout


def test_a_failed_write_stops_the_judge_within_one_batch(tmp_path: Path, server: FaultServer) -> None:
    """The store takes KEEP judgments, then refuses every insert (a real trigger): the judge stops
    at once, keeps what it committed, says why in one line and exits 1, having made at most one
    write batch plus the calls in flight beyond what was saved."""
    db = tmp_path / "store.sqlite"
    n = make_store(db, answer, samples=SAMPLES)
    keep, batch, concurrency = 40, 8, 4
    with sqlite3.connect(db) as conn:
        conn.execute(f"""CREATE TRIGGER store_full BEFORE INSERT ON judgments
            WHEN (SELECT count(*) FROM judgments) >= {keep}
            BEGIN SELECT RAISE(ABORT, 'no room for judgments'); END""")
    result = subprocess.run(
        judge_cmd(db, "--concurrency", str(concurrency), "--write-batch", str(batch),
                  "--no-progress"),
        env=judge_env(server), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    saved = count(db)
    # a flush holds fewer than batch + concurrency rows: the one that failed started above this
    assert keep - batch - concurrency < saved <= keep
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: writing judgments failed, so the judge stopped (database error on {db}: "
        f"no room for judgments); {saved} judgments were saved; run again to resume")
    assert server.stats.requests <= keep + batch + concurrency < 2 * n
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM stage_runs").fetchall() == [("failed",)]
