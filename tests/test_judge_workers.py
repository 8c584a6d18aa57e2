"""Many `patchdb judge` workers on one store, as real processes against a loopback judge server
that counts what it is sent: each call is paid once, a killed worker's keys come free (at once
on this host, when its lease expires from another), --follow workers beside a generate split
its rollouts, and a --follow started before generate waits for it. On SQLite and PostgreSQL."""

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from judge_server import COST_PER_CALL, FaultServer, fault_server, make_store
from pg import execute, query
from tiny_models import save_tiny_llama

from patchdb.judge.leases import (
    claim,
    claimable_page,
    db_now,
    live_leases,
    release,
    renew,
)
from patchdb.judge.plan import Fresh, Scope, needs
from patchdb.store import open_store
from patchdb.store.runs import stage_run

SAMPLES = 6  # 8 keys x 2 layers x 6 samples = 96 rollouts, 192 calls
CONCURRENCY = 4


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server(latency_s=0.05) as srv:
        yield srv


def judge_cmd(db: str | Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--no-progress",
            "--concurrency", str(CONCURRENCY), *args]


def judge_env(server: FaultServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PATCHDB_") and k not in ("OPENROUTER_API_KEY", "OPENAI_API_KEY")}
    env.update(PATCHDB_JUDGE_BASE_URL=server.base_url, PATCHDB_JUDGE_API_KEY="sk-test",
               PATCHDB_JUDGE_BACKOFF="0.01", PATCHDB_JUDGE_POLL="0.1", **extra)
    return env


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    """Each process's stdout, once all exited 0."""
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    return [out for out, _err in outputs]


def answer(i: int, word: str) -> str:
    return f"I notice {word} ({i})" + (" [[reply=NO]]" if i % 3 == 0 else "")


def printed(stdout: str) -> tuple[int, float]:
    """(calls, cost) from a judge run's summary line; (0, 0.0) for a run with nothing to do."""
    calls = re.search(r"Judged ([\d,]+) calls", stdout)
    assert calls, stdout
    cost = re.search(r"cost \$(\d+\.\d+)", stdout)
    return int(calls.group(1).replace(",", "")), float(cost.group(1)) if cost else 0.0


def judged(db: str) -> int:
    return int(query(db, "SELECT count(*) FROM judgments")[0][0])


def duplicates(db: str) -> int:
    return int(query(db, """SELECT count(*) FROM (SELECT rollout_id, grader, judge_config_id
        FROM judgments GROUP BY 1, 2, 3 HAVING count(*) > 1) AS d""")[0][0])


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_on_one_store_pay_each_call_once(store_db: str, server: FaultServer,
                                                 workers: int) -> None:
    """Each call is sent once; each worker prints what it sent, and stores that cost."""
    n = make_store(store_db, answer, samples=SAMPLES)
    env = judge_env(server)
    outputs = finish([start(judge_cmd(store_db), env) for _ in range(workers)])
    assert server.stats.requests == 2 * n
    assert judged(store_db) == 2 * n and duplicates(store_db) == 0
    runs = [printed(out) for out in outputs]
    assert sum(calls for calls, _ in runs) == 2 * n
    for calls, cost in runs:
        assert cost == pytest.approx(round(calls * COST_PER_CALL, 4))
    stored = query(store_db, "SELECT count(*), sum(cost) FROM judgments GROUP BY stage_run_id")
    assert sorted((int(c), round(float(usd), 4)) for c, usd in stored) == sorted(
        (calls, cost) for calls, cost in runs if calls > 0)
    assert query(store_db, "SELECT count(*) FROM judge_leases") == [(0,)]  # every key let go
    assert sorted(query(store_db, "SELECT status FROM stage_runs")) == [("finished",)] * workers


def test_overwrite_workers_redo_each_call_once(tmp_path: Path, server: FaultServer) -> None:
    db = str(tmp_path / "store.sqlite")
    n = make_store(db, answer, samples=SAMPLES)
    env = judge_env(server)
    finish([start(judge_cmd(db), env)])
    first = query(db, "SELECT id FROM stage_runs")
    before = server.stats.requests
    outputs = finish([start(judge_cmd(db, "--overwrite"), env) for _ in range(2)])
    assert judged(db) == 2 * n and duplicates(db) == 0
    assert server.stats.requests - before == 2 * n
    assert query(db, "SELECT count(*) FROM judgments WHERE stage_run_id = :r",
                 {"r": first[0][0]}) == [(0,)]  # every row was judged again
    assert sum(printed(out)[0] for out in outputs) == 2 * n


def kill_a_worker(db: str, server: FaultServer, env: dict[str, str]) -> list[tuple[Any, ...]]:
    """A worker that kills itself at its 20th reply (4 calls in flight); the leases it held."""
    proc = subprocess.run(judge_cmd(db), env=dict(env, PATCHDB_FAULT="judge.reply:20"),
                          text=True, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert 20 - CONCURRENCY <= judged(db) <= 20  # a reply is stored before the next call
    return query(db, "SELECT rollout_id, grader, expires_at FROM judge_leases")


def test_a_killed_workers_keys_come_free_at_once_on_its_host(tmp_path: Path,
                                                            server: FaultServer) -> None:
    """Its pid is gone, so its leases are dead although they would last an hour."""
    db = str(tmp_path / "store.sqlite")
    n = make_store(db, answer, samples=SAMPLES)
    env = judge_env(server, PATCHDB_JUDGE_LEASE="3600")
    held = kill_a_worker(db, server, env)
    assert held
    finish([start(judge_cmd(db), env)])
    assert judged(db) == 2 * n and duplicates(db) == 0
    assert server.stats.requests - 2 * n <= CONCURRENCY  # re-paid: at most those in flight


def test_a_killed_workers_keys_come_free_when_its_lease_expires(store_db: str,
                                                                server: FaultServer) -> None:
    """A worker on another machine: no pid to look at, its heartbeat still fresh; its keys
    wait for its leases to expire, then another worker judges them, re-paying only the calls
    it had in flight."""
    n = make_store(store_db, answer, samples=SAMPLES)
    env = judge_env(server, PATCHDB_JUDGE_LEASE="2")
    held = kill_a_worker(store_db, server, env)
    assert held
    execute(store_db, "UPDATE stage_runs SET host = 'another-machine', machine = 'another'", {})
    finish([start(judge_cmd(store_db), env)])
    assert judged(store_db) == 2 * n and duplicates(store_db) == 0
    assert server.stats.requests - 2 * n <= CONCURRENCY
    for rollout_id, grader, expires_at in held:
        (written,) = query(store_db, """SELECT created_at FROM judgments
            WHERE rollout_id = :r AND grader = :g""", {"r": rollout_id, "g": grader})
        assert written[0] >= expires_at  # not taken before the lease ran out


def test_follow_workers_beside_a_generate_pay_each_call_once(tmp_path: Path,
                                                             server: FaultServer) -> None:
    """The docs' set-up: two `judge --follow` started beside a fresh `generate`, before it has
    loaded its model or written anything."""
    model = save_tiny_llama(tmp_path / "m")
    config = tmp_path / "sweep.toml"
    config.write_text(f"""[sweep]
name = "tiny"
model = "{model}"
dtype = "float32"
steer_layer = 1
patch_layers = "2-3"
samples = 2
max_new_tokens = 4
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
""")
    db = str(tmp_path / "store.sqlite")
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    env = judge_env(server)
    generate = start([sys.executable, "-m", "patchdb", "generate", "--db", db, "--quiet",
                      "--batch-size", "2"], env)
    judges = [start(judge_cmd(db, "--follow"), env) for _ in range(2)]
    outputs = finish([generate, *judges])[1:]
    rollouts = int(query(db, "SELECT count(*) FROM rollouts")[0][0])
    assert rollouts == 44  # (4 experiments x 2 keys x 2 layers + 6 baselines) x 2 samples
    assert judged(db) == 2 * rollouts and duplicates(db) == 0
    assert server.stats.requests == 2 * rollouts
    assert sum(printed(out)[0] for out in outputs) == 2 * rollouts


def test_follow_started_before_generate_writes_waits_for_it(store_db: str,
                                                            server: FaultServer) -> None:
    make_store(store_db, answer, last=0, samples=SAMPLES)
    proc = start(judge_cmd(store_db, "--follow"), judge_env(server))
    assert proc.stderr is not None
    line = proc.stderr.readline()  # said once it has found nothing to judge and no generate
    # (16 keys and layers + 6 baselines) x 6 samples x 2 graders
    assert line.startswith("Waiting for generate: no rollout of the 264 calls in scope"), (
        line + proc.communicate(timeout=60)[0])
    store = open_store(store_db)
    try:
        with stage_run(store, "generate", {}, sweep_id=1):
            first = make_store(store_db, answer, last=40, samples=SAMPLES)
            rest = make_store(store_db, answer, first=40, samples=SAMPLES)
    finally:
        store.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert judged(store_db) == 2 * (first + rest) == server.stats.requests
    assert printed(out)[0] == 2 * (first + rest)


def test_follow_stops_waiting_after_follow_wait(tmp_path: Path, server: FaultServer) -> None:
    db = str(tmp_path / "store.sqlite")
    make_store(db, answer, last=0)
    result = subprocess.run(judge_cmd(db, "--follow", "--follow-wait", "0.3"),
                            env=judge_env(server), text=True, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "No generate run of the sweep started within --follow-wait; stopped following.")
    assert server.stats.requests == 0


def test_a_live_worker_leaves_the_keys_of_a_live_batch_alone(tmp_path: Path,
                                                              server: FaultServer) -> None:
    db = str(tmp_path / "store.sqlite")
    n = make_store(db, answer, samples=SAMPLES)
    env = judge_env(server)
    finish([start(judge_cmd(db, "--limit", "1"), env)])  # makes the judge config
    ((config_id,),) = query(db, "SELECT id FROM judge_configs")
    execute(db, """INSERT INTO judge_batches (judge_config_id, base_url, input_file_id,
        provider_batch_id, state, requests, created_at) VALUES (:c, 'http://batch.example/v1',
        'file-1', 'batch-1', 'in_progress', 10, '2026-01-01')""", {"c": config_id})
    execute(db, """INSERT INTO judge_batch_keys (batch_id, rollout_id, grader, judge_config_id)
        SELECT 1, r.id, g.grader, :c FROM rollouts r JOIN experiments e ON e.id = r.experiment_id
        JOIN (SELECT 'coherence' AS grader UNION SELECT 'detection'
              UNION SELECT 'detection_identification') g
          ON g.grader IN ('coherence', e.detection_grader)
        WHERE r.id BETWEEN 50 AND 54""", {"c": config_id})
    finish([start(judge_cmd(db), env)])
    assert server.stats.requests == 2 * n - 10
    assert query(db, "SELECT count(*) FROM judgments WHERE rollout_id BETWEEN 50 AND 54") == [
        (0,)]
    execute(db, "UPDATE judge_batches SET collected_at = '2026-01-02'", {})  # no longer live
    finish([start(judge_cmd(db), env)])
    assert server.stats.requests == 2 * n and judged(db) == 2 * n


class MeanwhileServer(FaultServer):
    """Before answering for the answer marked [[meanwhile]], another run stores its judgment."""

    def __init__(self, db: str) -> None:
        super().__init__()
        self.db = db

    def _decide(self, body: dict[str, Any]) -> tuple[str | None, str]:
        if "[[meanwhile]]" in str(body.get("messages")):
            execute(self.db, """INSERT INTO judgments (rollout_id, grader, judge_config_id,
                verdict, cut_off, raw_reply, attempts, created_at)
                SELECT r.id, 'coherence', c.id, FALSE, FALSE, 'stored by another run', 1,
                       CURRENT_TIMESTAMP
                FROM rollouts r, judge_configs c WHERE r.answer LIKE '%[[meanwhile]]%'""", {})
        return super()._decide(body)


def test_only_missing_keeps_a_judgment_another_run_stored_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "store.sqlite")
    n = make_store(db, lambda i, word: f"I notice {word} ({i})" + (
        " [[meanwhile]]" if i == 5 else ""))
    server = MeanwhileServer(db)
    server.start()
    try:
        monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", server.base_url)
        monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", "sk-test")
        result = run_cli("judge", "--db", db, "--graders", "coherence", "--no-progress")
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    assert f"Judged {n} calls" in result.output and server.stats.requests == n
    assert query(db, """SELECT j.verdict, j.raw_reply, j.stage_run_id FROM judgments j
        JOIN rollouts r ON r.id = j.rollout_id WHERE r.answer LIKE '%[[meanwhile]]%'""") == [
        (0, "stored by another run", None)]
    assert judged(db) == n


# --- the lease rules, on a store ----------------------------------------------------------


def _run(store: Any, stage: str = "judge") -> Any:
    """A running stage run of this process, as a context manager."""
    return stage_run(store, stage, {}, sweep_id=1)


def test_claims_are_disjoint_and_dead_or_expired_leases_come_free(store_db: str) -> None:
    make_store(store_db, answer)
    store = open_store(store_db)
    try:
        execute(store_db, """INSERT INTO judge_configs (model, reasoning, template_version,
            backend, verdict_mode, created_at) VALUES ('m', 'low', 't', 'openai', 'last-word',
            CURRENT_TIMESTAMP)""", {})
        ((config_id,),) = query(store_db, "SELECT id FROM judge_configs")
        scope = Scope({1: ("coherence",), 2: ("coherence",)})
        with _run(store) as a, _run(store) as b:
            fa, fb = Fresh(a.id), Fresh(b.id)
            page = store_read(store, lambda s: claimable_page(s, scope, config_id,
                                                              "only_missing", fa, 0))
            calls = page.free[:6]
            assert len(calls) == 6 and page.held_from is None
            got_a = store.transact(lambda s: claim(s, a.id, config_id, "only_missing", fa,
                                                   calls, 60))
            got_b = store.transact(lambda s: claim(s, b.id, config_id, "only_missing", fb,
                                                   calls, 60))
            assert got_a.calls == calls and got_b.calls == []  # b takes none of a's keys
            assert got_b.taken_from == calls[0].rollout_id
            seen_by_b = store_read(store, lambda s: claimable_page(
                s, scope, config_id, "only_missing", fb, 0))
            assert seen_by_b.held_from == calls[0].rollout_id
            assert not {(c.rollout_id, c.grader) for c in calls} & {
                (c.rollout_id, c.grader) for c in seen_by_b.free}
            # a renews its leases, then lets three go: b may take those three
            assert store.transact(lambda s: renew(s, a.id, 60)) == 6
            execute(store_db, "DELETE FROM judge_leases WHERE rollout_id IN (:x, :y, :z)",
                    {"x": calls[0].rollout_id, "y": calls[1].rollout_id,
                     "z": calls[2].rollout_id})
            got_b = store.transact(lambda s: claim(s, b.id, config_id, "only_missing", fb,
                                                   calls, 60))
            assert got_b.calls == calls[:3]
            # a's other three expire: b takes them over
            execute(store_db, "UPDATE judge_leases SET expires_at = '2000-01-01 00:00:00' "
                              "WHERE stage_run_id = :a", {"a": a.id})
            got_b = store.transact(lambda s: claim(s, b.id, config_id, "only_missing", fb,
                                                   calls, 60))
            assert got_b.calls == calls[3:]
            assert store.transact(lambda s: release(s, b.id)) == 6
        # a finished run's lease is dead however long it was to last
        with _run(store) as c:
            store.transact(lambda s: claim(s, c.id, config_id, "only_missing", Fresh(c.id),
                                           calls, 3600))
        with _run(store) as d:
            assert store_read(store, lambda s: live_leases(
                s, config_id, [x.rollout_id for x in calls], db_now(s))) == {}
            got = store.transact(lambda s: claim(s, d.id, config_id, "only_missing",
                                                 Fresh(d.id), calls, 60))
            assert got.calls == calls
    finally:
        store.close()


def store_read(store: Any, fn: Any) -> Any:
    with store.read() as session:
        return fn(session)


@pytest.mark.parametrize(("mode", "row", "expected"), [
    ("only_missing", None, True),
    ("only_missing", (None, "HTTP 500", 3), False),
    ("retry_errors", (None, "HTTP 500", 3), True),   # an error stored before this round
    ("retry_errors", (None, "HTTP 500", 10), False),  # ... by this run: not again
    ("retry_errors", (None, "HTTP 500", 7), False),   # ... by a run running when it started
    ("retry_errors", (True, None, 3), False),
    ("retry_unparsed", (None, None, 3), True),
    ("retry_unparsed", (None, None, 12), False),      # by a run started since
    ("retry_unparsed", (False, None, 3), False),
    ("overwrite", None, True),
    ("overwrite", (True, None, 3), True),
    ("overwrite", (True, None, None), True),          # imported or merged: no run
    ("overwrite", (True, None, 7), False),
    ("overwrite", (True, None, 10), False),
])
def test_what_a_worker_counts_as_pending(mode: str, row: Any, expected: bool) -> None:
    """This run is stage run 10; run 7 was running when it started, run 3 had ended."""
    assert needs(mode, row, Fresh(10, frozenset({7, 10}))) is expected
