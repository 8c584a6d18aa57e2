"""Leases: how several judge workers on one store split the pending keys, so each call is paid once.

A live judge run (a worker) reads a page of pending keys, then claims some of them in one short
write transaction: it checks again, inside the transaction, that each key is still pending,
that no live lease and no live batch holds it, and writes a judge_leases row per key it takes
(holder: its stage run; an expiry pushed forward while it works). Claims are serialised: SQLite's
BEGIN IMMEDIATE, and on PostgreSQL the advisory lock `judge --batch` takes to record its keys, so
two claims (or a claim and a batch) never take the same key; the unique key on judge_leases
backs that up. The lease row goes in the transaction that writes the key's judgment
(writer.py), or when the run lets its unsent keys go at the end. A lease is dead once it has
expired or its run is no longer running (runs.effective_status: a dead pid on this machine, a
heartbeat over 60 s old by the database's clock, a finished run), and a dead lease's key may
be claimed by anyone.

Times come from the database's clock on PostgreSQL (machines' clocks may differ) and from this
machine's on SQLite (every process is on this machine).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Table, bindparam, delete, select, text, update
from sqlalchemy.orm import Session

from patchdb.judge.batch_plan import live_keys
from patchdb.judge.plan import Call, Fresh, Key, Scope, needs, pending_page, stored_states
from patchdb.store.dialect import dialect_insert
from patchdb.store.models import JudgeLease, StageRun
from patchdb.store.runs import db_now, effective_status

KEYS_LOCK = 18_000_000  # + judge config id: the advisory lock judge --batch records keys under
_PLAIN = {"synchronize_session": False}  # no ORM objects to keep in step: plain SQL, less CPU
_TABLE: Table = JudgeLease.__table__  # type: ignore[assignment]
# one statement, compiled once, for the writer's every transaction
_RELEASE_KEY = delete(_TABLE).where(
    _TABLE.c.stage_run_id == bindparam("holder"), _TABLE.c.judge_config_id == bindparam("config"),
    _TABLE.c.rollout_id == bindparam("rollout"), _TABLE.c.grader == bindparam("grader"))


def live_leases(session: Session, config_id: int, rollout_ids: Sequence[int],
                now: datetime) -> dict[Key, int]:
    """Keys among these rollouts that a live lease holds, with the holding stage run."""
    found: dict[Key, int] = {}
    for start in range(0, len(rollout_ids), 900):
        found.update({(rid, grader): run for rid, grader, run in session.execute(
            select(JudgeLease.rollout_id, JudgeLease.grader, JudgeLease.stage_run_id).where(
                JudgeLease.judge_config_id == config_id, JudgeLease.expires_at > now,
                JudgeLease.rollout_id.in_(list(rollout_ids[start:start + 900]))))})
    if not found:
        return found
    runs = session.scalars(select(StageRun).where(StageRun.id.in_(set(found.values()))))
    alive = {run.id for run in runs if effective_status(run, now) == "running"}
    return {key: run for key, run in found.items() if run in alive}


@dataclass
class Page:
    """A page of pending calls as one worker sees it: those free to claim, the first rollout
    whose key another live run holds (None: none), and the last rollout id looked at."""

    free: list[Call]
    held_from: int | None
    last: int | None


def claimable_page(session: Session, scope: Scope, config_id: int, mode: str, fresh: Fresh,
                   after_id: int) -> Page:
    """The pending calls among the next page of rollouts that no live lease or live batch
    holds; keys `fresh` wrote are not pending (read only: claim() checks again)."""
    calls, last = pending_page(session, scope, config_id, mode, after_id, fresh)
    if last is None or not calls:
        return Page([], None, last)
    ids = sorted({c.rollout_id for c in calls})
    now = db_now(session)
    held = live_leases(session, config_id, ids, now)
    batched = live_keys(session, config_id, ids, now)
    others = [rid for (rid, _g), run in held.items() if run != fresh.run_id]
    free = [c for c in calls if (c.rollout_id, c.grader) not in held
            and (c.rollout_id, c.grader) not in batched]
    return Page(free, min(others) if others else None, last)


@dataclass
class Claim:
    """What one claim took, and the first rollout whose key a live run took first (or None)."""

    calls: list[Call]
    taken_from: int | None


def claim(session: Session, holder: int, config_id: int, mode: str, fresh: Fresh,
          calls: Sequence[Call], lease_s: float) -> Claim:
    """In the caller's write transaction: lease to `holder` those of `calls` that are still
    pending and that no live lease or live batch holds."""
    if session.get_bind().dialect.name == "postgresql":  # SQLite's writers queue anyway
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": KEYS_LOCK + config_id})
    now = db_now(session)
    ids = sorted({c.rollout_id for c in calls})
    held = live_leases(session, config_id, ids, now)
    batched = live_keys(session, config_id, ids, now)
    stored = stored_states(session, config_id, ids)
    free = [c for c in calls if (c.rollout_id, c.grader) not in held
            and (c.rollout_id, c.grader) not in batched
            and needs(mode, stored.get((c.rollout_id, c.grader)), fresh)]
    taken = [c.rollout_id for c in calls if (c.rollout_id, c.grader) in held]
    if free:
        # a conflicting row is a dead lease (live ones were left out above): take it over
        stmt = dialect_insert(session, JudgeLease)
        stmt = stmt.on_conflict_do_update(
            index_elements=["rollout_id", "grader", "judge_config_id"],
            set_={c: stmt.excluded[c] for c in ("stage_run_id", "claimed_at", "expires_at")})
        expires = now + timedelta(seconds=lease_s)
        session.execute(stmt, [{"rollout_id": c.rollout_id, "grader": c.grader,
                                "judge_config_id": config_id, "stage_run_id": holder,
                                "claimed_at": now, "expires_at": expires} for c in free])
    return Claim(free, min(taken) if taken else None)


def renew(session: Session, holder: int, lease_s: float) -> int:
    """Push the expiry of every lease `holder` has forward; how many it has."""
    expires = db_now(session) + timedelta(seconds=lease_s)
    result = session.execute(update(JudgeLease).where(JudgeLease.stage_run_id == holder)
                             .values(expires_at=expires), execution_options=_PLAIN)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def release_keys(session: Session, holder: int, config_id: int, keys: Sequence[Key]) -> None:
    """Drop holder's leases on these keys (their judgments are written in this transaction)."""
    if keys:
        session.connection().execute(_RELEASE_KEY, [
            {"holder": holder, "config": config_id, "rollout": rid, "grader": grader}
            for rid, grader in keys])


def release(session: Session, holder: int) -> int:
    """Let go of every key `holder` still holds (its run ends); how many there were."""
    result = session.execute(delete(JudgeLease).where(JudgeLease.stage_run_id == holder),
                             execution_options=_PLAIN)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def running_judge_runs(session: Session) -> frozenset[int]:
    """The judge stage runs that are running now (Fresh.peers of a run starting now)."""
    runs = session.scalars(select(StageRun).where(StageRun.stage == "judge",
                                                  StageRun.status == "running"))
    now = db_now(session)
    return frozenset(run.id for run in runs if effective_status(run, now) == "running")
