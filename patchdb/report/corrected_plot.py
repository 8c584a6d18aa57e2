"""`report --corrected`: per experiment, the bold lines corrected for the judge's errors with
their bootstrap 95% bands, drawn over the raw lines, and a table of both."""

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from patchdb.errors import CalibrationError
from patchdb.report import Report
from patchdb.report.aggregate import ExperimentRates, Line
from patchdb.report.corrected import (
    DRAWS,
    SEED,
    Band,
    ScoreCalibration,
    corrected_band,
    score_calibration,
)
from patchdb.report.export import inside
from patchdb.report.plots import PAIR_YLABEL, SINGLE_YLABEL, save_figure
from patchdb.store import Store
from patchdb.store.sweeps import get_experiments, get_sweep


def members(rates: ExperimentRates, group: Line) -> list[Line]:
    """The keys a bold line averages: one target word's pairs, or every word."""
    if rates.pairs:
        return [k for k in rates.keys if k.target_word == group.target_word]
    return list(rates.keys)


def corrected_lines(rates: ExperimentRates, make_band: "BandMaker") -> list[list[Band]]:
    """Per bold line, per layer: the corrected rate and its band."""
    out = []
    for group in rates.groups:
        keys = members(rates, group)
        out.append([make_band([k.successes[i] for k in keys], [k.n_scored[i] for k in keys])
                    for i in range(len(rates.layers))])
    return out


class BandMaker:
    """Bands for one calibration, drawn from one seeded generator."""

    def __init__(self, calibration: ScoreCalibration, seed: int = SEED) -> None:
        self.calibration = calibration
        self.rng = np.random.default_rng(seed)

    def __call__(self, successes: list[int], n: list[int]) -> Band:
        return corrected_band(successes, n, self.calibration, self.rng)


def corrected_figure(rates: ExperimentRates, bands: list[list[Band]], title: str) -> Figure:
    """Raw bold lines dashed and thin; corrected ones bold, with their 95% bands."""
    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    layers = rates.layers
    palette = colormaps["tab10"]
    for i, (group, line_bands) in enumerate(zip(rates.groups, bands, strict=True)):
        colour = "black" if not rates.pairs else palette(i % 10)
        ax.plot(layers, group.rates, color=colour, linestyle="--", linewidth=1, alpha=0.6,
                label="_nolegend_")
        ax.plot(layers, [b.estimate for b in line_bands], color=colour, linewidth=2.5,
                marker="o", markersize=3, label=group.label)
        ax.fill_between(layers, [b.lower for b in line_bands], [b.upper for b in line_bands],
                        color=colour, alpha=0.2, linewidth=0)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1))
    labels.append("raw (judge as is)")
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    ax.set_ylabel((PAIR_YLABEL if rates.pairs else SINGLE_YLABEL) + ", corrected")
    ax.set_xlabel("Patch layer")
    ax.set_ylim(0, 1)
    if layers:
        ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.08, right=0.80, bottom=0.1, top=0.93)
    return fig


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{round(100 * value)}"


def corrected_table(rates: ExperimentRates, bands: list[list[Band]]) -> str:
    """Per bold line: the raw rate and the corrected rate [95% band] at each layer, in %."""
    lines = [f"{rates.name}, corrected: rate in % by patch layer, raw -> corrected [95% band]"]
    for group, line_bands in zip(rates.groups, bands, strict=True):
        cells = [f"{layer}: {_percent(raw)} -> {_percent(b.estimate)} "
                 f"[{_percent(b.lower)}, {_percent(b.upper)}]"
                 for layer, raw, b in zip(rates.layers, group.rates, line_bands, strict=True)]
        lines.append(f"  {group.label}: " + "; ".join(cells))
    return "\n".join(lines)


def corrected_report(store: Store, report: Report, fmt: str) -> list[str]:
    """Correct every experiment of a built report; return the lines `report` prints.
    Refuses (CalibrationError) where the labels cannot support a correction."""
    if report.judge.id is None:
        raise CalibrationError("cannot correct: the sweep has no judgments yet")
    out: list[str] = []
    with store.read() as session:
        sweep = get_sweep(session, report.sweep)
        graders = {e.name: e.detection_grader for e in get_experiments(session, sweep)}
        calibrations = {}
        for grader in sorted({graders[e.name] for e in report.experiments}):
            calibration = score_calibration(session, sweep, grader, report.judge.id)
            calibration.check(f"the rates of the {grader} experiments")
            calibrations[grader] = calibration
    for grader, c in calibrations.items():
        se, sp = c.se_sp
        out.append(f"Correction for the {grader} experiments (judge config #{report.judge.id}): "
                   f"{c.judged_yes} labeled scores the judge said YES to ({c.judged_yes_true} "
                   f"true), {c.judged_no} it said NO to ({c.judged_no_true} true); score TPR "
                   f"{se:.2f}, TNR {sp:.2f}; bootstrap {DRAWS} draws, seed {SEED}.")
    for exp in report.experiments:
        bands = corrected_lines(exp.rates, BandMaker(calibrations[graders[exp.name]]))
        title = f"{exp.name} (sweep {report.sweep}), corrected for judge errors"
        path = exp.plot.with_name(f"sweep_plot_corrected.{fmt}")
        save_figure(corrected_figure(exp.rates, bands, title), inside(report.out_dir, path))
        out += ["", corrected_table(exp.rates, bands), f"Corrected plot: {path}"]
    return out
