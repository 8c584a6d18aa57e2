"""What `judge --batch` submits: the pending calls no live batch holds, cut into batch jobs.

A request's custom_id names its key, "patchdb-r<rollout id>-<grader>-c<judge config id>", so
replies are matched to keys by it and never by their order in the output file. A batch is live
until its results were written (judge_batches.collected_at); the keys of live batches are left
out of everything a run submits, whatever the mode. The one exception is a batch that has no
input file id while the run that recorded it is no longer running (`stranded`): nothing of it
reached a provider, so it holds no key.
"""

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session

from patchdb.errors import JudgeError
from patchdb.judge.plan import Call, Scope, in_scope, pending_page
from patchdb.judge.providers import OPENAI, provider_of
from patchdb.judge.templates import Templates
from patchdb.store.models import JudgeBatch, JudgeBatchKey, Judgment, Rollout, StageRun
from patchdb.store.runs import db_now, effective_status
from patchdb.store.store import Store

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
# OpenAI's documented per-batch limits: 50,000 requests and a 200 MB input file
MAX_REQUESTS = 50_000
MAX_BYTES = 200_000_000
BATCH_DISCOUNT = 0.5  # batch price as a share of the live price (OpenAI and OpenRouter: half)
_CUSTOM_ID = re.compile(r"^patchdb-r(\d+)-([a-z_]+)-c(\d+)$")
CUSTOM_ID_IN_TEXT = re.compile(r'"custom_id"\s*:\s*"(patchdb-r\d+-[a-z_]+-c\d+)"')

Key = tuple[int, str]  # (rollout id, grader); the judge config is the batch's


def custom_id(rollout_id: int, grader: str, config_id: int) -> str:
    """The request id that names one judgment key."""
    return f"patchdb-r{rollout_id}-{grader}-c{config_id}"


def parse_custom_id(text: str) -> tuple[int, str, int] | None:
    """(rollout id, grader, judge config id) of a custom_id, None for one patchdb did not make."""
    found = _CUSTOM_ID.match(text)
    if found is None:
        return None
    return int(found[1]), found[2], int(found[3])


def reasoning_options(base_url: str, effort: str) -> dict[str, object]:
    """The reasoning-effort field as the live client sends it (OpenAI's own field at OpenAI's
    host, by the rule in providers.provider_of; OpenRouter's `reasoning` object elsewhere), so
    both judge alike."""
    if provider_of(base_url) == OPENAI:
        return {"reasoning_effort": effort}
    return {"reasoning": {"effort": effort}}


def request_line(cid: str, model: str, prompt: str, options: dict[str, object]) -> bytes:
    """One line of a batch input file: a chat-completions request for one grader prompt."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **options}
    line = {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


def call_line(templates: Templates, question: str, model: str, options: dict[str, object],
              call: Call, config_id: int) -> bytes:
    """The batch input line that asks one call's grader question under judge config config_id."""
    prompt = templates.render(call.grader, question, call.answer, call.word)
    return request_line(custom_id(call.rollout_id, call.grader, config_id), model, prompt, options)


def stranded(session: Session, config_id: int | None, sweep_id: int | None = None,
             now: datetime | None = None) -> list[int]:
    """Ids of this judge config's live batches (of one sweep, or all) that have no input file
    id and whose run is no longer running (it failed, was killed or its host went away):
    nothing of theirs reached a provider, so they hold no key and can be dropped. A batch
    whose run is still running keeps its keys: that run is uploading it. `now`: the caller's
    db_now, where it has read it already (read here otherwise)."""
    if config_id is None:
        return []
    query = (select(JudgeBatch.id, StageRun)
             .outerjoin(StageRun, StageRun.id == JudgeBatch.stage_run_id)
             .where(JudgeBatch.judge_config_id == config_id, JudgeBatch.collected_at.is_(None),
                    JudgeBatch.input_file_id.is_(None)).order_by(JudgeBatch.id))
    if sweep_id is not None:
        query = query.where(JudgeBatch.sweep_id == sweep_id)
    now = db_now(session) if now is None else now
    return [int(batch_id) for batch_id, run in session.execute(query)
            if run is None or effective_status(run, now) != "running"]


def live_keys(session: Session, config_id: int, rollout_ids: Sequence[int],
              now: datetime | None = None) -> set[Key]:
    """Keys among these rollouts that a live batch of this judge config holds (a stranded
    batch holds none); `now` as for stranded."""
    free = stranded(session, config_id, now=now)
    held: set[Key] = set()
    for start in range(0, len(rollout_ids), 900):
        chunk = list(rollout_ids[start:start + 900])
        query = (select(JudgeBatchKey.rollout_id, JudgeBatchKey.grader)
                 .join(JudgeBatch, JudgeBatch.id == JudgeBatchKey.batch_id)
                 .where(JudgeBatchKey.judge_config_id == config_id,
                        JudgeBatchKey.rollout_id.in_(chunk), JudgeBatch.collected_at.is_(None)))
        if free:
            query = query.where(JudgeBatch.id.not_in(free))
        held.update((rid, grader) for rid, grader in session.execute(query))
    return held


def batch_pending(store: Store, scope: Scope, config_id: int | None, mode: str,
                  limit: int | None = None) -> Iterator[Call]:
    """The calls the mode has pending that no live batch holds, in rollout order, at most
    `limit` of them (the same pages the live judge reads, each in a read of its own)."""
    after, sent = 0, 0
    while limit is None or sent < limit:
        with store.read() as session:  # closed before yielding: the caller writes and waits
            calls, last = pending_page(session, scope, config_id, mode, after)
            if last is None:
                return
            held = (live_keys(session, config_id, sorted({c.rollout_id for c in calls}))
                    if config_id is not None else set())
        for call in calls:
            if (call.rollout_id, call.grader) in held:
                continue
            if limit is not None and sent >= limit:
                return
            sent += 1
            yield call
        after = last


def count_held(session: Session, scope: Scope, config_id: int | None, mode: str) -> int:
    """Of the calls the mode has pending in scope, how many a live batch holds (so a batch run
    leaves them out); counted in SQL for --dry-run."""
    if config_id is None:
        return 0
    free = stranded(session, config_id)
    total = 0
    for exp_id, graders in scope.graders.items():
        row = and_(Judgment.rollout_id == JudgeBatchKey.rollout_id,
                   Judgment.grader == JudgeBatchKey.grader,
                   Judgment.judge_config_id == config_id)
        query = (
            select(func.count()).select_from(JudgeBatchKey)
            .join(JudgeBatch, JudgeBatch.id == JudgeBatchKey.batch_id)
            .join(Rollout, Rollout.id == JudgeBatchKey.rollout_id)
            .where(JudgeBatch.collected_at.is_(None), JudgeBatchKey.judge_config_id == config_id,
                   Rollout.experiment_id == exp_id, JudgeBatchKey.grader.in_(graders))
        )
        query = in_scope(query, scope)
        if free:
            query = query.where(JudgeBatch.id.not_in(free))
        if mode == "only_missing":
            query = query.where(~exists().where(row))
        elif mode == "retry_unparsed":
            query = query.where(exists().where(row, Judgment.verdict.is_(None),
                                               Judgment.error.is_(None)))
        elif mode == "retry_errors":
            query = query.where(exists().where(row, Judgment.error.is_not(None)))
        total += session.scalar(query) or 0
    return total


@dataclass
class Chunk:
    """The calls and input-file lines of one batch job."""

    calls: list[Call]
    lines: list[bytes]

    @property
    def size(self) -> int:
        return sum(len(line) for line in self.lines)


def split(items: Iterator[tuple[Call, bytes]], max_requests: int,
          max_bytes: int) -> Iterator[Chunk]:
    """Cut (call, line) pairs into batches of at most max_requests lines and max_bytes bytes."""
    chunk, size = Chunk([], []), 0
    for call, line in items:
        if len(line) > max_bytes:
            raise JudgeError(f"one request is {len(line):,} bytes, more than the "
                             f"{max_bytes:,}-byte batch file limit (--batch-max-bytes)")
        if chunk.calls and (len(chunk.calls) >= max_requests or size + len(line) > max_bytes):
            yield chunk
            chunk, size = Chunk([], []), 0
        chunk.calls.append(call)
        chunk.lines.append(line)
        size += len(line)
    if chunk.calls:
        yield chunk
