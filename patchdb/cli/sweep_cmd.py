"""`patchdb sweep`: the whole pipeline, resumable, in one command."""

import sys
from pathlib import Path

import click

from patchdb.cli.options import (
    db_option,
    device_option,
    experiments_option,
    layers_option,
    narrowing_options,
)
from patchdb.configs import config_option_help, resolve_series


@click.command()
@click.option("--config", "config_name", envvar="PATCHDB_CONFIG", default=None,
              help=config_option_help())
@db_option
@experiments_option
@layers_option
@narrowing_options
@device_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="PATCHDB_REPORT_OUT", help="Report folder (default ./patchdb_report/<sweep>).")
@click.option("--no-html", is_flag=True, help="Skip the HTML report.")
@click.option("--no-baselines", is_flag=True, envvar="PATCHDB_NO_BASELINES",
              help="Skip the baselines (each target condition generated with no patch; the "
                   "unsteered one is the no-injection control).")
def sweep(config_name: str | None, db: str, experiments: list[str] | None,
          layers: list[int] | None, words: list[str] | None, samples: int | None,
          max_new_tokens: int | None, device: str | None, out_dir: Path | None,
          no_html: bool, no_baselines: bool) -> None:
    """Run generate, judge and report in order. Each resumes: a second run does no new work.

    \b
    Example:
      patchdb sweep --config demo --db demo.sqlite
      patchdb sweep --config sweep.toml --layers 40-44
      patchdb sweep --config demo-dose --db demo.sqlite   # two strengths, then compared

    A config with a list for strength or steer_layer (a dose series) runs each of its sweeps
    in turn, then draws them together (`report --compare`) in ./patchdb_report/<name>.
    """
    from patchdb.cli.sweep_series import run_series, series_member  # here: --help stays fast
    from patchdb.store import open_store
    from patchdb.sweep import SweepInterrupted, SweepOptions, run_sweep

    series = resolve_series(config_name)
    config = series_member(series)
    if config is None:  # a dose series: each of its sweeps in turn, then the comparison
        run_series(series, db, out_dir, not no_html, experiments)
        return
    store = open_store(db, create=True)
    try:
        result = run_sweep(store, config, SweepOptions(
            experiments=experiments, layers=layers, words=words, samples=samples,
            max_new_tokens=max_new_tokens, device=device, out_dir=out_dir, html=not no_html,
            baselines=not no_baselines,
        ))
    except SweepInterrupted as exc:
        click.echo(f"Interrupted during {exc.stage}: what finished is saved and no later stage "
                   "ran; run `patchdb sweep` again to resume.", err=True)
        sys.exit(130)  # not ctx.exit: main() runs click with standalone_mode=False
    finally:
        store.close()
    gen = result.generated
    if gen is not None:
        click.echo(f"generate: {gen.rollouts_written} new rollouts"
                   + (f" ({gen.tokens_per_second:.1f} tok/s)" if gen.rollouts_written else "")
                   + (f", {gen.readouts_written} first-token readouts" if gen.readouts_written
                      else ""))
    j = result.judged
    if j is not None and not j.nothing_pending:
        click.echo(f"judge: {j.calls} judgments ({j.yes} yes, {j.no} no, {j.unparsed} unparsed, "
                   f"{j.errors} errors), ${j.cost:.4f}")
    else:
        click.echo("judge: nothing missing")
    assert result.report is not None
    click.echo(f"Rates from {result.report.judge.why}.")
    for exp in result.report.experiments:
        click.echo("")
        click.echo(exp.table)
    click.echo("")
    click.echo(f"Store:  {store.where}")
    click.echo(f"Plots:  {result.report.out_dir}")
    for exp in result.report.experiments:
        click.echo(f"  {exp.plot}")
    if result.html_path is not None:
        click.echo(f"HTML:   {result.html_path}")
