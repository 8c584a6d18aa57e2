"""The producer of a judge run: passes over the pending keys, claiming a few at a time
(claims.py) and queueing them for the call slots, and the rule for when a run is done.

Without --follow a run is done once no key of its scope is pending or held by another live run
(a key a dead run held comes free, so the last worker standing finishes it). With --follow it
is done once nothing is pending and no generate run of the sweep is running, except that a
--follow started before generate has written any rollout of its scope waits up to
--follow-wait seconds for a generate run to start (generate loads its model before it
records its run).
"""

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from patchdb.judge.claims import Work, WorkSource
from patchdb.judge.settings import JudgeOptions
from patchdb.store.models import StageRun
from patchdb.store.runs import is_running
from patchdb.store.store import Store


@dataclass(frozen=True)
class GenerateState:
    """The sweep's latest generate run (None: there is none) and whether it is running."""

    run_id: int | None
    running: bool


def latest_generate(store: Store, sweep_id: int) -> GenerateState:
    with store.read() as session:
        run_id = session.scalar(
            select(StageRun.id).where(StageRun.stage == "generate", StageRun.sweep_id == sweep_id)
            .order_by(StageRun.id.desc()).limit(1)
        )
    return GenerateState(run_id, run_id is not None and is_running(store, run_id))


def generate_running(store: Store, sweep_id: int) -> bool:
    """Whether the latest generate stage run of the sweep is still running."""
    return latest_generate(store, sweep_id).running


def _least(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass
class Pass:
    """What one pass over the pages found: keys claimed, the first rollout claimed, and the
    first rollout whose key another live run holds."""

    claimed: int = 0
    first: int | None = None
    held: int | None = None


class Producer:
    """Claims work for one run and queues it. `record` answers a cached reply at once;
    `stopping("limit")` ends the run at --limit."""

    def __init__(self, source: WorkSource, store: Store, sweep_id: int, options: JudgeOptions,
                 stop: asyncio.Event, record: Callable[[Work], object],
                 stopping: Callable[[str], None], bar: Any, awaited: Callable[[], int],
                 claim_size: int) -> None:
        self.source, self.store, self.sweep_id, self.options = source, store, sweep_id, options
        self.stop, self.record, self.stopping = stop, record, stopping
        self.bar, self.awaited, self.claim_size = bar, awaited, claim_size
        self.handed_out = 0
        self.no_generate = False  # --follow waited --follow-wait seconds for a generate run
        self._announced = False

    async def run(self, queue: asyncio.Queue[Work | None], n_slots: int) -> None:
        try:
            await self._passes(queue)
        finally:
            for _ in range(n_slots):
                await queue.put(None)

    async def _passes(self, queue: asyncio.Queue[Work | None]) -> None:
        follow, started, seen_generate, after, n = self.options.follow, time.monotonic(), False, 0, 0
        at_start = ((await asyncio.to_thread(latest_generate, self.store, self.sweep_id)).run_id
                    if follow else None)
        while not self.stop.is_set():
            generate = (await asyncio.to_thread(latest_generate, self.store, self.sweep_id)
                        if follow else GenerateState(None, False))
            seen_generate = seen_generate or generate.running or generate.run_id != at_start
            found = await self._pass(queue, after)
            if self.stop.is_set():
                return
            if follow and found.claimed and self.bar is not None and n > 0:
                self.bar.total = (self.bar.total or 0) + found.claimed
                self.bar.refresh()
            n += 1
            # without --follow no rollout is added: look again only where keys may come free
            least = _least(found.first, found.held)
            after = 0 if follow or least is None else least - 1
            if found.claimed:
                continue
            if found.held is None:
                if not follow:
                    return
                if not generate.running and not await self._await_generate(started,
                                                                           seen_generate):
                    return
            # keys another live run holds come free within one of its calls: look again soon
            pause = self.options.poll_s if found.held is None else min(self.options.poll_s, 0.5)
            try:
                await asyncio.wait_for(self.stop.wait(), pause)
            except TimeoutError:
                pass

    async def _await_generate(self, started: float, generate_ran: bool) -> bool:
        """--follow with nothing pending and no generate running: whether to keep waiting
        (no rollout of the scope is written and no generate run has run since this started)."""
        if generate_ran:
            return False
        awaited = await asyncio.to_thread(self.awaited)
        if awaited == 0:
            return False
        wait_s = self.options.follow_wait_s
        if time.monotonic() - started >= wait_s:
            self.no_generate = True
            return False
        if not self._announced:
            from tqdm import tqdm

            self._announced = True
            tqdm.write(f"Waiting for generate: no rollout of the {awaited:,} calls in scope is "
                       f"written yet; following for up to {wait_s:g} s for a generate run of "
                       "the sweep to start (Ctrl-C stops).", file=sys.stderr)
        return True

    async def _pass(self, queue: asyncio.Queue[Work | None], after: int) -> Pass:
        """One pass over the pages after rollout `after`: claim and queue every free key."""
        found = Pass()
        while not self.stop.is_set():
            page = await asyncio.to_thread(self.source.page, after)
            if page.last is None:
                break
            after, found.held, free = page.last, _least(found.held, page.held_from), page.free
            while free and not self.stop.is_set():
                room = self.claim_size
                if self.options.limit is not None:
                    room = min(room, self.options.limit - self.handed_out)
                if room <= 0:
                    self.stopping("limit")
                    break
                work, taken = await asyncio.to_thread(self.source.claim, free[:room])
                free, found.held = free[room:], _least(found.held, taken)
                if work:
                    found.claimed += len(work)
                    found.first = _least(found.first, work[0].call.rollout_id)
                    await self._feed(queue, work)
        return found

    async def _feed(self, queue: asyncio.Queue[Work | None], work: list[Work]) -> None:
        """Queue claimed work; a cached reply is recorded at once."""
        for w in work:
            if self.stop.is_set():
                return  # stopping: the unsent keys are let go when the run ends
            self.handed_out += 1
            if w.cached is not None:
                self.record(w)
            else:
                await queue.put(w)
