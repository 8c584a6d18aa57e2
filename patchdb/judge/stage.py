"""`patchdb judge` as a library call: fill judgment rows for the rollouts that need them.

Nothing but the store records progress: what is pending is a query (plan.py), every result is
written under the unique key (rollout, grader, judge config), so a run killed at any point is
resumed by running it again. Any number of runs may work on one store at once: they claim keys
under leases (leases.py) and each call is paid once. The asynchronous engine is in runner.py.
"""

import asyncio
from dataclasses import replace
from typing import Any

from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.judge.client import ApiJudge, FatalJudgeError, resolve_endpoint
from patchdb.judge.plan import (
    DryRun,
    Scope,
    call_table,
    count_pending,
    find_judge_config,
    make_scope,
    plan_dry_run,
)
from patchdb.judge.producer import generate_running
from patchdb.judge.runner import Backend, JudgeInterrupted, JudgeSummary, Runner
from patchdb.judge.settings import JudgeOptions, Resolved, describe_judge, resolve
from patchdb.judge.templates import DEFAULT_TEMPLATES, Templates, load_templates
from patchdb.store.dialect import dialect_insert
from patchdb.store.models import JudgeConfig, utcnow
from patchdb.store.runs import stage_run
from patchdb.store.store import Store
from patchdb.store.sweeps import expected_units, get_experiments, get_sweep, sweep_config


def ensure_judge_config(store: Store, resolved: Resolved, templates: Templates) -> int:
    """The judge_configs row for these settings, created on first use."""

    def upsert(session: Session) -> int:
        stmt = dialect_insert(session, JudgeConfig).on_conflict_do_nothing(
            index_elements=["model", "reasoning", "template_version", "backend", "verdict_mode"]
        )
        session.execute(stmt, [{
            "model": resolved.model, "reasoning": resolved.reasoning,
            "template_version": templates.version, "backend": resolved.backend,
            "verdict_mode": resolved.verdict,
            "templates_json": templates.to_json(), "created_at": utcnow(),
        }])
        found = find_judge_config(session, resolved.model, resolved.reasoning,
                                  templates.version, resolved.backend, resolved.verdict)
        assert found is not None
        return found

    return store.transact(upsert)


def make_backend(resolved: Resolved, options: JudgeOptions) -> Backend:
    if resolved.backend == "hf":
        from patchdb.judge.backend_hf import HF_BATCH, HF_MAX_NEW_TOKENS, HfJudge

        return HfJudge(resolved.model, options.hf_dtype, options.hf_device,
                       options.hf_batch_size or HF_BATCH, options.hf_max_new_tokens or HF_MAX_NEW_TOKENS,
                       verdict=resolved.verdict)
    return ApiJudge(
        resolve_endpoint(resolved.base_url), resolved.model, resolved.reasoning,
        timeout_s=options.timeout_s, max_attempts=resolved.max_attempts,
        backoff_base_s=options.backoff_base_s, concurrency=resolved.concurrency,
        verdict=resolved.verdict,
    )


def prepare(store: Store, sweep_name: str | None, options: JudgeOptions) -> tuple[
    Any, SweepConfig, Scope, Resolved, Templates
]:
    """Look up the sweep and check every option before anything is written."""
    with store.read() as session:
        sweep = get_sweep(session, sweep_name)
        config = sweep_config(sweep)
        experiments = get_experiments(session, sweep, options.experiments)
        expected_units(config, experiments, options.layers)  # refuses unknown layers
    resolved = resolve(options, config.judge)
    templates = load_templates(options.prompts) if options.prompts else DEFAULT_TEMPLATES
    scope = make_scope(experiments, options.graders, options.layers)
    return sweep, config, scope, resolved, templates


def stored_settings(resolved: Resolved) -> Resolved:
    """The settings as judge_configs keys them. An hf model is stored under its canonical id
    (hub id, resolved path or alias), which is found without loading the model."""
    if resolved.backend != "hf":
        return resolved
    from patchdb.generate.model_spec import model_id_for

    return replace(resolved, model=model_id_for(resolved.model), base_url=None, max_attempts=1)


def count_calls(store: Store, scope: Scope, stored: Resolved, templates: Templates,
                mode: str) -> tuple[int | None, int]:
    """The judge_configs id of these settings (None if never used) and the calls `mode` has
    pending now: a query, so it costs nothing to ask before loading a model."""
    with store.read() as session:
        config_id = find_judge_config(session, stored.model, stored.reasoning,
                                      templates.version, stored.backend, stored.verdict)
        return config_id, count_pending(session, scope, config_id, mode)


def calls_awaiting_generate(store: Store, config: SweepConfig, sweep: Any,
                            options: JudgeOptions) -> int:
    """The calls of the run's scope while generate has written none of its rollouts yet, else
    0: a --follow run waits for a generate that has not started writing, not for rollouts a
    finished generate left out (other layers, no baselines)."""
    with store.read() as session:
        experiments = get_experiments(session, sweep, options.experiments)
        rows = call_table(session, config, experiments, options.layers, options.graders, None)
    calls = sum(row.calls for row in rows)
    return calls if sum(row.awaiting_generate for row in rows) == calls else 0


def run_judge(store: Store, sweep_name: str | None, options: JudgeOptions) -> JudgeSummary:
    """Judge what the mode says is pending; returns what was done.

    Pending work is counted first: when there is none (and a --follow run has no generate
    run to wait for: none is running and no rollout of its scope is missing), no backend is
    built, no model is loaded and, as for a generate run with nothing to generate, no
    stage_runs row is added; the summary says nothing_pending.
    Raises FatalJudgeError (bad key, no credit, unreachable API) after saving what finished,
    and JudgeInterrupted on Ctrl-C after saving what finished.
    """
    sweep, config, scope, resolved, templates = prepare(store, sweep_name, options)
    stored = stored_settings(resolved)
    config_id, pending = count_calls(store, scope, stored, templates, options.mode)

    def awaited() -> int:
        return calls_awaiting_generate(store, config, sweep, options)

    if not pending and not (options.follow and (generate_running(store, sweep.id)
                                                or (options.follow_wait_s > 0 and awaited()))):
        in_scope = count_calls(store, scope, stored, templates, "overwrite")[1]
        return JudgeSummary(judge_config_id=config_id or 0, stage_run_id=0,
                            nothing_pending=True, sweep_name=sweep.name,
                            calls_in_scope=in_scope)
    options = replace(
        options,
        hf_batch_size=options.hf_batch_size or config.judge.batch_size,
        hf_max_new_tokens=options.hf_max_new_tokens or config.judge.max_new_tokens,
    )
    backend = make_backend(resolved, options)
    if resolved.backend == "hf":
        stored = replace(stored, model=getattr(backend, "model_id", stored.model))
    config_id = ensure_judge_config(store, stored, templates)
    with stage_run(store, "judge", options.arguments(), sweep.id) as run:
        runner = Runner(store, sweep.id, config.prompt_trial, scope, stored, templates,
                        options, backend, config_id, run.id, awaited)
        summary = asyncio.run(runner.run())
        if summary.stopped == "interrupted":
            raise JudgeInterrupted(summary)
        if runner.fatal is not None:
            raise FatalJudgeError(f"{runner.fatal} ({summary.calls} judgments saved)")
    summary.sweep_name = sweep.name
    return summary


def dry_run_table(store: Store, sweep_name: str | None, options: JudgeOptions,
                  price_in: float | None = None, price_out: float | None = None) -> DryRun:
    """What this judge command would send now, per experiment, and its cost; writes nothing."""
    sweep, config, _scope, resolved, templates = prepare(store, sweep_name, options)
    stored = stored_settings(resolved)
    with store.read() as session:
        experiments = get_experiments(session, sweep, options.experiments)
        config_id = find_judge_config(session, stored.model, stored.reasoning,
                                      templates.version, stored.backend, stored.verdict)
        dry = plan_dry_run(session, config, experiments, options.layers, options.graders,
                           config_id, options.mode, options.limit, price_in, price_out)
    return replace(dry, judge=describe_judge(stored))


__all__ = ["JudgeInterrupted", "JudgeSummary", "dry_run_table", "run_judge"]
