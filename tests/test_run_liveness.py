"""A live run never looks dead from another machine (its leases and batches are not taken over,
its calls not paid twice): its pid is looked at only on its own machine (the same boot and pid
namespace, not a host name that cloud images and containers share), and on PostgreSQL its
heartbeat is the database's clock, written and read, whatever the machines' clocks say."""

import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from judge_server import add_judge_config, make_store
from pg import execute, query

import patchdb.store.runs as runs
from patchdb.judge.leases import claim
from patchdb.judge.plan import Call, Fresh
from patchdb.store import open_store
from patchdb.store.runs import is_running, stage_run, this_machine

CALLS = [Call(r, "coherence", "a", "w") for r in (1, 2, 3, 4)]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def takes(store: Any, run_id: int, config_id: int) -> list[int]:
    got = store.transact(lambda s: claim(s, run_id, config_id, "only_missing", Fresh(run_id),
                                         CALLS, 600))
    return [c.rollout_id for c in got.calls]


@pytest.mark.skipif(this_machine() is None, reason="needs /proc (boot id and pid namespace)")
def test_a_live_run_elsewhere_under_this_host_name_keeps_its_keys(store_db: str) -> None:
    make_store(store_db)
    store = open_store(store_db)
    try:
        config_id = add_judge_config(store)
        with stage_run(store, "judge", {}) as a, stage_run(store, "judge", {}) as b:
            assert takes(store, a.id, config_id) == [1, 2, 3, 4]
            # a's process runs on another machine that has this machine's host name: its pid
            # means nothing here
            execute(store_db, "UPDATE stage_runs SET pid = :pid, machine = :m WHERE id = :a",
                    {"pid": dead_pid(), "m": "another-boot pid:[4026531836]", "a": a.id})
            assert query(store_db, "SELECT host FROM stage_runs WHERE id = :a",
                         {"a": a.id}) == [(socket.gethostname(),)]
            assert is_running(store, a.id)
            assert takes(store, b.id, config_id) == []
            # on this machine, the same dead pid is a crashed run: its keys are free at once
            execute(store_db, "UPDATE stage_runs SET machine = :m WHERE id = :a",
                    {"m": this_machine(), "a": a.id})
            assert not is_running(store, a.id)
            assert takes(store, b.id, config_id) == [1, 2, 3, 4]
    finally:
        store.close()


def shifted(seconds: float) -> Callable[[], datetime]:
    real = runs.utcnow
    return lambda: real() + timedelta(seconds=seconds)


def test_machines_clocks_do_not_decide_a_heartbeat_on_postgresql(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """(On SQLite every process runs on the machine that holds the file: one clock.)"""
    make_store(pg_url)
    store = open_store(pg_url)
    try:
        config_id = add_judge_config(store)
        monkeypatch.setattr(runs, "utcnow", shifted(-90))  # the worker's clock: 90 s behind
        with stage_run(store, "judge", {}) as a:
            assert takes(store, a.id, config_id) == [1, 2, 3, 4]
            monkeypatch.setattr(runs, "utcnow", shifted(+90))  # the reader's: 90 s ahead
            with stage_run(store, "judge", {}) as b:
                assert is_running(store, a.id)
                assert takes(store, b.id, config_id) == []
    finally:
        store.close()
