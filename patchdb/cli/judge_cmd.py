"""`patchdb judge`: fill judgment rows for the rollouts that lack them."""

from typing import Any

import click

from patchdb.cli.judge_batch import BATCH_ONLY, judge_batch
from patchdb.cli.judge_plan import render_plan
from patchdb.cli.multi import run_per_sweep
from patchdb.cli.options import (
    FiniteRange,
    db_option,
    experiments_option,
    layers_option,
    split_list,
    sweep_option,
)
from patchdb.config import REASONING_EFFORTS, VERDICT_MODES
from patchdb.experiments import GRADERS
from patchdb.judge.settings import BACKENDS, JudgeOptions
from patchdb.judge.stage import JudgeInterrupted, JudgeSummary, dry_run_table, run_judge
from patchdb.store import open_store


def graders_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    graders = split_list(value)
    for g in graders or ():
        if g not in GRADERS:
            raise click.BadParameter(f"unknown grader {g!r} (known: {', '.join(GRADERS)})")
    return graders


BATCH_FLAGS = ("use_batch", "no_wait", "collect", "cancel", "batch_max_requests",
               "batch_max_bytes", "batch_poll", "batch_discount")
def render_nothing(s: JudgeSummary, mode: str) -> str:
    """One line for a run that found nothing pending (and loaded no judge model)."""
    where = f"of sweep {s.sweep_name!r} in scope"
    if s.calls_in_scope == 0:
        reason = f"no rollouts {where}"
    else:
        reason = {
            "only_missing": f"all {s.calls_in_scope:,} calls {where} have a judgment",
            "retry_unparsed": f"no unparsed judgment {where}",
            "retry_errors": f"no judgment with an error {where}",
        }.get(mode, f"no calls {where}")
    return f"Judged 0 calls: nothing to judge ({reason})."


def render_summary(s: JudgeSummary) -> str:
    tokens = s.prompt_tokens + s.completion_tokens
    line = (f"Judged {s.calls:,} calls in {s.elapsed_s:.1f}s ({s.calls_per_s:.1f} calls/s): "
            f"{s.yes:,} yes, {s.no:,} no, {s.unparsed:,} unparsed, {s.errors:,} errors"
            f"{f', {s.cached:,} from the cache' if s.cached else ''}. "
            f"Tokens {tokens:,} ({s.reasoning_tokens:,} reasoning), cost ${s.cost:.4f}.")
    if s.failures:
        retried = ", ".join(f"{k} {v}" for k, v in sorted(s.failures.items()))
        line += f"\nFailed attempts: {retried}."
    if s.stopped == "limit":
        line += "\nStopped at --limit; run again to judge the rest."
    elif s.stopped == "max_cost":
        line += "\nStopped at --max-cost; run again to judge the rest."
    elif s.stopped == "no_generate":
        line += ("\nNo generate run of the sweep started within --follow-wait; stopped "
                 "following.")
    return line


@click.command()
@click.option("--only-missing", "mode", flag_value="only_missing", default=True,
              help="Judge calls that have no row yet for this judge config (default).")
@click.option("--retry-unparsed", "mode", flag_value="retry_unparsed",
              help="Judge again the rows whose reply had no YES/NO verdict.")
@click.option("--retry-errors", "mode", flag_value="retry_errors",
              help="Judge again the rows stored with an error.")
@click.option("--overwrite", "mode", flag_value="overwrite", help="Judge every call again.")
@db_option
@sweep_option
@experiments_option
@layers_option
@click.option("--graders", callback=graders_callback, envvar="PATCHDB_JUDGE_GRADERS",
              help="Comma-separated graders: coherence, detection, detection_identification "
                   "(default: all that apply).")
@click.option("--judge-model", "model", envvar="PATCHDB_JUDGE_MODEL",
              help="Judge model (default: the sweep config's [judge] model); with "
                   "--judge-backend hf a local path, hub id or alias.")
@click.option("--reasoning", type=click.Choice(REASONING_EFFORTS), envvar="PATCHDB_JUDGE_REASONING",
              help="Reasoning effort sent to the judge (default: the sweep config's).")
@click.option("--base-url", envvar="PATCHDB_JUDGE_BASE_URL",
              help="Any OpenAI-compatible API (default: OpenRouter with OPENROUTER_API_KEY, "
                   "else OpenAI with OPENAI_API_KEY); it selects the API judge even where the "
                   "sweep's config names the in-process one. OPENAI_API_KEY goes only to "
                   "https://api.openai.com and OPENROUTER_API_KEY only to https://openrouter.ai "
                   "(that host exactly); any other URL gets PATCHDB_JUDGE_API_KEY or no key.")
@click.option("--judge-backend", "backend", type=click.Choice(BACKENDS),
              envvar="PATCHDB_JUDGE_BACKEND", help="openai (any compatible API) or hf "
              "(a transformers model in this process). Default: openai with --base-url, "
              "else the sweep's [judge] backend.")
@click.option("--concurrency", type=click.IntRange(min=1), envvar="PATCHDB_JUDGE_CONCURRENCY",
              help="Calls in flight (default: the sweep config's, 512).")
@click.option("--max-attempts", type=click.IntRange(min=1), envvar="PATCHDB_JUDGE_MAX_ATTEMPTS",
              help="Attempts per call before its error is stored (default 3).")
@click.option("--timeout", "timeout_s", type=FiniteRange(min=0.01), default=120.0,
              show_default=True, envvar="PATCHDB_JUDGE_TIMEOUT", help="Seconds per call attempt.")
@click.option("--limit", type=click.IntRange(min=1), envvar="PATCHDB_JUDGE_LIMIT",
              help="Judge at most N calls.")
@click.option("--max-cost", type=FiniteRange(min=0), envvar="PATCHDB_JUDGE_MAX_COST",
              help="Stop once the cost of this run reaches USD.")
@click.option("--cache/--no-cache", default=False, envvar="PATCHDB_JUDGE_CACHE",
              help="Answer identical requests from the judge_cache table.")
@click.option("--follow", is_flag=True, envvar="PATCHDB_JUDGE_FOLLOW",
              help="Keep judging new rollouts while a generate run of the sweep is running; "
                   "started before generate has written anything, wait for it.")
@click.option("--follow-wait", "follow_wait_s", type=FiniteRange(min=0), default=600.0,
              show_default=True, envvar="PATCHDB_JUDGE_FOLLOW_WAIT",
              help="With --follow, started before generate has written any rollout of the "
                   "scope: seconds to wait for a generate run of the sweep to start.")
@click.option("--dry-run", is_flag=True,
              help="Print which judge would run, what this command would send now, what "
                   "waits for generate, and the estimated cost; then exit without judging.")
@click.option("--price-in", type=FiniteRange(min=0), envvar="PATCHDB_JUDGE_PRICE_IN",
              help="With --dry-run: USD per million prompt tokens, times the average tokens of "
                   "this judge config's stored calls (default: their recorded cost). With "
                   "--batch: the live price that prices batch replies carrying no cost.")
@click.option("--price-out", type=FiniteRange(min=0), envvar="PATCHDB_JUDGE_PRICE_OUT",
              help="With --dry-run: USD per million completion (incl. reasoning) tokens.")
@click.option("--prompts", type=click.Path(dir_okay=False), envvar="PATCHDB_JUDGE_PROMPTS",
              help="TOML/JSON file of grader templates with {prompt}, {response}, {word}.")
@click.option("--backoff", "backoff_base_s", type=FiniteRange(min=0), default=1.0,
              envvar="PATCHDB_JUDGE_BACKOFF", show_default=True, hidden=True)
@click.option("--poll", "poll_s", type=FiniteRange(min=0.01), default=2.0,
              envvar="PATCHDB_JUDGE_POLL", show_default=True, hidden=True)
@click.option("--write-batch", type=click.IntRange(min=1), default=200, show_default=True,
              envvar="PATCHDB_JUDGE_WRITE_BATCH", hidden=True)
@click.option("--lease", "lease_s", type=FiniteRange(min=0.1), default=60.0,
              show_default=True, envvar="PATCHDB_JUDGE_LEASE", hidden=True)
@click.option("--grace", "grace_s", type=FiniteRange(min=0), default=10.0,
              envvar="PATCHDB_JUDGE_GRACE", show_default=True,
              help="Seconds Ctrl-C waits for calls in flight; then the in-process judge "
                   "stops its batch at the next token, keeping the replies that ended.")
@click.option("--judge-batch-size", "hf_batch_size", type=click.IntRange(min=1),
              envvar="PATCHDB_JUDGE_BATCH_SIZE",
              help="Prompts per forward pass with --judge-backend hf (default: the sweep's "
                   "[judge] batch_size, 8).")
@click.option("--judge-max-new-tokens", "hf_max_new_tokens", type=click.IntRange(min=1),
              envvar="PATCHDB_JUDGE_MAX_NEW_TOKENS",
              help="Reply length cap with --judge-backend hf, greedy decoding (default: the "
                   "sweep's [judge] max_new_tokens, 96).")
@click.option("--judge-dtype", "hf_dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              default="float32", show_default=True, envvar="PATCHDB_JUDGE_DTYPE",
              help="Weights dtype with --judge-backend hf.")
@click.option("--judge-device", "hf_device", envvar="PATCHDB_JUDGE_DEVICE",
              help="Device with --judge-backend hf (default: cuda when present, else cpu).")
@click.option("--verdict", type=click.Choice(VERDICT_MODES), envvar="PATCHDB_JUDGE_VERDICT",
              help="How a verdict is read: last-word (the reply's last word, YES or NO) or "
                   "logprobs (after the reasoning, the likelier of YES and NO as the next token; "
                   "needs a backend that returns logprobs). Default: the sweep's [judge] "
                   "verdict, last-word.")
@click.option("--batch", "use_batch", is_flag=True, envvar="PATCHDB_JUDGE_BATCH",
              help="Judge through the provider's batch API (OpenAI files + batches endpoints) at "
                   "batch prices: collect the batches that ended, submit what is missing, wait. "
                   "See docs/judging.md.")
@click.option("--no-wait", is_flag=True, help="With --batch: submit and exit; collect later.")
@click.option("--collect", is_flag=True,
              help="With --batch: show this judge config's batches and collect those that "
                   "ended; submit nothing.")
@click.option("--cancel", is_flag=True,
              help="With --batch: cancel the live batches (what they finished is collected).")
@click.option("--batch-max-requests", type=click.IntRange(min=1), default=50_000,
              show_default=True, envvar="PATCHDB_JUDGE_BATCH_MAX_REQUESTS",
              help="Requests per batch job (OpenAI's limit is 50,000).")
@click.option("--batch-max-bytes", type=click.IntRange(min=1), default=200_000_000,
              show_default=True, envvar="PATCHDB_JUDGE_BATCH_MAX_BYTES",
              help="Bytes per batch input file (OpenAI's limit is 200 MB).")
@click.option("--batch-poll", type=FiniteRange(min=0.01), default=30.0, show_default=True,
              envvar="PATCHDB_JUDGE_BATCH_POLL", help="Seconds between looks at live batches.")
@click.option("--batch-discount", type=FiniteRange(min=0, max=1), default=0.5,
              show_default=True, envvar="PATCHDB_JUDGE_BATCH_DISCOUNT",
              help="Batch price as a share of the live price: prices replies that carry no "
                   "cost of their own, and the --dry-run batch estimate.")
@click.option("--progress/--no-progress", default=True, envvar="PATCHDB_JUDGE_PROGRESS",
              help="Show progress: a bar on a terminal, else a line at each 5% of the calls "
                   "and at least every 30 s.")
def judge(db: str, sweep: str | None, dry_run: bool, price_in: float | None,
          price_out: float | None, **kwargs: Any) -> None:
    """Judge rollouts: coherence for every answer, plus detection or detection+identification
    as the experiment needs. Resumable: a rerun judges only what is missing.

    --dry-run counts what this same command would send now (its mode, scope and --limit),
    apart from the calls whose rollouts generate has not written yet, and prices them from
    this judge config's own stored calls (average recorded cost, or average tokens times
    --price-in/--price-out); it says so when it cannot.

    \b
    Example:
      export OPENROUTER_API_KEY=...
      patchdb judge --dry-run
      patchdb judge --concurrency 256 --max-cost 20
      patchdb judge --retry-errors
      patchdb judge --base-url http://localhost:8000/v1 --judge-model Qwen/Qwen3-8B
      patchdb judge --judge-backend hf --judge-model ./models/judge
      patchdb judge --sweep 'demo-dose-*'       # every sweep of a dose series
    """
    if (price_in is None) != (price_out is None):
        raise click.ClickException("give both --price-in and --price-out, or neither")
    if run_per_sweep(db, sweep):  # --sweep 'name*': each matching sweep in turn
        return
    batch = {k: kwargs.pop(k) for k in BATCH_FLAGS}
    if not batch["use_batch"] and any(batch[k] for k in BATCH_ONLY):
        raise click.UsageError("--no-wait, --collect and --cancel go with --batch")
    options = JudgeOptions(**kwargs)
    store = open_store(db)
    try:
        if batch["use_batch"]:
            judge_batch(store, sweep, options, dry_run, {**batch, "price_in": price_in,
                                                         "price_out": price_out})
            return
        if dry_run:
            dry = dry_run_table(store, sweep, options, price_in, price_out)
            click.echo(render_plan(dry, options.mode, options.limit))
            return
        try:
            summary = run_judge(store, sweep, options)
        except JudgeInterrupted as exc:
            click.echo(render_summary(exc.summary), err=True)
            click.echo("Interrupted; what finished is saved. Run again to resume.", err=True)
            raise SystemExit(130) from None
    finally:
        store.close()
    click.echo(render_nothing(summary, options.mode) if summary.nothing_pending
               else render_summary(summary))
