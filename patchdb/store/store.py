"""The Store: an engine plus sessions for reading and for writing one unit at a time."""

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from patchdb.errors import StoreError
from patchdb.store import migrate
from patchdb.store.engine import make_engine, resolve_url, sqlite_path, sqlite_read_only

T = TypeVar("T")
LOCK_RETRIES = 8


def is_lock_error(exc: BaseException) -> bool:
    """SQLite's "database is locked"/busy, or a PostgreSQL deadlock: worth retrying."""
    text = str(getattr(exc, "orig", exc)).lower()
    return "locked" in text or "busy" in text or "deadlock detected" in text


def describe_db_error(where: str, exc: DatabaseError) -> StoreError:
    """Turn a driver error into one line a user can act on."""
    text = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    lowered = text.lower()
    if "file is not a database" in lowered:
        return StoreError(f"{where} is not a SQLite database")
    if "malformed" in lowered or "corrupt" in lowered:
        return StoreError(f"{where} is corrupt ({text})")
    if "disk" in lowered and "full" in lowered:
        return StoreError(f"disk full while writing {where}; nothing from the unit in flight was kept")
    if lowered.startswith("connection failed") or "could not connect" in lowered:
        reason = text.rsplit("failed: ", 1)[-1].replace("FATAL:  ", "")
        return StoreError(f"cannot connect to {where} ({reason})")
    if "readonly database" in lowered or "read-only file system" in lowered:
        return read_only_error(where)
    if "unable to open" in lowered:
        return StoreError(f"cannot open {where} ({text})")
    return StoreError(f"database error on {where}: {text}")


def read_only_error(where: str) -> StoreError:
    """The one line for a command that must write a store it can only read."""
    return StoreError(f"cannot write to {where}: it is read-only here (the file or its folder "
                      "cannot be written); commands that only read it (status, report, "
                      "calibrate, label --next) still work")


class Store:
    """A migrated patchdb store. Use `read()` for queries and `write()` for one transaction.
    A read-only store (a SQLite file this process cannot write) refuses `write()`."""

    def __init__(self, url: str, engine: Engine, read_only: bool = False) -> None:
        self.url = url
        self.engine = engine
        self.read_only = read_only
        self._writer = engine.execution_options(sqlite_begin="IMMEDIATE")

    @property
    def where(self) -> str:
        path = sqlite_path(self.url)
        return str(path) if path is not None else self.engine.url.render_as_string()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
            except DatabaseError as exc:
                if isinstance(exc, OperationalError) and is_lock_error(exc):
                    raise
                raise describe_db_error(self.where, exc) from None

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: all of it is committed, or none of it."""
        if self.read_only:
            raise read_only_error(self.where)
        with Session(self._writer, expire_on_commit=False) as session:
            try:
                with session.begin():
                    yield session
            except OperationalError as exc:
                if is_lock_error(exc):
                    raise
                raise describe_db_error(self.where, exc) from None
            except IntegrityError:
                raise  # a unique key held: callers decide whether that is a duplicate to skip
            except DatabaseError as exc:
                raise describe_db_error(self.where, exc) from None

    def transact(self, fn: Callable[[Session], T]) -> T:
        """Run fn in a write transaction, retrying with backoff while the database is locked."""
        for attempt in range(LOCK_RETRIES):
            try:
                with self.write() as session:
                    return fn(session)
            except OperationalError as exc:
                if not is_lock_error(exc) or attempt == LOCK_RETRIES - 1:
                    raise describe_db_error(self.where, exc) from None
                time.sleep(min(10.0, 0.1 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.engine.dispose()


def open_store(db: str | None = None, *, create: bool = False, migrate_schema: bool = True) -> Store:
    """Open (and upgrade) the store at a path or SQLAlchemy URL; create it only if `create`.
    A SQLite file that cannot be written here is opened read-only and never upgraded."""
    url = resolve_url(db)
    path = sqlite_path(url)
    if path is not None and not create and not path.exists():
        raise StoreError(f"no store at {path}; create one with `patchdb init --db {path}`")
    read_only = path is not None and sqlite_read_only(path)
    engine = make_engine(url, read_only=read_only)
    store = Store(url, engine, read_only=read_only)
    try:
        if read_only:
            migrate.check_current(engine, store.where)
        elif migrate_schema:
            migrate.upgrade(engine, store.where)
        else:
            migrate.check_known(engine, store.where)
    except DatabaseError as exc:
        engine.dispose()
        raise describe_db_error(store.where, exc) from None
    except StoreError:
        engine.dispose()
        raise
    return store
