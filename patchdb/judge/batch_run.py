"""`patchdb judge --batch` as a library call: judge through a provider's batch API.

A run first takes up every live batch of its judge config (finishing a submission a killed run
left half done, collecting each batch that ended), then submits what the mode still has pending
that no live batch holds, cut by the provider's limits, and, unless told not to wait, polls
until every batch ended and was collected. The store is the only record of progress
(judge_batches, judge_batch_keys, judgments), so any run can be killed and run again.
"""

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from patchdb.errors import JudgeError
from patchdb.faults import fault_point
from patchdb.judge.batch_client import BatchApi
from patchdb.judge.batch_collect import Prices
from patchdb.judge.batch_jobs import BatchContext, BatchSummary
from patchdb.judge.batch_plan import (
    BATCH_DISCOUNT,
    MAX_BYTES,
    MAX_REQUESTS,
    batch_pending,
    call_line,
    count_held,
    reasoning_options,
    split,
)
from patchdb.judge.client import resolve_endpoint
from patchdb.judge.leases import running_judge_runs
from patchdb.judge.plan import CostEstimate, DryRun, estimate_cost, find_judge_config
from patchdb.judge.providers import OPENROUTER, provider_of
from patchdb.judge.settings import JudgeOptions
from patchdb.judge.stage import dry_run_table, ensure_judge_config, prepare
from patchdb.judge.templates import Templates
from patchdb.redact import redact_text
from patchdb.store.models import JudgeBatch
from patchdb.store.runs import stage_run
from patchdb.store.store import Store


@dataclass
class BatchOptions:
    """How `judge --batch` submits and waits."""

    no_wait: bool = False
    collect_only: bool = False
    cancel: bool = False
    max_requests: int = MAX_REQUESTS
    max_bytes: int = MAX_BYTES
    poll_s: float = 30.0
    price_in: float | None = None
    price_out: float | None = None
    discount: float = BATCH_DISCOUNT


def _check(options: JudgeOptions, resolved: Any, base_url: str) -> None:
    """Refuse what a batch cannot do, before anything is written."""
    if resolved.backend != "openai":
        raise JudgeError("--batch needs an OpenAI-compatible API (not --judge-backend hf)")
    if resolved.verdict != "last-word":
        raise JudgeError("--batch reads verdicts by the last word: --verdict logprobs asks a "
                         "second question per call, which a batch cannot")
    if options.follow or options.cache:
        raise JudgeError("--batch cannot be combined with --follow or --cache")
    if provider_of(base_url) == OPENROUTER:
        raise JudgeError("OpenRouter's batch API takes its requests inline, not as an uploaded "
                         "file, so --batch cannot use it; point --base-url at an API with the "
                         "OpenAI files and batches endpoints (e.g. https://api.openai.com/v1 "
                         "with OPENAI_API_KEY)")


def _check_sizes(store: Store, scope: Any, options: JudgeOptions, batch: BatchOptions,
                 resolved: Any, templates: Templates, question: str, base_url: str) -> None:
    """Refuse, before the judge config or the run is written, a --batch-max-bytes smaller than
    one of the requests this run would send (a new judge config's id taken as 10**12, longer
    than any it can get)."""
    with store.read() as session:
        config_id = find_judge_config(session, resolved.model, resolved.reasoning,
                                      templates.version, resolved.backend, resolved.verdict)
    extra = reasoning_options(base_url, resolved.reasoning)
    for call in batch_pending(store, scope, config_id, options.mode, options.limit):
        line = call_line(templates, question, resolved.model, extra, call,
                         config_id if config_id is not None else 10**12)
        if len(line) > batch.max_bytes:
            raise JudgeError(f"one request is {len(line):,} bytes, more than the "
                             f"{batch.max_bytes:,}-byte batch file limit (--batch-max-bytes)")


def run_batch(store: Store, sweep_name: str | None, options: JudgeOptions,
              batch: BatchOptions, echo: Callable[[str], None]) -> BatchSummary:
    """Collect what ended, submit what is missing, wait (unless no_wait); see the module doc."""
    sweep, config, scope, resolved, templates = prepare(store, sweep_name, options)
    endpoint = resolve_endpoint(resolved.base_url)
    _check(options, resolved, endpoint.base_url)
    if not (batch.collect_only or batch.cancel):
        _check_sizes(store, scope, options, batch, resolved, templates, config.prompt_trial,
                     endpoint.base_url)
    config_id = ensure_judge_config(store, resolved, templates)
    api = BatchApi(endpoint, options.timeout_s)
    arguments = {**options.arguments(), "batch": asdict(batch)}
    try:
        with stage_run(store, "judge", arguments, sweep.id) as run:
            with store.read() as session:
                peers = running_judge_runs(session)
            ctx = BatchContext(store, api, config_id, sweep.id, run.id, templates,
                               config.prompt_trial, resolved.model, resolved.reasoning,
                               redact_text(endpoint.base_url),
                               Prices(batch.price_in, batch.price_out, batch.discount), echo,
                               peers=peers)
            ctx.drop_stranded()
            for url in ctx.live_elsewhere():
                echo(f"Live batches of this judge config were sent to {url}; their keys stay "
                     "held until a run with that --base-url collects them.")
            submit = not (batch.collect_only or batch.cancel)
            if batch.cancel:
                ctx.cancel()
            live = ctx.advance(submit=submit)
            if submit:
                live = _submit(ctx, scope, options, batch)
            while live and not batch.no_wait and not batch.collect_only:
                fault_point("judge.batch_poll")
                time.sleep(batch.poll_s)
                live = ctx.advance(submit=submit)
            ctx.summary.live = live
    finally:
        api.close()
    return ctx.summary


def _submit(ctx: BatchContext, scope: Any, options: JudgeOptions, batch: BatchOptions) -> int:
    """Submit the pending calls no live batch holds; with --max-cost one batch at a time,
    each collected before the next. Returns how many batches are live."""
    calls = batch_pending(ctx.store, scope, ctx.config_id, options.mode, options.limit)
    live = len(ctx.live())
    for chunk in split(((c, ctx.line(c)) for c in calls), batch.max_requests, batch.max_bytes):
        if options.max_cost is not None and ctx.summary.cost >= options.max_cost:
            ctx.summary.stopped = "max_cost"
            break
        batch_id, kept = ctx.record(chunk.calls, options.mode)
        if batch_id is None:
            continue  # another run submitted all of these meanwhile
        lines = dict(zip((id(c) for c in chunk.calls), chunk.lines, strict=True))
        ctx.send(ctx.reload(batch_id), b"".join(lines[id(c)] for c in kept))
        ctx.summary.submitted += 1
        ctx.summary.submitted_calls += len(kept)
        live += 1
        if options.max_cost is not None:
            while (live := ctx.advance()):
                time.sleep(batch.poll_s)
            if not ctx.summary.cost_known:
                raise JudgeError("--max-cost needs each reply's cost: the batch replies carry "
                                 "none, so pass --price-in and --price-out")
    if options.limit is not None and ctx.summary.submitted_calls >= options.limit:
        ctx.summary.stopped = "limit"
    return live


@dataclass
class BatchPlan:
    """`judge --batch --dry-run`: the live plan, the calls live batches hold, and the batch
    estimate beside the live one."""

    dry: DryRun
    held: int
    send: int
    batches: int
    live_cost: CostEstimate
    discount: float


def batch_dry_run(store: Store, sweep_name: str | None, options: JudgeOptions,
                  batch: BatchOptions) -> BatchPlan:
    """What `judge --batch` would submit now and its cost at batch prices; writes nothing."""
    dry = dry_run_table(store, sweep_name, options, batch.price_in, batch.price_out)
    _sweep, _config, scope, resolved, templates = prepare(store, sweep_name, options)
    with store.read() as session:
        config_id = find_judge_config(session, resolved.model, resolved.reasoning,
                                      templates.version, resolved.backend, resolved.verdict)
        held = count_held(session, scope, config_id, options.mode)
        pending = sum(r.send_now for r in dry.rows)
        send = max(0, pending - held)
        if options.limit is not None:
            send = min(send, options.limit)
        live_cost = estimate_cost(session, config_id, send, batch.price_in, batch.price_out)
    return BatchPlan(dry, held, send, math.ceil(send / batch.max_requests), live_cost,
                     batch.discount)


def batch_table(store: Store, sweep_name: str | None, options: JudgeOptions) -> list[JudgeBatch]:
    """The sweep's batches of this judge config, oldest first, for the status view."""
    sweep, _config, _scope, resolved, templates = prepare(store, sweep_name, options)
    with store.read() as session:
        config_id = find_judge_config(session, resolved.model, resolved.reasoning,
                                      templates.version, resolved.backend, resolved.verdict)
        rows = session.scalars(select(JudgeBatch).where(JudgeBatch.judge_config_id == config_id,
                                                        JudgeBatch.sweep_id == sweep.id)
                               .order_by(JudgeBatch.id)).all()
        session.expunge_all()
    return list(rows)
