"""`patchdb report`: sweep plots, a rate table per experiment, and the JSON export."""

from pathlib import Path

import click

from patchdb.choices import CI_METHODS, DEFAULT_CI_METHOD, FORMATS
from patchdb.cli.multi import run_per_sweep
from patchdb.cli.options import db_option, experiments_option, judge_config_option, sweep_option

# the report stage and the store are imported inside report(): --help stays fast


@click.command()
@db_option
@sweep_option
@experiments_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="PATCHDB_REPORT_OUT",
              help="Folder that gets one sub-folder per experiment "
                   "(default: ./patchdb_report/<sweep>; a folder holding another store's "
                   "report is refused; env PATCHDB_REPORT_OUT).")
@click.option("--export-json", is_flag=True, envvar="PATCHDB_EXPORT_JSON",
              help="Also write the JSON layout users' scripts read (rollouts, judgments, "
                   "scores; env PATCHDB_EXPORT_JSON).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="png", show_default=True,
              envvar="PATCHDB_REPORT_FORMAT", help="Plot file format (env PATCHDB_REPORT_FORMAT).")
@click.option("--ci", is_flag=True, envvar="PATCHDB_REPORT_CI",
              help="Draw 95% bands around the bold lines and print them in the tables "
                   "(env PATCHDB_REPORT_CI).")
@click.option("--ci-method", type=click.Choice(CI_METHODS), default=DEFAULT_CI_METHOD,
              show_default=True, envvar="PATCHDB_REPORT_CI_METHOD",
              help="How every band is made: 'words' from the spread between words (the words "
                   "are what a claim generalises over; docs/statistics.md), 'samples' the "
                   "Wilson bands that take each sample as independent, far too narrow, kept "
                   "for comparison (env PATCHDB_REPORT_CI_METHOD).")
@click.option("--net", is_flag=True, envvar="PATCHDB_REPORT_NET",
              help="Plot each rate minus the false-positive rate of the no-injection control "
                   "into sweep_plot_net.<format> (sweep_plot is left as it is) and print that "
                   "net table under each rate table (bands: Newcombe's interval of the "
                   "difference; env PATCHDB_REPORT_NET).")
@click.option("--against", type=click.Choice(["control", "random_vector"]), default="control",
              show_default=True, envvar="PATCHDB_REPORT_AGAINST",
              help="What --net subtracts: the no-injection control's false positives, or each "
                   "experiment's random-vector rate (the claims any push of that size causes; "
                   "drawn into sweep_plot_net_random_vector.<format>; needs [sweep] controls = "
                   "[\"random_vector\"]; env PATCHDB_REPORT_AGAINST).")
@click.option("--json", "rates_json", is_flag=True, envvar="PATCHDB_REPORT_JSON",
              help="Also write rates.json beside the plots: every drawn rate with its 95% band, "
                   "method and counts, and readouts.json with the first-token readouts "
                   "(docs/schema.md; env PATCHDB_REPORT_JSON).")
@judge_config_option
@click.option("--html", is_flag=True, envvar="PATCHDB_REPORT_HTML",
              help="Also write an HTML report and print its path (env PATCHDB_REPORT_HTML).")
@click.option("--corrected", is_flag=True, envvar="PATCHDB_REPORT_CORRECTED",
              help="Also draw the rates corrected for the judge's errors, calibrated on the "
                   "labels of `patchdb label`, with 95% bands over words and labels (env "
                   "PATCHDB_REPORT_CORRECTED).")
@click.option("--correction", type=click.Choice(["ppi", "rogan-gladen"]), default="ppi",
              show_default=True, envvar="PATCHDB_REPORT_CORRECTION",
              help="How --corrected corrects: 'ppi', prediction-powered (PPI++) per experiment "
                   "and layer from that layer's labels, or 'rogan-gladen', one TPR and TNR of "
                   "the judge for every layer (docs/labels.md; env PATCHDB_REPORT_CORRECTION).")
@click.option("--compare", is_flag=True,
              help="Compare the sweeps given as arguments (names, globs, or SWEEP@judge=ID for "
                   "a sweep under one judge config): one figure per experiment on shared axes, "
                   "one line style per sweep, their differences in settings printed above it.")
@click.argument("compared", nargs=-1)
def report(db: str, sweep: str | None, experiments: list[str] | None, out_dir: Path | None,
           export_json: bool, fmt: str, ci: bool, ci_method: str, net: bool, against: str,
           rates_json: bool,
           judge_config: int | None, html: bool, corrected: bool, correction: str, compare: bool,
           compared: tuple[str, ...]) -> None:
    """Plot rate against patch layer for each experiment, print a rate table per experiment,
    and optionally export the sweep in the JSON layout (docs/schema.md) under the same folder.

    --sweep takes a glob ('demo-dose-*') to report every matching sweep, each in its own folder.
    With --compare, the sweeps given as arguments are drawn together (docs/compare.md).

    \b
    Example:
      patchdb report --db runs.sqlite
      patchdb report --experiments failure_to_success --format svg --ci
      patchdb report --ci --json
      patchdb report --export-json --out patching_layer_sweep
      patchdb report --compare demo-dose-strength4 demo-dose-strength8 --html
      patchdb report --compare 'demo-dose-*'
      patchdb report --compare demo@judge=1 demo@judge=2
    """
    from patchdb.report import build_report, write_report_json
    from patchdb.report.export import safe_component
    from patchdb.report.rates_json import Corrected
    from patchdb.store import open_store

    if against != "control" and not net:
        raise click.UsageError("--against says what --net subtracts; give --net with it")
    if compare or compared:
        from patchdb.cli.compare_cli import report_compare

        report_compare(db, list(compared), compare, sweep=sweep, experiments=experiments,
                       out_dir=out_dir, export_json=export_json, fmt=fmt, ci=ci,
                       ci_method=ci_method, rates_json=rates_json, judge_config=judge_config,
                       html=html, corrected=corrected, net=net)
        return
    # a glob: each sweep in its own folder, ./patchdb_report/<sweep> or --out/<sweep>
    if run_per_sweep(db, sweep, lambda name: {"out_dir": None if out_dir is None
                                              else out_dir / safe_component(name)}):
        return
    store = open_store(db)
    try:
        from patchdb.report.folder_owner import claim_report_folder

        # refuse a folder holding another store's report of a sweep with the same name
        out_dir = claim_report_folder(store, sweep, out_dir)
        result = build_report(store, sweep, experiments, out_dir, fmt, ci, export_json,
                              judge_config, net=net, ci_method=ci_method, against=against)
        from patchdb.report.corrected_plot import corrected_report

        corrected_bands: Corrected = {}
        corrected_lines = corrected_report(store, result, fmt, correction,
                                           collect=corrected_bands) if corrected else []
        html_path = None
        if html:
            from patchdb.report.html import write_html_report

            html_path = write_html_report(store, result.sweep, result.out_dir,
                                          judge_config_id=judge_config, ci_method=ci_method,
                                          report=result)
        json_path = write_report_json(result, corrected_bands if corrected else None) \
            if rates_json else None
    finally:
        store.close()
    click.echo(f"Sweep {result.sweep}: rates from {result.judge.why}.")
    for exp in result.experiments:
        click.echo("")
        click.echo(exp.table)
        click.echo(f"Plot: {exp.plot}")
        if exp.readout_plot is not None:
            click.echo(f"Readout plot: {exp.readout_plot}")
        if exp.exported:
            click.echo(f"JSON: {len(exp.exported)} files under {exp.plot.parent}")
    if html_path is not None:
        click.echo("")
        click.echo(f"HTML report: {html_path}")
    for line in corrected_lines:
        click.echo(line)
    if json_path is not None:
        click.echo("")
        click.echo(f"Rates with their 95% bands: {json_path}")
