"""The asynchronous engine of a judge run: a producer, `concurrency` call slots and a writer.

The producer pages through the pending keys and claims a few at a time under a lease
(claims.py, leases.py), so any number of runs on one store split the keys and pay each call
once; it answers cache hits; the slots keep the calls in flight; finished results go to the
writer thread (writer.py). A slot makes its next call only once its last reply is committed, so
a kill re-pays at most the calls in flight, and a failed write stops the run at once. Without
--follow the run ends once no key in its scope is pending or held by another live run; with it,
once a generate run of the sweep has ended (or none started within --follow-wait while rollouts
were still missing). Ctrl-C stops taking work, waits `grace_s` for calls in flight, keeps what
finished and lets the unsent keys go; a fatal API error stops at once.
"""

import asyncio
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.exc import DatabaseError

from patchdb.errors import StoreError
from patchdb.faults import fault_point
from patchdb.judge import cache as judge_cache
from patchdb.judge.claims import Work, WorkSource
from patchdb.judge.client import FatalJudgeError, Reply
from patchdb.judge.leases import running_judge_runs
from patchdb.judge.logprobs import LOGPROBS, verdict_of
from patchdb.judge.plan import Fresh, Scope, count_pending
from patchdb.judge.producer import Producer
from patchdb.judge.progress import judge_progress
from patchdb.judge.settings import JudgeOptions, Resolved
from patchdb.judge.templates import Templates
from patchdb.judge.verdict import last_word_verdict
from patchdb.judge.writer import JudgmentWriter, Row
from patchdb.store.store import Store, describe_db_error


class Backend(Protocol):
    """A judge: `judge` answers a batch of prompts in order. A backend that can stop a batch
    midway (the in-process one) has `abort()`; its replies unfinished then are None."""

    batch_size: int

    async def judge(self, prompts: list[str], slot: int = 0) -> Sequence[Reply | None]: ...

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
    # "limit", "max_cost", "interrupted", "write_failed" or "no_generate" (--follow waited
    # --follow-wait seconds for a generate run to start)
    stopped: str | None = None
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


class Runner:
    """One asynchronous judge run: producer, workers, writer."""

    def __init__(
        self, store: Store, sweep_id: int, question: str, scope: Scope, resolved: Resolved,
        templates: Templates, options: JudgeOptions, backend: Backend, config_id: int,
        stage_run_id: int, awaited: Callable[[], int] = lambda: 0,
    ) -> None:
        self.store, self.sweep_id, self.question = store, sweep_id, question
        self.scope, self.resolved, self.templates = scope, resolved, templates
        self.options, self.backend = options, backend
        self.awaited = awaited  # --follow: calls whose rollouts generate has not written yet
        self.summary = JudgeSummary(judge_config_id=config_id, stage_run_id=stage_run_id)
        self.fatal: FatalJudgeError | None = None
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._last_postfix = 0.0
        self._in_flight = 0  # batches handed to the backend whose replies are not recorded

    # --- doing work -------------------------------------------------------------------------

    async def _work(self, queue: asyncio.Queue[Work | None], slot: int) -> None:
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
            if self.writer.error is not None:
                continue  # the store refused a write: make no call whose reply cannot be kept
            self._in_flight += 1
            self._idle.clear()
            number = 0
            try:
                replies = await self.backend.judge([w.prompt for w in batch], slot)
                for w, reply in zip(batch, replies, strict=True):
                    if reply is not None:  # None: stopped before it finished; its key goes free
                        number = self._record(w, reply)
            except FatalJudgeError as exc:
                if self.fatal is None:
                    self.fatal = exc
                self.stop.set()
                self.fatal_event.set()
                continue
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
            await self._stored(number)

    async def _stored(self, number: int) -> None:
        """Wait until the writer has committed row `number` (or has failed): a slot makes its
        next call only once its last reply is stored, so a kill re-pays only calls in flight."""
        if self.writer.written >= number or self.writer.error is not None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((number, done))
        await done

    def _on_written(self) -> None:
        """On the loop, after each commit or failure of the writer thread."""
        writer = self.writer
        while self._waiting and (writer.error is not None or self._waiting[0][0] <= writer.written):
            _number, done = self._waiting.popleft()
            if not done.done():
                done.set_result(None)
        if self.writer.error is not None and self.summary.stopped != "write_failed":
            self.summary.stopped = "write_failed"
            self.stop.set()
            self.fatal_event.set()  # replies in flight could not be kept either

    def _write_failure(self, exc: StoreError | DatabaseError) -> StoreError:
        """The one line a failed judgment write ends the run with."""
        cause = describe_db_error(self.store.where, exc) if isinstance(exc, DatabaseError) else exc
        return StoreError(f"writing judgments failed, so the judge stopped ({cause}); "
                          f"{self.writer.written} judgments were saved; run again to resume")

    def _record(self, w: Work, reply: Reply) -> int:
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
        number = self.writer.put(Row({
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
        return number

    def _record_cached(self, w: Work) -> None:
        self._record(w, judge_cache.cached_reply(w.cached or ""))

    def _stopping(self, reason: str) -> None:
        self.summary.stopped = self.summary.stopped or reason
        self.stop.set()

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

        in_process = hasattr(self.backend, "abort")  # its batch stops at the next token
        if self.stop.is_set() and self.summary.stopped == "interrupted":
            if not self.fatal_event.is_set():
                tqdm.write("Ctrl-C again: stopping the batch at its next token; every finished "
                           "reply is saved." if in_process else
                           "Ctrl-C again: stopping now; what finished is saved.", file=sys.stderr)
            self.fatal_event.set()  # a second Ctrl-C: stop waiting for calls in flight
            return
        grace = f"{self.options.grace_s:g} s"
        tqdm.write(f"Ctrl-C: no new batches; the batch in flight gets up to {grace}, then stops "
                   "at its next token; every finished reply is saved. Press Ctrl-C again to "
                   "stop now." if in_process else
                   f"Ctrl-C: no new calls; waiting up to {grace} for the calls in flight, and "
                   "what finished is saved. Press Ctrl-C again to stop now.", file=sys.stderr)
        self.summary.stopped = "interrupted"
        self.stop.set()

    async def run(self) -> JudgeSummary:
        started = time.monotonic()
        self.stop = asyncio.Event()
        self.fatal_event = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        total = await asyncio.to_thread(self._count)
        self.summary.pending_at_start = total
        if self.options.limit is not None:
            total = min(total, self.options.limit)
        self.bar: Any = judge_progress(total, self.options.progress, lambda: self.summary.cost)
        run_id = self.summary.stage_run_id
        fresh = Fresh(run_id, await asyncio.to_thread(self._peers))
        self.source = WorkSource(self.store, self.scope, self.summary.judge_config_id,
                                 self.options.mode, fresh, self.options.lease_s, self.templates,
                                 self.question, self.resolved, self.options.cache)
        self.writer = JudgmentWriter(
            self.store, replace=self.options.mode != "only_missing",
            batch=self.options.write_batch,
            notify=lambda: loop.call_soon_threadsafe(self._on_written), lease_holder=run_id)
        n_workers = self.resolved.concurrency if self.backend.batch_size == 1 else 1
        # a claim a few rounds of calls deep: the slots never wait for one, and a peer finds
        # few keys held when it looks
        producer = Producer(self.source, self.store, self.sweep_id, self.options, self.stop,
                            self._record_cached, self._stopping, self.bar, self.awaited,
                            claim_size=max(16, 4 * n_workers * self.backend.batch_size))
        queue: asyncio.Queue[Work | None] = asyncio.Queue(
            maxsize=2 * n_workers * self.backend.batch_size)
        tasks = [asyncio.create_task(producer.run(queue, n_workers))]
        tasks += [asyncio.create_task(self._work(queue, slot)) for slot in range(n_workers)]
        everything = asyncio.gather(*tasks)
        renewer = asyncio.create_task(self._renew())
        try:
            await self._wait(everything)
        finally:
            renewer.cancel()
            await self.backend.close()
            try:
                await asyncio.to_thread(self.writer.close)  # Ctrl-C here still only sets a flag
            except (StoreError, DatabaseError) as exc:  # anything else is a bug: show it whole
                raise self._write_failure(exc) from None
            finally:
                await asyncio.to_thread(self._let_go)
                if producer.no_generate and self.summary.stopped is None:
                    self.summary.stopped = "no_generate"
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
            abort = getattr(self.backend, "abort", None)
            if not everything.done() and abort is not None:
                # an in-process judge stops its batch at the next decode step and hands back
                # the replies that finished: wait for them rather than drop them, and so that
                # no generation thread outlives the run
                abort()
                await self._idle.wait()
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

    async def _renew(self) -> None:
        """Keep this run's leases alive while it works."""
        while True:
            await asyncio.sleep(self.options.lease_s / 3)
            try:
                await asyncio.to_thread(self.source.renew)
            except (StoreError, DatabaseError):
                pass  # the writer reports a failing store; a lease not renewed just expires

    def _let_go(self) -> None:
        """Release the keys this run claimed and did not write (stopped early, or a failed
        write); if the store refuses, they come free when the run is seen to have ended."""
        try:
            self.source.release()
        except (StoreError, DatabaseError):
            pass

    def _peers(self) -> frozenset[int]:
        with self.store.read() as session:
            return running_judge_runs(session)

    def _count(self) -> int:
        with self.store.read() as session:
            return count_pending(session, self.scope, self.summary.judge_config_id,
                                 self.options.mode)
