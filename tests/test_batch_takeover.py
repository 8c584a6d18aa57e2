"""Batch runs side by side pay each call once (issue #26's rule, for batches).

Two runs that both find the same half-sent batch (its file uploaded, its create failed, its run
gone) take it over in one compare-and-set: one finishes sending it, the other leaves it. And a
batch run that retries or overwrites leaves out keys a judge worker of this round wrote
meanwhile, as workers' claims do.
"""

import threading
from pathlib import Path
from typing import Any

import pytest
from batch_server import BatchServer, BatchState, batch_server
from conftest import run_cli
from judge_server import add_judge_config, make_store
from pg import query
from sqlalchemy import insert

from patchdb.judge.batch_client import BatchApi
from patchdb.judge.batch_collect import Prices
from patchdb.judge.batch_jobs import BatchContext
from patchdb.judge.client import resolve_endpoint
from patchdb.judge.plan import Call
from patchdb.judge.templates import DEFAULT_TEMPLATES
from patchdb.store import open_store
from patchdb.store.models import Judgment
from patchdb.store.runs import stage_run

KEY = "sk-takeover-sentinel-41c7"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", KEY)
    monkeypatch.setenv("PATCHDB_JUDGE_BATCH_POLL", "0.01")
    with batch_server(BatchState(fail_creates=1)) as srv:
        yield srv


def context(store: Any, server: BatchServer, run_id: int) -> BatchContext:
    return BatchContext(store, BatchApi(resolve_endpoint(server.base_url), 30.0), 1, 1, run_id,
                        DEFAULT_TEMPLATES, "q", "judge", "low", server.base_url, Prices(),
                        lambda _: None)


def test_two_runs_that_find_one_half_sent_batch_create_it_once(
        store_db: str, server: BatchServer) -> None:
    make_store(store_db)
    first = run_cli("judge", "--db", store_db, "--batch", "--no-wait", "--base-url",
                    server.base_url)
    assert first.exit_code == 1 and "creating the batch failed: HTTP 503" in first.output
    assert query(store_db, "SELECT state, provider_batch_id IS NULL FROM judge_batches") == [
        ("uploaded", True)]
    # Two runs advance it at once; each one's look for a provider batch on its file waits for
    # the other's, so two runs that both went on to look would both create one.
    server.state.list_gate = threading.Barrier(2, timeout=3)
    store = open_store(store_db)
    errors: list[BaseException] = []
    try:
        with stage_run(store, "judge", {}) as one, stage_run(store, "judge", {}) as two:
            contexts = [context(store, server, one.id), context(store, server, two.id)]

            def finish(ctx: BatchContext) -> None:
                try:
                    ctx.advance()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=finish, args=(ctx,)) for ctx in contexts]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            for ctx in contexts:
                ctx.api.close()
    finally:
        store.close()
    assert not errors, errors
    assert server.state.calls["create"] == 2  # the failed one, then one create
    assert len(server.state.batches) == 1
    holders = query(store_db, "SELECT stage_run_id, provider_batch_id IS NOT NULL "
                              "FROM judge_batches")
    assert len(holders) == 1 and holders[0][0] in (2, 3) and holders[0][1]
    # the next run collects it, and every call ran once
    done = run_cli("judge", "--db", store_db, "--batch", "--base-url", server.base_url)
    assert done.exit_code == 0, done.output
    assert set(server.state.billed.values()) == {1} and len(server.state.billed) == 64


def test_a_batch_run_leaves_out_keys_this_rounds_workers_wrote(store_db: str) -> None:
    """--retry-errors / --overwrite in a batch: a key a judge worker of this round (running when
    the batch run started, or started since) wrote meanwhile is not sent again; an error or a
    judgment of an earlier round is."""
    make_store(store_db)
    store = open_store(store_db)
    try:
        config_id = add_judge_config(store)
        with stage_run(store, "judge", {}) as worker, stage_run(store, "judge", {}) as run:
            ctx = BatchContext(store, None, config_id, 1, run.id,  # type: ignore[arg-type]
                               DEFAULT_TEMPLATES, "q", "m", "low", "http://x/v1", Prices(),
                               lambda _: None, peers=frozenset({worker.id}))
            earlier = {"verdict": None, "error": "HTTP 500", "stage_run_id": None}
            rows = {7: earlier,  # an error of an earlier round: retried
                    8: {"verdict": True, "error": None, "stage_run_id": worker.id},  # fixed now
                    9: {"verdict": None, "error": "HTTP 500", "stage_run_id": worker.id},
                    10: {"verdict": True, "error": None, "stage_run_id": worker.id},
                    11: {"verdict": False, "error": None, "stage_run_id": None}}
            store.transact(lambda s: s.execute(insert(Judgment), [
                {"rollout_id": rid, "grader": "coherence", "judge_config_id": config_id,
                 "attempts": 1, **values} for rid, values in rows.items()]))
            retry, kept_retry = ctx.record([Call(r, "coherence", "a", "w") for r in (7, 8, 9)],
                                           "retry_errors")
            over, kept_over = ctx.record([Call(r, "coherence", "a", "w") for r in (10, 11)],
                                         "overwrite")
    finally:
        store.close()
    assert retry is not None and [c.rollout_id for c in kept_retry] == [7]
    assert over is not None and [c.rollout_id for c in kept_over] == [11]


def test_a_take_over_from_a_stale_read_loses(db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    assert run_cli("judge", "--db", db_path, "--batch", "--no-wait", "--base-url",
                   server.base_url).exit_code == 1
    store = open_store(str(db_path))
    try:
        with stage_run(store, "judge", {}) as one, stage_run(store, "judge", {}) as two:
            first, second = context(store, server, one.id), context(store, server, two.id)
            mine, theirs = first.live()[0], second.live()[0]
            assert first.take_over(mine) and first.take_over(mine)  # its own again: still
            assert not second.take_over(theirs)
            assert second.reload(theirs.id).stage_run_id == one.id
            first.api.close()
            second.api.close()
    finally:
        store.close()
