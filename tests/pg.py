"""PostgreSQL for the tests: a throwaway cluster (scripts/start_postgres.sh) and a fresh database
per test.

Where the server comes from, in order: $PATCHDB_TEST_POSTGRES_URL (an admin URL of a server you
run yourself), else the cluster the script starts on loopback (started from here when the
PostgreSQL binaries are installed; installing them is left to CI). Without either the tests are
skipped, unless PATCHDB_REQUIRE_POSTGRES is set (CI sets it), in which case they fail.

Fixtures: `pg_url` (a fresh, empty database's URL) and `store_db` (parametrized: a SQLite path,
then a PostgreSQL URL), for tests that should hold on both backends.
"""

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = ROOT / "scripts" / "start_postgres.sh"
# Read at import, before the autouse isolation fixture clears PATCHDB_* from the environment.
REQUIRE = bool(os.environ.get("PATCHDB_REQUIRE_POSTGRES"))
ADMIN_URL = os.environ.get("PATCHDB_TEST_POSTGRES_URL")


def _server_binaries() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def _start_cluster() -> tuple[str | None, str]:
    """(admin URL, why not) from the start script."""
    if not _server_binaries():
        return None, "PostgreSQL server binaries are not installed (apt-get install postgresql)"
    try:
        proc = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"scripts/start_postgres.sh did not run: {exc}"
    if proc.returncode != 0:
        return None, f"scripts/start_postgres.sh failed: {proc.stderr.strip()[-300:]}"
    return proc.stdout.strip().splitlines()[-1], ""


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"PostgreSQL is required (PATCHDB_REQUIRE_POSTGRES) but {reason}")
    pytest.skip(f"PostgreSQL not available: {reason}")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """An admin URL (database 'postgres') of a running server."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'psycopg[binary]')")
    url, why = (ADMIN_URL, "") if ADMIN_URL else _start_cluster()
    if url is None:
        _unavailable(why)
    assert url is not None
    try:
        psycopg.connect(url, connect_timeout=10).close()
    except psycopg.Error as exc:
        _unavailable(f"cannot connect to {url}: {str(exc).splitlines()[0]}")
    return url


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with a random name; dropped after the test."""
    name = f"patchdb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_admin_url.replace("postgresql://", "postgresql+psycopg://", 1),
                          isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store location on each backend: a SQLite file path, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite")
    return str(request.getfixturevalue("pg_url"))


def sqlalchemy_url(store: str | Path) -> str:
    """The URL a test opens a store at: a SQLite path as sqlite:///, PostgreSQL through psycopg."""
    text_ = str(store)
    if text_.startswith("postgresql://"):
        return text_.replace("postgresql://", "postgresql+psycopg://", 1)
    return text_ if "://" in text_ else f"sqlite:///{text_}"


def _engine(store: str | Path) -> Any:
    url = sqlalchemy_url(store)
    # SQLite: wait for a writer as long as the stages themselves do, never "database is locked"
    return create_engine(url, connect_args={"timeout": 60} if url.startswith("sqlite") else {})


def query(store: str | Path, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows of one SELECT on either backend, in a connection of its own."""
    engine = _engine(store)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params or {})]
    finally:
        engine.dispose()


def execute(store: str | Path, sql: str, rows: list[dict[str, Any]] | dict[str, Any]) -> None:
    """One committed statement (executemany for a list of rows) on either backend."""
    engine = _engine(store)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), rows)
    finally:
        engine.dispose()
