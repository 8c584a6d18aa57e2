"""Batches never strand keys (issue #26, points 4 and 5).

A batch that has no provider file id holds no key: a failed upload releases its keys at once,
`--cancel` of such a batch calls no API, and a batch a killed run left unsent at a mistyped
URL never blocks a later run at the right one. Only a run that is still running keeps the keys
of a batch it is sending. `--collect` with `--cancel` is refused.
"""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from batch_server import BatchServer, batch_server
from conftest import file_digest, run_cli
from judge_server import make_store
from pg import execute, query

from patchdb.store.models import utcnow

KEY = "sk-strand-sentinel-6a1f0c"
N_CALLS = 64  # make_store's 32 rollouts, two graders each
ONE_ROW_PER_KEY = """SELECT count(*), count(DISTINCT rollout_id || grader) FROM judgments"""
LIVE = "SELECT count(*) FROM judge_batches WHERE collected_at IS NULL"
HELD = ("SELECT count(*) FROM judge_batch_keys k JOIN judge_batches b ON b.id = k.batch_id "
        "WHERE b.collected_at IS NULL")


@pytest.fixture
def right(monkeypatch: pytest.MonkeyPatch) -> Iterator[BatchServer]:
    """The API the user meant."""
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", KEY)
    monkeypatch.setenv("PATCHDB_JUDGE_BATCH_POLL", "0.01")
    with batch_server() as srv:
        yield srv


@pytest.fixture
def wrong(right: BatchServer) -> Iterator[BatchServer]:
    """Another API, reached by a mistyped --base-url."""
    with batch_server() as srv:
        yield srv


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def batch(db: str | Path, url: str, *args: str) -> object:
    return run_cli("judge", "--db", db, "--batch", "--base-url", url, *args)


def killed_after_upload(db: str | Path, url: str) -> None:
    """`judge --batch` SIGKILLed after its upload returned, before the file id was recorded:
    a batch row with its keys and no file id, left by a run that is gone."""
    env = {**os.environ, "PATCHDB_FAULT": "judge.batch_uploaded:1"}
    run = subprocess.run([sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--batch",
                          "--base-url", url, "--no-progress"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == -9, run.stdout + run.stderr
    assert query(db, "SELECT state, input_file_id FROM judge_batches") == [("preparing", None)]
    assert query(db, HELD) == [(N_CALLS,)]


def test_a_failed_upload_releases_its_keys_at_once(store_db: str, right: BatchServer) -> None:
    make_store(store_db)
    nowhere = f"http://127.0.0.1:{closed_port()}/v1"
    failed = batch(store_db, nowhere)
    assert failed.exit_code == 1
    assert failed.output.startswith("Error: uploading the batch input file failed: cannot "
                                    f"reach the judge API at {nowhere} (")
    assert len(failed.output.splitlines()) == 1
    assert query(store_db, LIVE) == [(0,)] and query(store_db, HELD) == [(0,)]
    collect = batch(store_db, nowhere, "--collect")  # nothing live there: no API, no error
    assert collect.exit_code == 0, collect.output
    assert "still running" not in collect.output and "Live batches" not in collect.output
    rerun = batch(store_db, right.base_url)
    assert rerun.exit_code == 0, rerun.output
    assert f"Submitted 1 batch(es) of {N_CALLS} calls; collected 1" in rerun.output
    assert query(store_db, ONE_ROW_PER_KEY) == [(N_CALLS, N_CALLS)]
    assert set(right.state.billed.values()) == {1} and len(right.state.billed) == N_CALLS


@pytest.mark.parametrize("first", ["--cancel", "--collect"])
def test_an_unsent_batch_of_a_killed_run_holds_no_key(
        db_path: Path, right: BatchServer, wrong: BatchServer, first: str) -> None:
    make_store(db_path)
    killed_after_upload(db_path, wrong.base_url)
    calls = dict(wrong.state.calls)
    done = batch(db_path, wrong.base_url, first)
    assert done.exit_code == 0, done.output
    assert dict(wrong.state.calls) == calls  # no API call for a batch it never created
    assert "still running" not in done.output
    assert "Batch #1 was never uploaded" in done.output
    assert query(db_path, LIVE) == [(0,)] and query(db_path, HELD) == [(0,)]
    rerun = batch(db_path, right.base_url)
    assert rerun.exit_code == 0, rerun.output
    assert f"Submitted 1 batch(es) of {N_CALLS} calls; collected 1" in rerun.output
    assert query(db_path, ONE_ROW_PER_KEY) == [(N_CALLS, N_CALLS)]
    assert not wrong.state.billed and len(right.state.billed) == N_CALLS


def test_a_mistyped_url_never_blocks_a_run_at_the_right_one(
        db_path: Path, right: BatchServer, wrong: BatchServer) -> None:
    make_store(db_path)
    killed_after_upload(db_path, wrong.base_url)
    dry = run_cli("judge", "--db", db_path, "--batch", "--base-url", right.base_url, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"As batches (--batch): {N_CALLS} calls in 1 batch job(s)" in dry.output
    assert "already held" not in dry.output
    rerun = batch(db_path, right.base_url)
    assert rerun.exit_code == 0, rerun.output
    assert "Live batches of this judge config were sent to" not in rerun.output
    assert f"Submitted 1 batch(es) of {N_CALLS} calls; collected 1" in rerun.output
    assert query(db_path, ONE_ROW_PER_KEY) == [(N_CALLS, N_CALLS)]
    assert query(db_path, "SELECT count(*) FROM judge_batches") == [(1,)]


def test_a_batch_a_running_run_is_sending_keeps_its_keys(
        db_path: Path, right: BatchServer, wrong: BatchServer) -> None:
    make_store(db_path)
    killed_after_upload(db_path, wrong.base_url)
    # make the killed run look alive: this host, a live pid, a heartbeat in the future
    execute(db_path, "UPDATE stage_runs SET pid = :pid, heartbeat_at = :beat",
            {"pid": os.getpid(), "beat": utcnow() + timedelta(days=1)})
    held = batch(db_path, right.base_url, "--no-wait")
    assert held.exit_code == 0, held.output
    assert "Submitted 0 batch(es) of 0 calls" in held.output
    assert query(db_path, HELD) == [(N_CALLS,)] and not right.state.calls
    cancel = batch(db_path, wrong.base_url, "--cancel")  # not this run's to cancel
    assert cancel.exit_code == 0 and query(db_path, HELD) == [(N_CALLS,)]
    assert "Batch #1 is being sent by stage run #1; left to it." in cancel.output
    execute(db_path, "UPDATE stage_runs SET status = 'failed' WHERE id = 1", {})
    freed = batch(db_path, right.base_url)
    assert freed.exit_code == 0, freed.output
    assert f"Submitted 1 batch(es) of {N_CALLS} calls; collected 1" in freed.output
    assert not wrong.state.billed and len(right.state.billed) == N_CALLS


def test_cancel_finds_a_batch_created_before_a_kill(db_path: Path, right: BatchServer) -> None:
    """A batch the provider created but whose id was never recorded is found by its input
    file and cancelled, not left to be adopted by the next run."""
    right.state.scripts = [("validating",) + ("in_progress",) * 50 + ("completed",)]
    make_store(db_path)
    env = {**os.environ, "PATCHDB_FAULT": "judge.batch_created:1"}
    run = subprocess.run([sys.executable, "-m", "patchdb", "judge", "--db", str(db_path),
                          "--batch", "--base-url", right.base_url, "--no-progress"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stdout + run.stderr
    assert query(db_path, "SELECT state, provider_batch_id FROM judge_batches") == [
        ("uploaded", None)]
    cancel = batch(db_path, right.base_url, "--cancel")
    assert cancel.exit_code == 0, cancel.output
    (server_batch,) = right.state.batches.values()  # cancelled, then collected by that run
    assert server_batch["status"] == "cancelled" and right.state.calls["create"] == 1
    assert f"Batch #1 ({server_batch['id']}): cancelling." in cancel.output
    assert query(db_path, "SELECT state, collected_at IS NOT NULL FROM judge_batches") == [
        ("cancelled", True)]
    final = batch(db_path, right.base_url)
    assert final.exit_code == 0, final.output
    assert f"Submitted 1 batch(es) of {N_CALLS} calls" in final.output
    assert query(db_path, ONE_ROW_PER_KEY) == [(N_CALLS, N_CALLS)]
    assert set(right.state.billed.values()) == {1}


def test_collect_with_cancel_is_refused(db_path: Path, right: BatchServer) -> None:
    make_store(db_path)
    before = file_digest(db_path)
    both = batch(db_path, right.base_url, "--collect", "--cancel")
    assert both.exit_code == 1
    assert both.output == ("Error: --collect and --cancel do not go together: --cancel "
                           "cancels the live batches and collects what they finished\n")
    assert file_digest(db_path) == before and not right.state.calls


def test_a_batch_leaves_the_keys_of_a_live_judge_worker_alone(db_path: Path,
                                                              right: BatchServer) -> None:
    """A key a live worker has claimed (a judge_leases row of a running run) is not put into a
    batch: the batch records its keys under the lock workers claim under, checking leases."""
    from patchdb.store import open_store
    from patchdb.store.runs import stage_run

    make_store(db_path)
    first = batch(db_path, right.base_url, "--limit", "2")  # makes the judge config
    assert "Submitted 1 batch(es) of 2 calls; collected 1" in first.output, first.output
    ((config_id,),) = query(db_path, "SELECT id FROM judge_configs")
    store = open_store(str(db_path))
    try:
        with stage_run(store, "judge", {}, sweep_id=1) as worker:  # running, this pid
            execute(db_path, """INSERT INTO judge_leases (rollout_id, grader, judge_config_id,
                stage_run_id, claimed_at, expires_at)
                SELECT r.id, g.grader, :c, :run, :now, :later FROM rollouts r
                JOIN experiments e ON e.id = r.experiment_id
                JOIN (SELECT 'coherence' AS grader UNION SELECT 'detection'
                      UNION SELECT 'detection_identification') g
                  ON g.grader IN ('coherence', e.detection_grader)
                WHERE r.id BETWEEN 20 AND 24""",
                    {"c": config_id, "run": worker.id, "now": utcnow(),
                     "later": utcnow() + timedelta(hours=1)})
            rest = batch(db_path, right.base_url)
    finally:
        store.close()
    assert rest.exit_code == 0, rest.output
    assert f"Submitted 1 batch(es) of {N_CALLS - 2 - 10} calls" in rest.output, rest.output
    assert query(db_path, """SELECT count(*) FROM judge_batch_keys
                             WHERE rollout_id BETWEEN 20 AND 24""") == [(0,)]
    assert query(db_path, "SELECT count(*) FROM judgments WHERE rollout_id BETWEEN 20 AND 24"
                 ) == [(0,)]
    assert len(right.state.billed) == N_CALLS - 10
