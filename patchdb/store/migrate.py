"""Schema migrations: every command upgrades an older store and refuses a newer one."""

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from patchdb.errors import StoreError, StoreNewerError


def migrations_dir() -> Path:
    """Where the alembic scripts are: inside the installed package, or the repo's migrations/."""
    installed = Path(__file__).resolve().parents[1] / "migrations"
    if (installed / "env.py").exists():
        return installed
    repo = Path(__file__).resolve().parents[2] / "migrations"
    if (repo / "env.py").exists():
        return repo
    raise StoreError("patchdb is installed without its migrations folder; reinstall it")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def known_revisions() -> set[str]:
    """Every schema revision this patchdb's migrations define."""
    return {script.revision for script in _script().walk_revisions()}


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_known(engine: Engine, where: str) -> str | None:
    """Return the store's revision; refuse foreign databases and newer schemas."""
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        revision = MigrationContext.configure(conn).get_current_revision()
    if revision is None and tables - {"alembic_version"}:
        raise StoreError(f"{where} is a database but not a patchdb store (it has no schema version)")
    if revision is not None and revision not in known_revisions():
        raise StoreNewerError(
            f"{where} was written by a newer patchdb (schema {revision} is unknown here, "
            f"this patchdb knows up to {head_revision()}); upgrade patchdb"
        )
    return revision


def check_current(engine: Engine, where: str) -> None:
    """For a store that cannot be written here: refuse it unless it is at this patchdb's
    schema, since upgrading it would mean writing it."""
    revision = check_known(engine, where)
    if revision != head_revision():
        schema = f"schema {revision}" if revision is not None else "no schema yet"
        raise StoreError(
            f"{where} is read-only here and has {schema}, older than this patchdb's "
            f"{head_revision()}; it must be upgraded before it can be read: run any patchdb "
            "command on it where it can be written (or on a writable copy)")


# Any constant will do: PostgreSQL upgraders queue on this advisory lock, as SQLite's do on
# BEGIN IMMEDIATE, so concurrent openers of a fresh database do not both create the tables.
PG_UPGRADE_LOCK = 0x70617463  # "patc"


def upgrade(engine: Engine, where: str) -> None:
    """Bring the store to head. Serialised by BEGIN IMMEDIATE (SQLite) or an advisory lock
    (PostgreSQL), so concurrent openers are safe."""
    if check_known(engine, where) == head_revision():
        return
    cfg = alembic_config(str(engine.url))
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_UPGRADE_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()
