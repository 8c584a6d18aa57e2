"""Run history and run-level checks: stage_runs grows only for runs that did something,
`generate --gpus` refuses a machine without the GPUs it asks for, and failures around a run are
seen (a heartbeat the store refuses, a store schema this patchdb does not know, a model without
a static cache) instead of being swallowed or reported as something else."""

import logging
import re
import sqlite3
import threading
from pathlib import Path

import pytest
import torch
from conftest import file_digest, run_cli
from judge_server import fault_server, make_store
from test_generate_stage import init_store, model_dir  # noqa: F401  (fixture)
from tiny_models import tiny_llama

from patchdb.store import open_store
from patchdb.store import runs as runs_module

ROOT = Path(__file__).resolve().parent.parent


def stage_runs(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT stage, status FROM stage_runs ORDER BY id").fetchall()


def test_a_rerun_with_nothing_to_do_adds_no_stage_run(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    db = init_store(tmp_path, model_dir, patch_layers="2", samples=1, max_new_tokens=2)
    first = run_cli("generate", "--db", db, "--quiet")
    assert first.exit_code == 0, first.output
    assert stage_runs(db) == [("generate", "finished")]
    again = run_cli("generate", "--db", db, "--quiet")
    assert again.exit_code == 0 and "Nothing to generate" in again.output
    assert stage_runs(db) == [("generate", "finished")]

    with fault_server() as server:
        judge = ["judge", "--db", db, "--base-url", server.base_url, "--no-progress"]
        assert run_cli(*judge).exit_code == 0
        # (8 keys x 1 layer + 6 baselines) x 1 sample, two graders each
        assert server.stats.requests == 28
        idle = run_cli(*judge)
    assert idle.exit_code == 0 and "nothing to judge" in idle.output
    assert stage_runs(db) == [("generate", "finished"), ("judge", "finished")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpus_without_cuda_is_refused_in_one_line(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    db = init_store(tmp_path, model_dir)
    before = file_digest(db)
    result = run_cli("generate", "--db", db, "--gpus", "2")
    assert result.exit_code == 1
    assert result.output == ("Error: --gpus 2 needs CUDA GPUs, but CUDA is not available here; "
                             "run without --gpus to generate on the CPU\n")
    assert file_digest(db) == before
    assert stage_runs(db) == []


# --- failures are seen -------------------------------------------------------------------------

class Waiter(logging.Handler):
    """Sets an event once a record containing `text` is logged (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen, self.messages = text, threading.Event(), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if self.text in record.getMessage():
            self.seen.set()


def test_a_heartbeat_the_store_refuses_is_reported_and_the_stage_goes_on(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_store(db_path, last=0)
    with sqlite3.connect(db_path) as conn:
        conn.execute("""CREATE TRIGGER no_beats BEFORE UPDATE ON stage_runs
            WHEN NEW.status = 'running' BEGIN SELECT RAISE(ABORT, 'beats refused'); END""")
    monkeypatch.setattr(runs_module, "HEARTBEAT_S", 0.01)
    waiter = Waiter("beats refused")
    logger = logging.getLogger("patchdb.store.runs")
    logger.addHandler(waiter)
    store = open_store(str(db_path))
    try:
        with runs_module.stage_run(store, "generate", {}) as run:
            assert waiter.seen.wait(timeout=60), waiter.messages
    finally:
        logger.removeHandler(waiter)
        store.close()
    assert waiter.messages[0] == (f"patchdb: the heartbeat of stage run {run.id} was not recorded "
                                  f"(database error on {db_path}: beats refused)")
    assert stage_runs(db_path) == [("generate", "finished")]


def set_revision(db: Path, revision: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def head_from_files() -> str:
    """The revision no migration file builds on, read from the files' own lines (not alembic)."""
    revisions, parents = set(), set()
    for path in (ROOT / "migrations" / "versions").glob("[0-9]*.py"):
        text = path.read_text()
        revisions.add(re.search(r'^revision: str = "(\w+)"', text, re.M)[1])  # type: ignore[index]
        parent = re.search(r'^down_revision: str \| None = "(\w+)"', text, re.M)
        if parent:
            parents.add(parent[1])
    (head,) = revisions - parents
    return head


def test_only_a_revision_this_patchdb_defines_is_known(db_path: Path) -> None:
    from patchdb.store.migrate import check_known, head_revision

    newest = head_from_files()
    make_store(db_path, last=0)
    store = open_store(str(db_path))
    assert check_known(store.engine, "here") == head_revision() == newest
    store.close()
    for revision in ("ffff", "heads", "base"):  # alembic keywords are not revisions of a store
        set_revision(db_path, revision)
        result = run_cli("status", "--db", db_path)
        assert result.exit_code == 1
        assert result.output == (
            f"Error: {db_path} was written by a newer patchdb (schema {revision} is unknown "
            f"here, this patchdb knows up to {newest}); upgrade patchdb\n")
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
                (revision,)]


def test_a_model_without_a_static_cache_says_why_it_decodes_slowly(
    caplog: pytest.LogCaptureFixture
) -> None:
    from patchdb.generate.graphed import graph_supported

    model = tiny_llama(n_layers=2)
    cpu = torch.device("cpu")
    assert graph_supported(model, cpu, 64, require_cuda=False)
    model.config.layer_types = ["full_attention", "exotic_attention"]
    with caplog.at_level(logging.WARNING, logger="patchdb.generate.graphed"):
        assert not graph_supported(model, cpu, 64, require_cuda=False)
    assert [r.getMessage() for r in caplog.records] == [
        "patchdb: no static KV cache for this model (KeyError: 'exotic_attention'); decoding "
        "without CUDA graphs, several times slower"]
