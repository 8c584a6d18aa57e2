"""The life of one judge batch in the store: record, upload, create, follow, collect.

Each step is written to judge_batches as soon as it happened, so a process killed anywhere
leaves a row the next run can take up. A batch with no input file id holds no key once its run
stopped: an upload that fails drops the batch at once, and a batch a killed run left unsent is
dropped by the next run at any URL (batch_plan.stranded), its keys sent again in a new batch.
One with an input file but no provider batch id is first taken over by one run only (a
compare-and-set of its stage run: two reruns that find it at once do not both go on), then
looked for among the provider's batches by that file, and only created when none is found, so
a batch is never started twice;
one with a provider id is looked up and, once it ended, collected. A batch another running run
is sending is left to it. Collecting writes the judgments in chunks under their unique key and
marks the batch collected last, so a collection cut short is simply run again.
"""

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, text, update

from patchdb.faults import fault_point
from patchdb.judge.batch_client import BatchApi, BatchInfo
from patchdb.judge.batch_collect import NO_RESULT, Prices, error_values, read_results, write_rows
from patchdb.judge.batch_plan import (
    Key,
    call_line,
    live_keys,
    reasoning_options,
    stranded,
)
from patchdb.judge.leases import KEYS_LOCK, live_leases
from patchdb.judge.plan import Call, Fresh, needs, stored_states
from patchdb.judge.templates import Templates
from patchdb.store.models import JudgeBatch, JudgeBatchKey, utcnow
from patchdb.store.runs import db_now, is_running
from patchdb.store.store import Store

WRITE_CHUNK = 1000  # judgments per transaction while collecting


@dataclass
class BatchSummary:
    """What a batch run did: batches submitted and collected, and the judgments written."""

    submitted: int = 0
    submitted_calls: int = 0
    collected: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)  # yes, no, unparsed, errors, cut_off
    not_run: int = 0  # keys of expired or cancelled batches that never ran: sent again later
    unknown_lines: int = 0
    cost: float = 0.0
    cost_known: bool = True
    failures: list[str] = field(default_factory=list)  # batches that failed validation
    stopped: str | None = None
    live: int = 0  # batches still live when the run ended


@dataclass
class BatchContext:
    """Everything the steps of a batch need: where, under which judge config, how to render."""

    store: Store
    api: BatchApi
    config_id: int
    sweep_id: int
    stage_run_id: int
    templates: Templates
    question: str
    model: str
    reasoning: str
    base_url: str  # as stored: no password
    prices: Prices
    echo: Callable[[str], None]
    summary: BatchSummary = field(default_factory=BatchSummary)
    # the judge runs running when this one started: keys they wrote are this round's (Fresh)
    peers: frozenset[int] = frozenset()

    def line(self, call: Call) -> bytes:
        return call_line(self.templates, self.question, self.model,
                         reasoning_options(self.api.endpoint.base_url, self.reasoning), call,
                         self.config_id)

    def _set(self, batch_id: int, **values: Any) -> None:
        self.store.transact(lambda s: s.execute(
            update(JudgeBatch).where(JudgeBatch.id == batch_id).values(**values)))

    # --- submitting -------------------------------------------------------------------------

    def record(self, calls: list[Call], mode: str = "only_missing") -> tuple[
        int | None, list[Call]
    ]:
        """Write the batch row and its keys before anything leaves this machine: the id and
        the calls it holds, leaving out keys another run put into a live batch or a live
        judge worker claimed meanwhile, and keys no longer pending in `mode` (judged meanwhile,
        or, retrying or overwriting, judged by a run of this round: plan.needs, the rule
        workers claim by), checked in the same write transaction under the lock workers claim
        under; None when none is left."""
        def add(session: Any) -> tuple[int | None, list[Call]]:
            if session.get_bind().dialect.name == "postgresql":  # SQLite writers queue anyway
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                {"key": KEYS_LOCK + self.config_id})
            rollout_ids = sorted({c.rollout_id for c in calls})
            now = db_now(session)
            held = live_keys(session, self.config_id, rollout_ids, now)
            held |= set(live_leases(session, self.config_id, rollout_ids, now))
            stored = stored_states(session, self.config_id, rollout_ids)
            fresh = Fresh(self.stage_run_id, self.peers)
            kept = [c for c in calls if (c.rollout_id, c.grader) not in held
                    and needs(mode, stored.get((c.rollout_id, c.grader)), fresh)]
            if not kept:
                return None, []
            batch = JudgeBatch(judge_config_id=self.config_id, sweep_id=self.sweep_id,
                               base_url=self.base_url, state="preparing", requests=len(kept),
                               stage_run_id=self.stage_run_id)
            session.add(batch)
            session.flush()
            session.execute(insert(JudgeBatchKey), [
                {"batch_id": batch.id, "rollout_id": c.rollout_id, "grader": c.grader,
                 "judge_config_id": self.config_id} for c in kept])
            return int(batch.id), kept

        return self.store.transact(add)

    def send(self, batch: JudgeBatch, data: bytes | None = None) -> None:
        """Finish submitting a recorded batch: upload its file (`data`) and create it, or adopt
        the batch a killed run created on the same file. An upload that fails drops the batch,
        so its keys are free at once: no batch can run on a file that was never recorded."""
        found: BatchInfo | None = None
        file_id = batch.input_file_id
        if file_id is None:
            assert data is not None, "a batch with no input file is sent by the run that made it"
            try:
                file_id = self.api.upload(data, f"patchdb-batch-{batch.id}.jsonl")
            except BaseException:
                with contextlib.suppress(Exception):  # else the next run drops it (stranded)
                    self.drop(batch.id)
                raise
            fault_point("judge.batch_uploaded")
            self._set(batch.id, input_file_id=file_id, state="uploaded")
        else:
            found = self.api.find(file_id)
        if found is None:
            found = self.api.create(file_id, {"patchdb_batch": str(batch.id),
                                              "judge_config": str(self.config_id)})
            fault_point("judge.batch_created")
        self._set(batch.id, provider_batch_id=found.id, state=found.status,
                  submitted_at=utcnow())
        self.echo(f"Batch #{batch.id} submitted as {found.id}: {batch.requests:,} requests.")

    def drop(self, batch_id: int) -> None:
        """Delete a batch that never reached the provider, and with it the keys it held."""
        def remove(session: Any) -> None:
            if session.scalar(select(JudgeBatch.id).where(
                    JudgeBatch.id == batch_id, JudgeBatch.provider_batch_id.is_(None))) is None:
                return  # created after all, or dropped by another run
            session.execute(delete(JudgeBatchKey).where(JudgeBatchKey.batch_id == batch_id))
            session.execute(delete(JudgeBatch).where(JudgeBatch.id == batch_id))

        self.store.transact(remove)

    def drop_stranded(self) -> None:
        """Drop this sweep's batches of this judge config, sent to any URL, that a run which
        stopped left without an input file id (batch_plan.stranded)."""
        with self.store.read() as session:
            ids = stranded(session, self.config_id, self.sweep_id)
            rows = [session.get(JudgeBatch, i) for i in ids]
            found = [(b.id, b.base_url, b.requests) for b in rows if b is not None]
        for batch_id, base_url, requests in found:
            self.drop(batch_id)
            self.echo(f"Batch #{batch_id} was never uploaded to {base_url} (its run stopped "
                      f"first): dropped, its {requests:,} requests are free to send again.")

    def take_over(self, batch: JudgeBatch) -> bool:
        """Become the run that finishes sending a batch a stopped run left half sent (its file
        uploaded, no provider batch recorded): set the batch's run from the stopped one to this
        one in one write, only if no other run did so first (or created or dropped it
        meanwhile). Two runs that both found it stopped would each look for a provider batch
        on its file, find none, and both create one: every request paid twice. Returns whether
        this run holds it now."""
        if batch.stage_run_id == self.stage_run_id:
            return True
        holder = batch.stage_run_id

        def swap(session: Any) -> bool:
            found = session.execute(update(JudgeBatch).where(
                JudgeBatch.id == batch.id, JudgeBatch.provider_batch_id.is_(None),
                JudgeBatch.stage_run_id.is_(None) if holder is None
                else JudgeBatch.stage_run_id == holder,
            ).values(stage_run_id=self.stage_run_id))
            return bool(found.rowcount == 1)

        if not self.store.transact(swap):
            return False
        batch.stage_run_id = self.stage_run_id
        return True

    def sent_by_another_run(self, batch: JudgeBatch) -> bool:
        """Whether another run that is still running is submitting this batch."""
        run_id = batch.stage_run_id
        return run_id is not None and run_id != self.stage_run_id and is_running(self.store,
                                                                                 run_id)

    # --- following and collecting -----------------------------------------------------------

    def live(self) -> list[JudgeBatch]:
        """This sweep's live batches of this judge config at this API (those sent elsewhere
        keep their keys held and are followed by a run pointed at their API)."""
        with self.store.read() as session:
            rows = session.scalars(select(JudgeBatch).where(
                JudgeBatch.judge_config_id == self.config_id, JudgeBatch.collected_at.is_(None),
                JudgeBatch.sweep_id == self.sweep_id, JudgeBatch.base_url == self.base_url)
                .order_by(JudgeBatch.id)).all()
            session.expunge_all()
        return list(rows)

    def live_elsewhere(self) -> list[str]:
        """The APIs other live batches of this judge config were sent to."""
        with self.store.read() as session:
            return sorted(set(session.scalars(select(JudgeBatch.base_url).where(
                JudgeBatch.judge_config_id == self.config_id, JudgeBatch.collected_at.is_(None),
                JudgeBatch.sweep_id == self.sweep_id, JudgeBatch.base_url != self.base_url))))

    def advance(self, submit: bool = True) -> int:
        """Take every live batch of this judge config one step: finish the submission a
        stopped run left half done (when `submit`), look it up, collect it once it ended.
        Returns how many stay live, not counting those another running run is still sending."""
        self.drop_stranded()
        left = 0
        for batch in self.live():
            if batch.provider_batch_id is None:
                if batch.input_file_id is None or self.sent_by_another_run(batch):
                    continue  # that run finishes it
                if not submit:
                    left += 1
                    continue
                if not self.take_over(batch):
                    continue  # another run took it over first: it finishes it
                self.send(batch)
                batch = self.reload(batch.id)
            assert batch.provider_batch_id is not None
            info = self.api.retrieve(batch.provider_batch_id)
            if info.status != batch.state:
                self.echo(f"Batch #{batch.id} ({info.id}): {info.status}"
                          + (f", {info.completed or 0:,}/{info.total:,} done"
                             if info.total else "") + ".")
            self._set(batch.id, state=info.status, completed=info.completed, failed=info.failed,
                      output_file_id=info.output_file_id, error_file_id=info.error_file_id,
                      ended_at=batch.ended_at or (utcnow() if info.ended else None))
            if info.ended:
                self.collect(batch, info)
            else:
                left += 1
        return left

    def reload(self, batch_id: int) -> JudgeBatch:
        with self.store.read() as session:
            batch = session.get(JudgeBatch, batch_id)
            assert batch is not None
            session.expunge(batch)
        return batch

    def cancel(self) -> None:
        """Cancel this API's live batches. A batch with no input file calls no API (a stopped
        run's was dropped already; one a running run is sending is left to it); one uploaded
        by a run that stopped before recording its batch is looked for by that file, then
        cancelled, or dropped when the provider has no batch on it."""
        for batch in self.live():
            provider_id = batch.provider_batch_id
            if provider_id is None:
                if batch.input_file_id is None or self.sent_by_another_run(batch):
                    self.echo(f"Batch #{batch.id} is being sent by stage run "
                              f"#{batch.stage_run_id}; left to it.")
                    continue
                if not self.take_over(batch):
                    self.echo(f"Batch #{batch.id} was taken over by another stage run "
                              "meanwhile; left to it.")
                    continue
                found = self.api.find(batch.input_file_id)
                if found is None:
                    self.drop(batch.id)
                    self.echo(f"Batch #{batch.id} was never created at {batch.base_url}: "
                              f"dropped, its {batch.requests:,} requests are free to send "
                              "again.")
                    continue
                self._set(batch.id, provider_batch_id=found.id, state=found.status,
                          submitted_at=utcnow())
                provider_id = found.id
            info = self.api.cancel(provider_id)
            self._set(batch.id, state=info.status)
            self.echo(f"Batch #{batch.id} ({info.id}): {info.status}.")

    def collect(self, batch: JudgeBatch, info: BatchInfo) -> None:
        """Write an ended batch's results as judgments, then mark it collected."""
        s = self.summary
        if info.status == "failed":
            message = (f"batch #{batch.id} ({info.id}) failed validation: "
                       f"{info.first_error or 'no reason given'}")
            s.failures.append(message)
            self._set(batch.id, error=message, collected_at=utcnow())
            return
        files = []
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id:
                files.append(self.api.content(file_id))
                fault_point("judge.batch_collected_file")
        with self.store.read() as session:
            keys: set[Key] = {(rid, grader) for rid, grader in session.execute(
                select(JudgeBatchKey.rollout_id, JudgeBatchKey.grader)
                .where(JudgeBatchKey.batch_id == batch.id))}
        outcome = read_results(files, keys, self.config_id, self.prices)
        if info.status == "completed":
            for key in keys - outcome.rows.keys() - outcome.not_run:
                outcome.rows[key] = error_values(NO_RESULT)
        rows = sorted(outcome.rows.items())
        for start in range(0, len(rows), WRITE_CHUNK):
            chunk = rows[start:start + WRITE_CHUNK]
            self.store.transact(lambda session, chunk=chunk: write_rows(  # type: ignore[misc]
                session, chunk, self.config_id, self.stage_run_id))
            fault_point("judge.batch_collect_chunk")
        costs = [v["cost"] for v in outcome.rows.values() if v["cost"] is not None]
        cost = sum(costs) if costs else None
        self._set(batch.id, cost=cost, collected_at=utcnow())
        s.collected += 1
        s.not_run += len(keys - outcome.rows.keys())
        s.unknown_lines += outcome.unknown_lines
        for v in outcome.rows.values():
            s.verdicts["cut_off"] += bool(v["cut_off"])
            s.verdicts["errors" if v["error"] else "unparsed" if v["verdict"] is None
                       else "yes" if v["verdict"] else "no"] += 1
        s.cost += cost or 0.0
        s.cost_known = s.cost_known and (cost is not None or not outcome.rows)
        self.echo(f"Batch #{batch.id} ({info.id}) {info.status}: {len(outcome.rows):,} "
                  f"judgments written" + (f", {len(keys - outcome.rows.keys()):,} requests "
                                          "never ran and will be sent again"
                                          if keys - outcome.rows.keys() else "") + ".")
