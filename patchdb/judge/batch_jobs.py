"""The life of one judge batch in the store: record, upload, create, follow, collect.

Each step is written to judge_batches as soon as it happened, so a process killed anywhere
leaves a row the next run can take up: a batch row with no input file is uploaded again (the
request lines are rebuilt from its keys); one with an input file but no provider batch id is
first looked for among the provider's batches by that file, and only created when none is
found, so a batch is never started twice; one with a provider id is looked up and, once it
ended, collected. Collecting writes the judgments in chunks under their unique key and marks
the batch collected last, so a collection cut short is simply run again.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select, text, update

from patchdb.experiments import judged_word
from patchdb.faults import fault_point
from patchdb.judge.batch_client import BatchApi, BatchInfo
from patchdb.judge.batch_collect import NO_RESULT, Prices, error_values, read_results, write_rows
from patchdb.judge.batch_plan import (
    Key,
    call_line,
    judged_keys,
    live_keys,
    reasoning_options,
)
from patchdb.judge.plan import Call
from patchdb.judge.templates import Templates
from patchdb.store.models import JudgeBatch, JudgeBatchKey, Rollout, utcnow
from patchdb.store.store import Store

WRITE_CHUNK = 1000  # judgments per transaction while collecting
BATCH_LOCK = 18_000_000  # + judge config id: PostgreSQL's advisory lock around recording keys


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
        the calls it holds, leaving out keys another run put into a live batch meanwhile
        (and, looking for missing ones, keys judged meanwhile), checked in the same write
        transaction; None when none is left."""
        def add(session: Any) -> tuple[int | None, list[Call]]:
            if session.get_bind().dialect.name == "postgresql":  # SQLite writers queue anyway
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                {"key": BATCH_LOCK + self.config_id})
            rollout_ids = sorted({c.rollout_id for c in calls})
            held = live_keys(session, self.config_id, rollout_ids)
            if mode == "only_missing":
                held |= judged_keys(session, self.config_id, rollout_ids)
            kept = [c for c in calls if (c.rollout_id, c.grader) not in held]
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

    def rebuild(self, batch_id: int) -> bytes:
        """The input file of a recorded batch, rendered again from its keys."""
        with self.store.read() as session:
            rows = session.execute(
                select(JudgeBatchKey.rollout_id, JudgeBatchKey.grader, Rollout.answer,
                       Rollout.source_word, Rollout.target_word)
                .join(Rollout, Rollout.id == JudgeBatchKey.rollout_id)
                .where(JudgeBatchKey.batch_id == batch_id).order_by(JudgeBatchKey.id)).all()
        return b"".join(self.line(Call(r.rollout_id, r.grader, r.answer,
                                       judged_word(r.source_word, r.target_word))) for r in rows)

    def send(self, batch: JudgeBatch, data: bytes | None = None) -> None:
        """Finish submitting a recorded batch: upload its file and create it, or adopt the
        batch a killed run created on the same file."""
        found: BatchInfo | None = None
        file_id = batch.input_file_id
        if file_id is None:
            file_id = self.api.upload(data if data is not None else self.rebuild(batch.id),
                                      f"patchdb-batch-{batch.id}.jsonl")
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
        """Take every live batch of this judge config one step: finish its submission (when
        `submit`), look it up, collect it once it ended. Returns how many stay live."""
        left = 0
        for batch in self.live():
            if batch.provider_batch_id is None:
                if not submit:
                    left += 1
                    continue
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
        for batch in self.live():
            if batch.provider_batch_id is not None:
                info = self.api.cancel(batch.provider_batch_id)
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
