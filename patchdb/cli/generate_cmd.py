"""`patchdb generate`: fill the sweep's missing rollouts, one committed unit at a time."""

import subprocess
import sys
from typing import TYPE_CHECKING

import click

from patchdb.cli.multi import run_per_sweep
from patchdb.cli.options import (
    db_option,
    device_option,
    experiments_option,
    layers_option,
    narrowing_options,
    sweep_option,
)
from patchdb.config import DTYPES
from patchdb.errors import ConfigError

if TYPE_CHECKING:
    from patchdb.generate.stage import GenerateResult


def _batch_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None or value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected 'auto' or a positive integer, got {value!r}")
    return int(value)


def _shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    from patchdb.generate.stage import parse_shard

    try:
        return parse_shard(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@db_option
@sweep_option
@experiments_option
@layers_option
@narrowing_options
@click.option("--batch-size", default="auto", show_default=True, callback=_batch_size,
              envvar="PATCHDB_BATCH_SIZE",
              help="Decode rows per batch, or 'auto' (largest that fits free GPU memory; 64 on CPU).")
@device_option
@click.option("--dtype", type=click.Choice(DTYPES), envvar="PATCHDB_DTYPE",
              help="Model dtype (default: the sweep's).")
@click.option("--shard", callback=_shard, envvar="PATCHDB_SHARD",
              help="Only units whose key hashes to shard i of N (i from 0), e.g. 0/4: one per GPU.")
@click.option("--model", envvar="PATCHDB_MODEL",
              help="Load this model spec instead of the sweep's (e.g. a local copy of it).")
@click.option("--gpus", type=click.IntRange(min=1), envvar="PATCHDB_GPUS",
              help="Start one process per GPU under torchrun; each takes a disjoint share.")
@click.option("--gpus-per-model", type=click.IntRange(min=1), default=1, show_default=True,
              envvar="PATCHDB_GPUS_PER_MODEL",
              help="Spread each model copy over this many GPUs (device_map='auto'), for a model "
                   "too large for one; with --gpus N, N/this processes.")
@click.option("--share-prefix/--no-share-prefix", default=True, show_default=True,
              envvar="PATCHDB_SHARE_PREFIX",
              help="On GPUs, keep the prompt's KV cache before the injection start once for all "
                   "rows: a smaller cache per row and a larger auto batch (Gemma-3-27B shape on "
                   "an H100: 2x the rows, 1.26x the rollouts per second).")
@click.option("--compile/--no-compile", "compile_", default=None, envvar="PATCHDB_COMPILE",
              help="On GPUs, torch.compile the decoder layers before capturing the decode step: "
                   "about 1.25x faster steps for seconds of compiling (H200, Gemma-3-27B "
                   "shape). Default: on when at least 300,000 decode tokens are pending.")
@click.option("--refill/--no-refill", default=True, show_default=True, envvar="PATCHDB_REFILL",
              help="On GPUs, a row whose answer ends takes the next sample at once (continuous "
                   "batching), so the step keeps its full batch while answers end at different "
                   "lengths; --no-refill decodes fixed batches. Answers are the same either way.")
@click.option("--kv-pages/--no-kv-pages", default=None, envvar="PATCHDB_KV_PAGES",
              help="With --refill, once the store holds answers of the sweep's experiments: "
                   "keep each row's KV cache by need, in pages, and size the batch for the "
                   "stored answers' lengths (more rows where answers end early). Answers are "
                   "the same either way. Default: on where a full cache a row allows under "
                   "256 rows (a larger batch is bound by its matmuls: on an H100, a 27B "
                   "model's 831 paged rows ran 1.3% faster than 395).")
@click.option("--no-baselines", is_flag=True, envvar="PATCHDB_NO_BASELINES",
              help="Skip the baselines (each target condition generated with no patch; the "
                   "unsteered one is the no-injection control).")
@click.option("--readout-only", is_flag=True, envvar="PATCHDB_READOUT_ONLY",
              help="Prefill every unit (patched keys, baselines, controls) once for its "
                   "first-token readout (P(yes), P(no), entropy) and write no rollouts: the "
                   "layer map of the sweep in minutes, with no sampling and no judge.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(
    db: str,
    sweep: str | None,
    experiments: list[str] | None,
    layers: list[int] | None,
    words: list[str] | None,
    samples: int | None,
    max_new_tokens: int | None,
    batch_size: int | None,
    device: str | None,
    dtype: str | None,
    shard: tuple[int, int] | None,
    model: str | None,
    gpus: int | None,
    gpus_per_model: int,
    share_prefix: bool,
    compile_: bool | None,
    refill: bool,
    kv_pages: bool | None,
    no_baselines: bool,
    readout_only: bool,
    quiet: bool,
) -> None:
    """Generate every missing rollout of the sweep (steered, patched target runs).

    Each unit (one key at one patch layer, all its samples) is committed in one transaction,
    so a crash loses at most the units in flight and running again fills exactly what is
    missing. Ctrl-C starts no new unit and stops once those in progress are written (exit 130);
    a second Ctrl-C stops now.

    \b
    Example:
      patchdb generate --db runs.sqlite
      patchdb generate --layers 40-44 --words Bread,Trees --batch-size 256
      patchdb generate --shard 0/2 --device cuda:0 &
      patchdb generate --shard 1/2 --device cuda:1
      patchdb generate --gpus 4        # or: torchrun --nproc-per-node 4 -m patchdb generate
      patchdb generate --sweep 'demo-dose-*'   # every sweep of a dose series
    """
    from patchdb.generate.distributed import (
        check_gpus,
        rank_options,
        torchrun_command,
        torchrun_rank,
    )
    from patchdb.generate.stage import GenerateOptions, run_generate

    if gpus is not None and gpus % gpus_per_model:
        raise ConfigError(f"--gpus {gpus} is not a multiple of --gpus-per-model {gpus_per_model}")
    if gpus is not None:
        check_gpus(gpus, device)
    if gpus is not None and gpus > gpus_per_model and torchrun_rank() is None:
        command = torchrun_command(gpus, sys.argv[1:], gpus_per_model)
        sys.exit(subprocess.call(command))
    if run_per_sweep(db, sweep):  # --sweep 'name*': each matching sweep in turn
        return

    options = GenerateOptions(
        sweep=sweep, experiments=experiments, layers=layers, words=words, samples=samples,
        max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, dtype=dtype,
        shard=shard, model=model, compile=compile_, gpus_per_model=gpus_per_model,
        share_prefix=share_prefix, baselines=not no_baselines, readout_only=readout_only,
        refill=refill, kv_pages=kv_pages,
    )
    options = rank_options(options)
    from patchdb.store import open_store  # here, not above: --help stays fast

    store = open_store(db)
    try:
        result = run_generate(store, options, progress=not quiet)
    finally:
        store.close()
    plan = result.plan
    done_before = plan.expected - len(plan.pending)
    if readout_only:
        _say_readouts(result, readout_only)
        return
    if not plan.pending:
        click.echo(f"Nothing to generate: all {plan.expected} units of sweep "
                   f"{plan.sweep_name!r} in scope are present.")
        if plan.readouts:
            _say_readouts(result, readout_only)
        return
    click.echo(
        f"Wrote {result.rollouts_written} rollouts in {result.units_written} units "
        f"({done_before + result.units_written + result.units_skipped}/{plan.expected} units "
        f"present) with "
        f"{result.model_id}, batch size {result.batch_size}"
        f"{f' ({result.kv_pages} KV pages)' if result.kv_pages else ''}: {result.tokens} tokens in "
        f"{result.seconds:.1f} s ({result.tokens_per_second:.1f} tokens/s)."
    )
    if result.units_skipped:
        click.echo(f"Skipped {result.units_skipped} units that another process wrote meanwhile.")
    _say_readouts(result, readout_only)
    if result.interrupted:
        click.echo("Interrupted: every finished unit is saved; run again to resume.", err=True)
        sys.exit(130)  # not ctx.exit: main() runs click with standalone_mode=False


def _say_readouts(result: "GenerateResult", readout_only: bool) -> None:
    """One line on the first-token readouts: how many this run wrote and how many are present."""
    plan = result.plan
    if not plan.readouts:
        if readout_only:
            click.echo(f"Nothing to read out: all {plan.readouts_expected} readouts of sweep "
                       f"{plan.sweep_name!r} in scope are present.")
        return
    present = plan.readouts_expected - len(plan.readouts) + result.readouts_written
    click.echo(f"Wrote {result.readouts_written} readouts ({present}/{plan.readouts_expected} "
               "present).")
    if result.interrupted and readout_only:
        click.echo("Interrupted: every finished batch is saved; run again to resume.", err=True)
        sys.exit(130)
