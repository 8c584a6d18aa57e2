"""The `judge --batch` part of `patchdb judge`: run it and print what it did."""

from typing import Any

import click

from patchdb.cli.judge_plan import render_plan
from patchdb.judge.batch_jobs import BatchSummary
from patchdb.judge.batch_run import (
    BatchOptions,
    BatchPlan,
    batch_dry_run,
    batch_table,
    run_batch,
)
from patchdb.judge.settings import JudgeOptions
from patchdb.store.models import JudgeBatch
from patchdb.store.store import Store

BATCH_ONLY = ("no_wait", "collect", "cancel")


def render_batch_plan(plan: BatchPlan) -> str:
    """The batch lines `--dry-run` adds under the live plan."""
    lines = [f"As batches (--batch): {plan.send:,} calls in {plan.batches:,} batch job(s) or "
             f"more (split further by file size)"
             + (f"; {plan.held:,} calls already held by live batches are not sent again"
                if plan.held else "") + "."]
    live = plan.live_cost
    if live.usd is None:
        lines.append(f"Estimated cost at batch prices: unknown: {live.basis}.")
    else:
        lines.append(f"Estimated cost at batch prices: ${live.usd * plan.discount:,.4f} "
                     f"({plan.discount:g} x the live estimate of ${live.usd:,.4f} for the "
                     "same calls).")
    return "\n".join(lines)


def render_batches(rows: list[JudgeBatch]) -> str:
    """The status view: one line per batch of this judge config."""
    if not rows:
        return "No batches yet for this judge config."
    header = (f"{'batch':>6} {'provider id':<28} {'state':<11} {'requests':>9} {'done':>9} "
              f"{'failed':>7} {'submitted':<16} {'collected':<16} {'cost':>10}")
    lines = [header, "-" * len(header)]
    for b in rows:
        submitted = b.submitted_at.isoformat()[:16] if b.submitted_at else "-"
        collected = b.collected_at.isoformat()[:16] if b.collected_at else "live"
        cost = f"${b.cost:.4f}" if b.cost is not None else "-"
        lines.append(f"{b.id:>6} {(b.provider_batch_id or '-')[:28]:<28} {b.state:<11} "
                     f"{b.requests:>9,} {b.completed or 0:>9,} {b.failed or 0:>7,} "
                     f"{submitted:<16} {collected:<16} {cost:>10}")
    return "\n".join(lines)


def render_batch_summary(s: BatchSummary, no_wait: bool) -> str:
    v = s.verdicts
    unpriced = "pass --price-in/--price-out to price replies that carry no cost"
    cost = (f"cost at batch prices ${s.cost:.4f}" if s.cost_known else
            f"cost unknown ({unpriced})" if not s.cost else
            f"cost at batch prices ${s.cost:.4f} for the replies that carry one ({unpriced})")
    lines = [f"Submitted {s.submitted:,} batch(es) of {s.submitted_calls:,} calls; collected "
             f"{s.collected:,}: {v['yes']:,} yes, {v['no']:,} no, {v['unparsed']:,} unparsed, "
             f"{v['errors']:,} errors ({v['cut_off']:,} cut off); {cost}."]
    if s.not_run:
        lines.append(f"{s.not_run:,} requests of expired or cancelled batches never ran; the "
                     "next run sends them again.")
    if s.unknown_lines:
        lines.append(f"{s.unknown_lines:,} output lines named no request of their batch and "
                     "were skipped.")
    if s.live:
        wait = "submitted and not waited for" if no_wait else "still running"
        lines.append(f"{s.live:,} batch(es) {wait}; `patchdb judge --batch --collect` shows "
                     "and collects them, a plain rerun collects them before submitting more.")
    if s.stopped == "limit":
        lines.append("Stopped at --limit; run again to submit the rest.")
    elif s.stopped == "max_cost":
        lines.append("Stopped at --max-cost; run again to submit the rest.")
    return "\n".join(lines)


def judge_batch(store: Store, sweep: str | None, options: JudgeOptions, dry_run: bool,
                batch: dict[str, Any]) -> None:
    """Run `judge --batch` with its flags and print the result; exit 1 if a batch failed."""
    opts = BatchOptions(no_wait=batch["no_wait"], collect_only=batch["collect"],
                        cancel=batch["cancel"], max_requests=batch["batch_max_requests"],
                        max_bytes=batch["batch_max_bytes"], poll_s=batch["batch_poll"],
                        price_in=batch["price_in"], price_out=batch["price_out"],
                        discount=batch["batch_discount"])
    if opts.collect_only and opts.cancel:
        raise click.ClickException("--collect and --cancel do not go together: --cancel "
                                   "cancels the live batches and collects what they finished")
    if options.max_cost is not None and opts.no_wait:
        raise click.BadParameter("--max-cost is checked as batches end, so it needs waiting "
                                 "(drop --no-wait)", param_hint="--max-cost")
    if dry_run:
        plan = batch_dry_run(store, sweep, options, opts)
        click.echo(render_plan(plan.dry, options.mode, options.limit))
        click.echo(render_batch_plan(plan))
        return
    try:
        summary = run_batch(store, sweep, options, opts, lambda text: click.echo(text, err=True))
    except KeyboardInterrupt:
        click.echo("Interrupted; the submitted batches run on at the provider. "
                   "`patchdb judge --batch --collect` or a rerun collects them.", err=True)
        raise SystemExit(130) from None
    if opts.collect_only or opts.cancel:
        click.echo(render_batches(batch_table(store, sweep, options)))
    click.echo(render_batch_summary(summary, opts.no_wait))
    if summary.failures:
        raise click.ClickException("; ".join(summary.failures))
