"""The asynchronous engine of a judge run: a producer, `concurrency` workers and a writer.

The producer pages through pending calls (plan.py) in a thread, renders the grader prompts and
answers cache hits; workers keep the calls in flight; finished results go to the writer thread
(writer.py). Ctrl-C stops taking work, waits `grace_s` for calls in flight, and keeps what
finished; a fatal API error stops at once. No call starts while a batch of results is still
unwritten, and a failed write stops the run at once: a store that cannot take the results never
lets the run spend more than one batch (plus the calls in flight) on replies it cannot keep.
"""

import asyncio
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.exc import DatabaseError

from patchdb.errors import StoreError
from patchdb.faults import fault_point
from patchdb.judge import cache as judge_cache
from patchdb.judge.client import FatalJudgeError, Reply
from patchdb.judge.logprobs import LOGPROBS, verdict_of
from patchdb.judge.plan import Call, Scope, count_pending, pending_page
from patchdb.judge.settings import JudgeOptions, Resolved
from patchdb.judge.templates import Templates
from patchdb.judge.verdict import last_word_verdict
from patchdb.judge.writer import JudgmentWriter, Row
from patchdb.store.models import StageRun
from patchdb.store.runs import is_running
from patchdb.store.store import Store, describe_db_error


class Backend(Protocol):
    batch_size: int

    async def judge(self, prompts: list[str], slot: int = 0) -> list[Reply]: ...

    async def close(self) -> None: ...


@dataclass
class JudgeSummary:
    """What a run did."""

    judge_config_id: int = 0
    stage_run_id: int = 0
    pending_at_start: int = 0
    calls: int = 0
    yes: int = 0
    no: int = 0
    unparsed: int = 0
    errors: int = 0
    cached: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0
    elapsed_s: float = 0.0
    stopped: str | None = None  # "limit", "max_cost", "interrupted" or "write_failed"
    nothing_pending: bool = False  # nothing to judge: no backend was loaded, no call made
    sweep_name: str = ""
    calls_in_scope: int = 0  # set when nothing_pending: every call the scope holds

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s > 0 else 0.0


class JudgeInterrupted(KeyboardInterrupt):
    """Ctrl-C: finished results were written; carries the summary for the CLI."""

    def __init__(self, summary: JudgeSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary


@dataclass
class _Work:
    call: Call
    prompt: str
    request_hash: str | None
    cached: str | None


def generate_running(store: Store, sweep_id: int) -> bool:
    """Whether the latest generate stage run of the sweep is still running."""
    with store.read() as session:
        run_id = session.scalar(
            select(StageRun.id).where(StageRun.stage == "generate", StageRun.sweep_id == sweep_id)
            .order_by(StageRun.id.desc()).limit(1)
        )
    return run_id is not None and is_running(store, run_id)


class Runner:
    """One asynchronous judge run: producer, workers, writer."""

    def __init__(
        self, store: Store, sweep_id: int, question: str, scope: Scope, resolved: Resolved,
        templates: Templates, options: JudgeOptions, backend: Backend, config_id: int,
        stage_run_id: int,
    ) -> None:
        self.store, self.sweep_id, self.question = store, sweep_id, question
        self.scope, self.resolved, self.templates = scope, resolved, templates
        self.options, self.backend = options, backend
        self.summary = JudgeSummary(judge_config_id=config_id, stage_run_id=stage_run_id)
        self.fatal: FatalJudgeError | None = None
        self.handed_out = 0
        self._last_postfix = 0.0

    # --- producing work ---------------------------------------------------------------------

    def _page(self, after_id: int, skip: set[tuple[int, str]] | None) -> tuple[
        list[_Work], int | None
    ]:
        """Runs in a thread: the next page of pending calls, rendered and cache-checked."""
        with self.store.read() as session:
            calls, last = pending_page(session, self.scope, self.summary.judge_config_id,
                                       self.options.mode, after_id, skip)
            work = []
            for call in calls:
                prompt = self.templates.render(call.grader, self.question, call.answer, call.word)
                digest = None
                if self.options.cache:
                    digest = judge_cache.request_hash(
                        self.resolved.backend, self.resolved.model, self.resolved.reasoning, prompt,
                        self.resolved.verdict,
                    )
                work.append(_Work(call, prompt, digest, None))
            if self.options.cache and work:
                hits = judge_cache.lookup(session, [w.request_hash or "" for w in work])
                for w in work:
                    w.cached = hits.get(w.request_hash or "")
        return work, last

    async def _produce(self, queue: asyncio.Queue[_Work | None], n_workers: int) -> None:
        follow = self.options.follow
        skip: set[tuple[int, str]] | None = set() if follow else None
        try:
            while not self.stop.is_set():
                gen_running = follow and await asyncio.to_thread(
                    generate_running, self.store, self.sweep_id)
                found, after = 0, 0
                while not self.stop.is_set():
                    work, last = await asyncio.to_thread(self._page, after, skip)
                    if last is None:
                        break
                    after = last
                    found += len(work)
                    if await self._feed(queue, work, skip):
                        break
                if not follow or self.stop.is_set() or (found == 0 and not gen_running):
                    break
                if found and self.bar is not None and self.pass_no > 0:
                    self.bar.total = (self.bar.total or 0) + found
                    self.bar.refresh()
                self.pass_no += 1
                if found == 0:
                    try:
                        await asyncio.wait_for(self.stop.wait(), self.options.poll_s)
                    except TimeoutError:
                        pass
        finally:
            for _ in range(n_workers):
                await queue.put(None)

    async def _feed(self, queue: asyncio.Queue[_Work | None], work: list[_Work],
                    skip: set[tuple[int, str]] | None) -> bool:
        """Queue a page of work; True once the limit is reached or the run is stopping."""
        for w in work:
            if self.stop.is_set():
                return True
            if self.options.limit is not None and self.handed_out >= self.options.limit:
                self.summary.stopped = self.summary.stopped or "limit"
                self.stop.set()
                return True
            self.handed_out += 1
            if skip is not None:
                skip.add((w.call.rollout_id, w.call.grader))
            if w.cached is not None:
                self._record(w, judge_cache.cached_reply(w.cached))
            else:
                await queue.put(w)
        return False

    # --- doing work -------------------------------------------------------------------------

    async def _work(self, queue: asyncio.Queue[_Work | None], slot: int) -> None:
        batch_size = self.backend.batch_size
        while True:
            item = await queue.get()
            if item is None:
                return
            if self.stop.is_set() and self.summary.stopped != "limit":
                continue  # stopping: drop queued work, keep draining so the producer ends
            batch = [item]
            while len(batch) < batch_size and not queue.empty():
                nxt = queue.get_nowait()
                if nxt is None:
                    queue.put_nowait(None)
                    break
                batch.append(nxt)
            if not await self._room_to_write():
                continue  # the store refused a write: make no call whose reply cannot be kept
            try:
                replies = await self.backend.judge([w.prompt for w in batch], slot)
            except FatalJudgeError as exc:
                if self.fatal is None:
                    self.fatal = exc
                self.stop.set()
                self.fatal_event.set()
                continue
            for w, reply in zip(batch, replies, strict=True):
                self._record(w, reply)

    async def _room_to_write(self) -> bool:
        """Wait while a whole batch of results is unwritten; False once a write has failed."""
        writer = self.writer
        while writer.error is None and writer.backlog >= writer.batch:
            self._written.clear()
            writer.flush_soon()
            await self._written.wait()
        return writer.error is None

    def _on_written(self) -> None:
        """On the loop, after each commit or failure of the writer thread."""
        self._written.set()
        if self.writer.error is not None and self.summary.stopped != "write_failed":
            self.summary.stopped = "write_failed"
            self.stop.set()
            self.fatal_event.set()  # replies in flight could not be kept either

    def _write_failure(self, exc: StoreError | DatabaseError) -> StoreError:
        """The one line a failed judgment write ends the run with."""
        cause = describe_db_error(self.store.where, exc) if isinstance(exc, DatabaseError) else exc
        return StoreError(f"writing judgments failed, so the judge stopped ({cause}); "
                          f"{self.writer.written} judgments were saved; run again to resume")

    def _record(self, w: _Work, reply: Reply) -> None:
        if self.resolved.verdict == LOGPROBS:  # read after the reasoning, finished or cut off
            finished = reply.error is None and reply.p_yes is not None
            verdict = verdict_of(reply.p_yes) if finished else None
        else:
            finished = reply.error is None and reply.finish_reason == "stop"
            # a reply still cut off after its last attempt is read too, as the original did
            verdict, reply.error = last_word_verdict(reply.text, reply.finish_reason, reply.error)
        s = self.summary
        s.calls += 1
        s.cached += reply.cached
        s.failures.update(reply.failures)
        if reply.error is not None:
            s.errors += 1
        elif verdict is None:
            s.unparsed += 1
        elif verdict:
            s.yes += 1
        else:
            s.no += 1
        s.prompt_tokens += reply.prompt_tokens or 0
        s.completion_tokens += reply.completion_tokens or 0
        s.reasoning_tokens += reply.reasoning_tokens or 0
        s.cost += reply.cost or 0.0
        cache = None
        if w.request_hash is not None and finished and not reply.cached:
            cache = (w.request_hash, judge_cache.reply_json(reply))
        self.writer.put(Row({
            "rollout_id": w.call.rollout_id, "grader": w.call.grader,
            "judge_config_id": s.judge_config_id, "verdict": verdict, "raw_reply": reply.text,
            "p_yes": reply.p_yes, "cut_off": reply.finish_reason == "length",
            "error": reply.error, "attempts": reply.attempts,
            "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "reasoning_tokens": reply.reasoning_tokens, "cost": reply.cost,
            "latency_s": reply.latency_s, "stage_run_id": s.stage_run_id,
        }, cache))
        fault_point("judge.reply")
        if self.options.max_cost is not None and s.cost >= self.options.max_cost:
            if not self.stop.is_set():
                s.stopped = "max_cost"
                self.stop.set()
        if self.bar is not None:
            self.bar.update(1)
            now = time.monotonic()
            if now - self._last_postfix > 0.5:
                self._last_postfix = now
                self.bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        """The bar's running totals, the same figures the summary line ends with."""
        s = self.summary
        return (f"tok={s.prompt_tokens + s.completion_tokens:,} ${s.cost:.4f} "
                f"unparsed={s.unparsed} err={s.errors}")

    # --- the run ----------------------------------------------------------------------------

    def _on_sigint(self) -> None:
        """First Ctrl-C: no new calls, wait up to grace_s for those in flight; second: stop now.
        Each says so at once."""
        from tqdm import tqdm

        if self.stop.is_set() and self.summary.stopped == "interrupted":
            if not self.fatal_event.is_set():
                tqdm.write("Ctrl-C again: stopping now; what finished is saved.", file=sys.stderr)
            self.fatal_event.set()  # a second Ctrl-C: stop waiting for calls in flight
            return
        tqdm.write(f"Ctrl-C: no new calls; waiting up to {self.options.grace_s:g} s for the calls "
                   "in flight, and what finished is saved. Press Ctrl-C again to stop now.",
                   file=sys.stderr)
        self.summary.stopped = "interrupted"
        self.stop.set()

    async def run(self) -> JudgeSummary:
        from tqdm import tqdm

        started = time.monotonic()
        self.stop = asyncio.Event()
        self.fatal_event = asyncio.Event()
        self.pass_no = 0
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        total = await asyncio.to_thread(self._count)
        self.summary.pending_at_start = total
        if self.options.limit is not None:
            total = min(total, self.options.limit)
        self.bar: Any = tqdm(total=total, desc="judge", unit="call", dynamic_ncols=True, leave=True,
                             disable=not self.options.progress or None)
        self._written = asyncio.Event()
        self.writer = JudgmentWriter(
            self.store, replace=self.options.mode != "only_missing",
            batch=self.options.write_batch,
            notify=lambda: loop.call_soon_threadsafe(self._on_written))
        n_workers = self.resolved.concurrency if self.backend.batch_size == 1 else 1
        queue: asyncio.Queue[_Work | None] = asyncio.Queue(
            maxsize=2 * n_workers * self.backend.batch_size)
        tasks = [asyncio.create_task(self._produce(queue, n_workers))]
        tasks += [asyncio.create_task(self._work(queue, slot)) for slot in range(n_workers)]
        everything = asyncio.gather(*tasks)
        try:
            await self._wait(everything)
        finally:
            await self.backend.close()
            try:
                await asyncio.to_thread(self.writer.close)  # Ctrl-C here still only sets a flag
            except (StoreError, DatabaseError) as exc:  # anything else is a bug: show it whole
                raise self._write_failure(exc) from None
            finally:
                self.bar.set_postfix_str(self._postfix(), refresh=False)  # not a stale 0.5 s old one
                self.bar.close()
                self.summary.elapsed_s = time.monotonic() - started
                if threading.current_thread() is threading.main_thread():
                    loop.remove_signal_handler(signal.SIGINT)
        return self.summary

    async def _wait(self, everything: "asyncio.Future[Any]") -> None:
        stopper = asyncio.create_task(self.stop.wait())
        await asyncio.wait({everything, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not everything.done():
            if self.summary.stopped == "interrupted":
                limit = self.options.grace_s
            else:
                limit = None  # limit / max cost: let the calls in flight finish
            hard = asyncio.create_task(self.fatal_event.wait())
            await asyncio.wait({everything, hard}, timeout=limit,
                               return_when=asyncio.FIRST_COMPLETED)
            hard.cancel()
            if not everything.done():
                everything.cancel()
                try:
                    await everything
                except asyncio.CancelledError:
                    pass
        stopper.cancel()
        if everything.done() and not everything.cancelled():
            # a gather cancelled above ends with CancelledError as its exception, not as
            # cancelled(): that is the stop we asked for, not a failure to re-raise
            exc = everything.exception()
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                raise exc

    def _count(self) -> int:
        with self.store.read() as session:
            return count_pending(session, self.scope, self.summary.judge_config_id,
                                 self.options.mode)
