"""`patchdb report --compare`: check the options, draw the comparison, print what it shows."""

from pathlib import Path

import click

from patchdb.store import open_store

# report options that read or write one sweep: refused with --compare, each by its flag
_ONE_SWEEP = {"sweep": "--sweep", "export_json": "--export-json",
              "judge_config": "--judge-config", "corrected": "--corrected", "net": "--net"}


def report_compare(db: str, compared: list[str], compare: bool, *, experiments: list[str] | None,
                   out_dir: Path | None, fmt: str, html: bool, ci: bool, ci_method: str,
                   rates_json: bool, **one_sweep: object) -> None:
    """Run `report --compare A B ...` and print the differences, a table per experiment and
    where the figures (and the page, and rates.json) are; `ci` draws each member's bands."""
    if not compare:
        listed = " ".join(compared)
        raise click.ClickException(f"sweep names as arguments ({listed}) need --compare; "
                                   "to report one sweep use --sweep NAME")
    for name, flag in _ONE_SWEEP.items():
        if one_sweep.get(name) not in (None, False):
            hint = " (use SWEEP@judge=ID)" if name == "judge_config" else ""
            raise click.ClickException(f"{flag} does not apply to --compare{hint}")
    from patchdb.report.compare import describe
    from patchdb.report.compare_run import run_compare

    store = open_store(db)
    try:
        result = run_compare(store, compared, experiments, out_dir, fmt, html, ci=ci,
                             ci_method=ci_method, rates_json=rates_json)
    finally:
        store.close()
    for line in describe(result.comparison):
        click.echo(line)
    for experiment in result.comparison.experiments:
        click.echo("")
        click.echo(result.tables[experiment])
        if experiment in result.plots:
            click.echo(f"Plot: {result.plots[experiment]}")
    if result.html is not None:
        click.echo("")
        click.echo(f"HTML comparison: {result.html}")
    if result.rates_json is not None:
        click.echo("")
        click.echo(f"Rates with their 95% bands: {result.rates_json}")
