"""The report stage: rates from the store's views, the sweep plots, the table and the JSON
layout users' scripts read (`export`), and the import of that layer (`importer`)."""

from dataclasses import dataclass, field
from pathlib import Path

from patchdb.controls import RANDOM_VECTOR
from patchdb.report.against import net_against_random_vector
from patchdb.report.aggregate import ExperimentRates, JudgeChoice, sweep_rates
from patchdb.report.bands import DEFAULT_CI_METHOD, check_method
from patchdb.report.export import export_experiment, inside, safe_component
from patchdb.report.gc_pause import without_cyclic_gc
from patchdb.report.layer_findings import decide, layer_test_block
from patchdb.report.layer_test import LayerTest
from patchdb.report.net import net_plot_name, net_table
from patchdb.report.plots import FORMATS, save_figure, sweep_figure
from patchdb.report.rates_json import Corrected, sweep_rows, write_rates_json
from patchdb.report.readout_export import export_readouts, write_readouts_json
from patchdb.report.readout_plot import readout_figure
from patchdb.report.readouts import ExperimentReadouts, readout_table, sweep_readouts
from patchdb.report.tables import experiment_table
from patchdb.store import Store
from patchdb.store.sweeps import get_experiments, get_sweep, sweep_config

DEFAULT_REPORT_DIR = Path("patchdb_report")


@dataclass
class ExperimentReport:
    name: str
    plot: Path
    table: str
    rates: ExperimentRates
    exported: list[Path] = field(default_factory=list)
    layer_test: LayerTest | None = None  # where the rate differs from its baselines
    readouts: ExperimentReadouts | None = None  # first-token readouts, where there are any
    readout_plot: Path | None = None


@dataclass
class Report:
    sweep: str
    out_dir: Path
    judge: JudgeChoice
    experiments: list[ExperimentReport]
    ci_method: str = DEFAULT_CI_METHOD
    net: bool = False


def default_out_dir(sweep_name: str) -> Path:
    """./patchdb_report/<sweep>/, the sweep name made safe as a folder name."""
    return DEFAULT_REPORT_DIR / safe_component(sweep_name)


@without_cyclic_gc  # patchdb.report.gc_pause: many objects that live till the end
def build_report(
    store: Store,
    sweep_name: str | None = None,
    experiments: list[str] | None = None,
    out_dir: Path | None = None,
    fmt: str = "png",
    ci: bool = False,
    export_json: bool = False,
    judge_config_id: int | None = None,
    net: bool = False,
    ci_method: str = DEFAULT_CI_METHOD,
    against: str = "control",
) -> Report:
    """Aggregate, plot (and optionally export) each experiment under out_dir/<experiment>/;
    `net` plots every rate minus the false-positive rate (patchdb.report.baselines), or minus
    the random-vector rate `against` it, into its own file with its own table
    (patchdb.report.net); bands
    (with `ci`, and in the tables) are over words, or over samples with `ci_method`
    "samples" (patchdb.report.bands)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    check_method(ci_method)
    with store.read() as session:
        sweep = get_sweep(session, sweep_name)
        config = sweep_config(sweep)
        rows = get_experiments(session, sweep, experiments)
        judge, all_rates = sweep_rates(session, sweep, config, [e.name for e in rows],
                                       judge_config_id)
        if net and against == RANDOM_VECTOR:  # patchdb.report.against
            net_against_random_vector(session, sweep.name, config, judge.id, all_rates)
        readouts = sweep_readouts(session, sweep.name, config, [e.name for e in rows])
        base = out_dir if out_dir is not None else default_out_dir(sweep.name)
        reports: list[ExperimentReport] = []
        for experiment, rates, er in zip(rows, all_rates, readouts, strict=True):
            title = f"{experiment.name} (sweep {sweep.name}, steer layer {config.steer_layer})"
            decided = decide(rates)  # the layer test (patchdb.report.layer_test)
            figure = sweep_figure(rates, title, ci=ci, net=net, ci_method=ci_method,
                                  decided=decided[0] if decided else None)
            # --net draws under its own name and leaves sweep_plot.<fmt> as it is
            name = net_plot_name(against, fmt) if net else f"sweep_plot.{fmt}"
            plot = save_figure(figure, inside(base, base / experiment.name / name))
            table = experiment_table(rates, ci, ci_method)
            if decided:
                table += "\n" + layer_test_block(*decided)
            if net:  # what the net plot draws, under the rates as they are
                table += "\n\n" + net_table(rates, ci_method)
            report = ExperimentReport(experiment.name, plot, table, rates,
                                      layer_test=decided[0] if decided else None)
            if not er.empty:  # the readout plot beside the sweep plot, its table under the rates
                report.readouts = er
                report.readout_plot = save_figure(readout_figure(er, title), inside(
                    base, base / experiment.name / f"readout_plot.{fmt}"))
                report.table += "\n\n" + readout_table(er)
            if export_json:
                report.exported = export_experiment(session, experiment, config, rates,
                                                     judge.id, base)
                report.exported += export_readouts(er, base)
            reports.append(report)
    return Report(sweep.name, base, judge, reports, ci_method, net)


def write_report_json(report: Report, corrected: Corrected | None = None) -> Path:
    """Write the report's `rates.json` beside its plots (patchdb.report.rates_json): every bold
    line, baseline and the control with its band, net values with `net`, and corrected ones
    where `corrected` gives them."""
    rows = sweep_rows(report.sweep, report.judge.id, [e.rates for e in report.experiments],
                      report.ci_method, report.net, corrected)
    write_readouts_json(report.out_dir, [e.readouts for e in report.experiments if e.readouts])
    return write_rates_json(report.out_dir, rows, report.ci_method, report.net,
                            corrected is not None)
