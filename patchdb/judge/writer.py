"""Writing judgments from a thread of their own, so the store never slows the calls.

Results are queued; the writer thread commits whatever is queued as soon as it is (a group
commit: while one transaction commits the next results gather, so busy runs write many rows a
transaction and quiet ones write at once), at most `batch` rows a transaction. Rows are
committed in the order they were put, so `written` says which are stored: the run lets a call
slot start its next call only once its last reply is, and a kill loses at most the replies in
flight. The transaction that writes a key's judgment also drops the lease the run held on it
(leases.py). The unique key (rollout, grader, judge config) makes every write idempotent:
`only_missing` inserts with ON CONFLICT DO NOTHING (a judgment another run stored meanwhile
stays), the other modes replace the row.

A failed write is final: the writer keeps what it committed, drops nothing silently (the rows
it could not write stay counted in `backlog`), calls `notify` so the run stops at once, and
`close` re-raises the error.
"""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from patchdb.faults import fault_point
from patchdb.judge.leases import release_keys
from patchdb.store.dialect import dialect_insert
from patchdb.store.models import JudgeCacheEntry, Judgment, utcnow
from patchdb.store.store import Store

_UPDATED = (
    "verdict", "p_yes", "cut_off", "raw_reply", "error", "attempts", "prompt_tokens", "completion_tokens",
    "reasoning_tokens", "cost", "latency_s", "stage_run_id", "created_at",
)


@dataclass
class Row:
    """One finished judgment, plus the cache entry to keep for it (if any)."""

    values: dict[str, Any]
    cache: tuple[str, str] | None = None


class JudgmentWriter:
    """A thread that commits queued judgment rows as they come, many to a transaction.

    `put` appends to a deque and wakes the thread only when it sleeps: a busy writer finds
    the next rows queued when its commit returns, with no wake-up per result.
    """

    def __init__(
        self, store: Store, replace: bool, batch: int = 200,
        notify: Callable[[], object] | None = None, lease_holder: int | None = None,
    ) -> None:
        self.store = store
        self.replace = replace
        self.batch = batch
        self.notify = notify  # called from the writer thread after every commit or failure
        self.lease_holder = lease_holder  # the stage run whose leases the written keys drop
        self.written = 0  # rows committed; rows are committed in the order they were put
        self.error: BaseException | None = None
        self._put = 0
        self._writing = 0  # rows taken from the queue whose transaction has not committed
        self._rows: deque[Row] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._statement: Any = None
        self._thread = threading.Thread(target=self._run, name="patchdb-judge-writer", daemon=True)
        self._thread.start()

    def put(self, row: Row) -> int:
        """Queue a row; its number, so `written >= number` once it is committed."""
        self._rows.append(row)
        self._put += 1
        if not self._wake.is_set():
            self._wake.set()
        return self._put

    @property
    def backlog(self) -> int:
        """Rows handed over and not yet committed (after a failure: never committed)."""
        return len(self._rows) + self._writing

    def close(self) -> None:
        """Write everything queued so far and stop; re-raises a write error."""
        self._closing = True
        self._wake.set()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            closing = self._closing
            while self._rows and self.error is None:
                take = min(len(self._rows), self.batch)
                self._writing = take
                rows = [self._rows.popleft() for _ in range(take)]
                self._flush(rows)
            if closing or self.error is not None:
                return

    def _flush(self, rows: list[Row]) -> None:
        try:
            self.store.transact(lambda session: self._write(session, rows))
        except BaseException as exc:  # surfaced by close(); notify() makes the run stop now
            self.error = exc
        else:
            self.written += len(rows)
            self._writing = 0
            fault_point("judge.batch_written")
        if self.notify is not None:
            self.notify()

    def _insert(self, session: Session) -> Any:
        """The INSERT of judgment rows, built once: plain SQL on the table, no ORM objects."""
        if self._statement is None:
            stmt = dialect_insert(session, Judgment.__table__)
            keys = ["rollout_id", "grader", "judge_config_id"]
            if self.replace:
                stmt = stmt.on_conflict_do_update(
                    index_elements=keys, set_={c: stmt.excluded[c] for c in _UPDATED}
                )
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=keys)
            self._statement = stmt
        return self._statement

    def _write(self, session: Session, rows: list[Row]) -> None:
        now = utcnow()
        values = [{**r.values, "created_at": now} for r in rows]
        session.connection().execute(self._insert(session), values)
        cache = [{"request_hash": h, "reply_json": j, "created_at": now}
                 for h, j in {r.cache for r in rows if r.cache is not None}]
        if cache:
            session.execute(
                dialect_insert(session, JudgeCacheEntry).on_conflict_do_nothing(
                    index_elements=["request_hash"]
                ),
                cache,
            )
        if self.lease_holder is not None:
            for config_id in {v["judge_config_id"] for v in values}:
                release_keys(session, self.lease_holder, config_id,
                             [(v["rollout_id"], v["grader"]) for v in values
                              if v["judge_config_id"] == config_id])
