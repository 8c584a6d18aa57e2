"""Opening a store: a file path or any SQLAlchemy URL, with SQLite set up for several processes.

SQLite runs in WAL mode with foreign keys on and a busy timeout. Write transactions start with
BEGIN IMMEDIATE, so two writers queue on the lock instead of failing on an upgrade.

A SQLite file this process cannot write (read-only media, or no write permission on the file or
on its folder) is opened read-only. A WAL reader needs the -shm index beside the file: where it
exists (a writer has the store open) it is read as it is; where it does not, this process could
not create it, so the file is opened immutable, which needs none.
"""

import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from patchdb.errors import StoreError

DEFAULT_DB = "patchdb.sqlite"
BUSY_TIMEOUT_MS = 60_000
CONNECT_TIMEOUT_S = 10  # an unreachable PostgreSQL host fails after this, not after minutes
_SQLITE_MAGIC = b"SQLite format 3\x00"


def with_driver(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3; any other URL is left as it is."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def resolve_url(db: str | os.PathLike[str] | None) -> str:
    """A path becomes a sqlite URL; a URL (anything with '://') is used as it is, except that
    plain PostgreSQL URLs get the psycopg 3 driver."""
    text = os.fspath(db) if db is not None else os.environ.get("PATCHDB_DB") or DEFAULT_DB
    if "://" in text:
        text = with_driver(text)
        try:
            make_url(text)
        except ArgumentError:
            raise StoreError(f"invalid database URL {text!r}") from None
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite URL, or None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not SQLite or is shorter than its header says (truncated)."""
    if not path.exists():
        if not path.parent.exists():
            raise StoreError(f"cannot create store {path}: folder {path.parent} does not exist")
        return
    if path.is_dir():
        raise StoreError(f"store {path} is a folder, not a SQLite file")
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb") as fh:
        header = fh.read(100)
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise StoreError(f"{path} is not a SQLite database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    page_count = int.from_bytes(header[28:32], "big")
    counter_ok = header[24:28] == header[92:96]
    wal = path.with_name(path.name + "-wal")
    has_wal = wal.exists() and wal.stat().st_size > 0
    if page_size < 512 or size % page_size != 0:
        raise StoreError(f"{path} is truncated or corrupt (size {size} is not whole pages)")
    if counter_ok and not has_wal and size < page_count * page_size:
        raise StoreError(
            f"{path} is truncated: its header says {page_count * page_size} bytes, "
            f"the file has {size}"
        )


def sqlite_read_only(path: Path) -> bool:
    """Whether this process cannot write the SQLite file at `path`: the file is not writable, or
    its folder is not, so the -wal and -shm files that WAL mode needs cannot be made."""
    if not path.exists():
        return False
    if not os.access(path, os.W_OK):
        return True
    shm = path.with_name(path.name + "-shm")
    return not shm.exists() and not os.access(path.parent, os.W_OK | os.X_OK)


def _read_only_connect(path: Path) -> Any:
    """A connection factory for a store that cannot be written here: `mode=ro` with its -shm
    index where one exists, else `immutable`, which tells SQLite that nobody changes the file,
    so it needs no index. That is only right when no committed change waits in the
    write-ahead log, so such a store (a log but no index) is refused."""
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    if shm.exists():
        uri = f"file:{quote(str(path))}?mode=ro"
    elif wal.exists() and wal.stat().st_size > 0:
        raise StoreError(
            f"{path} is read-only here and its write-ahead log {wal.name} holds changes not yet "
            "in the file; open it once where it can be written (any patchdb command), then "
            "read it here")
    else:
        uri = f"file:{quote(str(path))}?mode=ro&immutable=1"
    return lambda: sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                   check_same_thread=False)


def _sqlite_read_only_setup(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    dbapi_conn.isolation_level = None
    dbapi_conn.execute("PRAGMA foreign_keys = ON")


def _sqlite_connect_setup(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Take transaction control from the sqlite3 module so we can emit BEGIN IMMEDIATE.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys = ON")
    mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "wal":
        cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str, read_only: bool = False) -> Engine:
    """Create an engine; for SQLite, with the pragmas and BEGIN handling above, or read-only
    (`read_only`, for a file that sqlite_read_only says cannot be written here)."""
    url = with_driver(url)
    path = sqlite_path(url)
    if path is not None:
        check_sqlite_file(path)
    try:
        if path is not None and read_only:
            engine = create_engine(url, creator=_read_only_connect(path))
            event.listen(engine, "connect", _sqlite_read_only_setup)
            event.listen(engine, "begin", _sqlite_begin)
        elif url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
            event.listen(engine, "connect", _sqlite_connect_setup)
            event.listen(engine, "begin", _sqlite_begin)
        else:
            connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if "psycopg" in url else {}
            engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except ArgumentError:
        raise StoreError(f"invalid database URL {url!r}") from None
    except ModuleNotFoundError as exc:
        raise StoreError(f"the driver for {url.split(':')[0]} is not installed ({exc.name})") from None
    return engine
