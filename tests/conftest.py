"""Shared fixtures: every test gets its own store in tmp_path and never touches the user's state."""

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

if not torch.cuda.is_available():
    # The decode-attention kernel is defined for Triton's interpreter on the CPU (the variable is
    # read when a kernel is defined, so it is set before the import below). Only tests marked
    # `triton` run it: interpreted, it is hundreds of times slower than the SDPA path a CPU run
    # of patchdb takes, and every other test (and every patchdb process a test starts) runs as
    # a user's CPU run does (_isolate clears the variable).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import patchdb.generate.triton_decode  # noqa: F401
    import patchdb.generate.triton_topk  # noqa: F401

from patchdb.cli import cli

pytest_plugins = ["pg"]  # PostgreSQL fixtures: pg_url, store_db (tests/pg.py)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in parallel, one process per core (scripts/test.sh: pytest -n auto): one torch
    # thread per process, or two processes' thread pools fight over the same cores.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in the patchdb processes tests start


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that need PostgreSQL (`postgres`) or Chromium (`browser`) from what they
    use, so that none can miss its marker: the fast set (`scripts/test.sh --fast`) leaves them
    out with the SmolLM2 runs (`slow`, marked by hand). PostgreSQL: the pg fixtures, or
    store_db's postgresql case; Chromium: the skip that every Chromium test carries."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "pg_admin_url" in names or params.get("store_db") == "postgresql":
            item.add_marker(pytest.mark.postgres)
        if any("chromium" in str(m.kwargs.get("reason", "")).lower()
               for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole run: the GGUF is dequantised once, not per test. Parallel
    workers share it (the run's temporary root); the cache is written atomically, so two workers
    that both miss it at the start each write a copy and one rename wins."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / "patchdb-cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture(autouse=True)
def _isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_cache_dir: Path,
             request: pytest.FixtureRequest) -> Iterator[None]:
    """No test sees the user's keys, store or caches (the model cache is the session's own);
    Triton's interpreter only for tests marked `triton` (see the top of this file)."""
    for var in list(os.environ):
        if var.startswith("PATCHDB_") or var in ("OPENROUTER_API_KEY", "OPENAI_API_KEY"):
            monkeypatch.delenv(var, raising=False)
    if request.node.get_closest_marker("triton") is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PATCHDB_CACHE_DIR", str(shared_cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.sqlite"


def run_cli(*args: str) -> Result:
    """Invoke the CLI the way a user would, without catching exceptions we did not expect."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def file_digest(path: Path) -> str:
    """A hash of the store file and its WAL, to prove a failed command changed nothing."""
    h = hashlib.sha256()
    for p in (path, path.with_name(path.name + "-wal")):
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()
