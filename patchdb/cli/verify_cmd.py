"""`patchdb verify`: check the generation machinery on this model and device, one line a check."""

import sys

import click

from patchdb.cli.options import db_option, device_option, sweep_option
from patchdb.config import DTYPES


@click.command()
@db_option
@sweep_option
@device_option
@click.option("--dtype", type=click.Choice(DTYPES), envvar="PATCHDB_DTYPE",
              help="Model dtype (default: the sweep's).")
@click.option("--model", envvar="PATCHDB_MODEL",
              help="Load this model spec instead of the sweep's (e.g. a local copy of it).")
@click.option("--tokens", type=click.IntRange(min=2, max=256), default=16, show_default=True,
              envvar="PATCHDB_VERIFY_TOKENS", help="Greedy tokens each check generates.")
@click.option("--compile/--no-compile", "compile_", default=None, envvar="PATCHDB_COMPILE",
              help="Compile the decode step the decode-path check compares (default: on GPUs, "
                   "as a full sweep runs).")
def verify(db: str, sweep: str | None, device: str | None, dtype: str | None, model: str | None,
           tokens: int, compile_: bool | None) -> None:
    """Check that steering, patching, batching, the fast decode and the first-token readout do
    what docs/science.md says, on the sweep's model and this device (greedy, about a minute).

    One line per check, pass or fail: steering reaches every prompt position from the injection
    start and every generated token; a row's answer does not depend on the rows beside it;
    patching a unit with its own source run changes nothing; the decode path the sweep uses
    (CUDA graphs, compiled) gives the eager decode's answers; the readout equals a plain
    forward's first-token probabilities. Exits 1 if any check fails. Writes nothing.

    \b
    Example:
      patchdb verify --db runs.sqlite
      patchdb verify --db runs.sqlite --device cuda:1 --tokens 32
    """
    from patchdb.generate.loading import default_device
    from patchdb.generate.verify import VerifyOptions, run_verify

    on_gpu = (device or default_device()).startswith("cuda")
    options = VerifyOptions(sweep=sweep, device=device, dtype=dtype, model=model, tokens=tokens,
                            compile=on_gpu if compile_ is None else compile_)
    from patchdb.store import open_store  # here, not above: --help stays fast

    store = open_store(db)
    try:
        result = run_verify(store, options)
    finally:
        store.close()
    click.echo(f"Verifying sweep {result.sweep!r} with {result.model_id} on {result.device} "
               f"({result.dtype}): words {result.words[0]} and {result.words[1]}, patch layer "
               f"{result.patch_layer}, {tokens} greedy tokens.")
    for check in result.checks:
        click.echo(f"{check.outcome:<4}  {check.name:<12} {check.detail} ({check.seconds:.1f} s)")
    counts = {o: sum(c.outcome == o for c in result.checks) for o in ("pass", "skip", "fail")}
    click.echo(f"{len(result.checks)} checks: {counts['pass']} passed, {counts['skip']} skipped, "
               f"{counts['fail']} failed, in {result.seconds:.1f} s.")
    if result.failed:
        sys.exit(1)
