"""stage_runs: every stage invocation is a row with a heartbeat, so `status` can tell a running
stage from a crashed one (a crashed one stops beating).

Whether a run still runs decides who may take over its work (judge leases, half-sent batches),
so a live run must never look dead from another machine: on PostgreSQL the heartbeat is the
database's clock, written and read (machines' clocks may differ by more than the 60 s a
heartbeat may age), and a run's pid is looked at only where it means the same process: on the
same boot of the same machine, in the same pid namespace (`machine`), not wherever the host name
matches (cloud images and containers share host names).
"""

import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from patchdb.errors import StoreError
from patchdb.redact import redact_arguments, redact_text
from patchdb.store.models import StageRun, utcnow
from patchdb.store.store import Store, describe_db_error

log = logging.getLogger(__name__)
HEARTBEAT_S = 10.0
STALE_AFTER = timedelta(seconds=60)


def db_now(session: Session) -> datetime:
    """Now, timezone-aware UTC: the database's clock on PostgreSQL, this machine's on SQLite
    (every process that opens a SQLite file runs on the machine that holds it)."""
    if session.get_bind().dialect.name == "postgresql":
        now = session.scalar(select(func.now()))
        assert now is not None
        return now.astimezone(UTC)
    return utcnow()


def _stamp(session: Session) -> Any:
    """The value a heartbeat is written with: the database's now() on PostgreSQL (evaluated
    there), this machine's clock on SQLite."""
    return func.now() if session.get_bind().dialect.name == "postgresql" else utcnow()


@cache
def this_machine() -> str | None:
    """This process's machine, as far as its pids go: the kernel's boot id and the pid
    namespace (Linux); None where neither can be read, and then no pid is looked at."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot} {namespace}"[:100]


class StageRunHandle:
    def __init__(self, store: Store, run_id: int) -> None:
        self.store = store
        self.id = run_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="patchdb-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.transact(
                    lambda s: s.execute(
                        update(StageRun).where(StageRun.id == self.id)
                        .values(heartbeat_at=_stamp(s))
                    )
                )
            except (StoreError, DatabaseError) as exc:
                # a missed beat is not worth stopping the stage for, but it is worth a line:
                # `patchdb status` calls a run crashed once its beats stop
                if isinstance(exc, DatabaseError):
                    exc = describe_db_error(self.store.where, exc)
                text = redact_text(str(exc))
                log.warning("patchdb: the heartbeat of stage run %d was not recorded (%s)",
                            self.id, text)

    def finish(self, status: str, error: str | None = None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.store.transact(
            lambda s: s.execute(
                update(StageRun)
                .where(StageRun.id == self.id)
                .values(status=status, error=error, finished_at=utcnow(), heartbeat_at=_stamp(s))
            )
        )


@contextmanager
def stage_run(
    store: Store, stage: str, arguments: dict[str, Any], sweep_id: int | None = None
) -> Iterator[StageRunHandle]:
    """Record a stage invocation: running while the body runs, then finished, interrupted or
    failed. A process killed with SIGKILL leaves 'running' with a stale heartbeat."""

    def insert(session: Any) -> int:
        run = StageRun(
            stage=stage,
            sweep_id=sweep_id,
            arguments=json.dumps(redact_arguments(arguments), sort_keys=True, default=str),
            host=socket.gethostname(),
            machine=this_machine(),
            pid=os.getpid(),
            status="running",
            heartbeat_at=_stamp(session),
        )
        session.add(run)
        session.flush()
        return run.id

    handle = StageRunHandle(store, store.transact(insert))
    handle._thread.start()
    try:
        yield handle
    except KeyboardInterrupt:
        handle.finish("interrupted")
        raise
    except BaseException as exc:
        handle.finish("failed", redact_text(f"{type(exc).__name__}: {exc}")[:2000])
        raise
    else:
        handle.finish("finished")


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def effective_status(run: StageRun, now: datetime) -> str:
    """'running' only while the heartbeat is fresh against `now` (db_now: the clock the
    heartbeat was written with) and, where the run is on this machine (this_machine), its pid
    is alive."""
    if run.status != "running":
        return run.status
    if now - _aware(run.heartbeat_at) > STALE_AFTER:
        return "crashed"
    here = this_machine()
    if here is not None and run.machine == here and not _pid_alive(run.pid):
        return "crashed"
    return "running"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recent_runs(store: Store, limit: int = 20) -> list[StageRun]:
    with store.read() as session:
        return list(session.scalars(select(StageRun).order_by(StageRun.id.desc()).limit(limit)))


def is_running(store: Store, run_id: int) -> bool:
    with store.read() as session:
        run = session.get(StageRun, run_id)
        return run is not None and effective_status(run, db_now(session)) == "running"
