"""`report --corrected`: per experiment, the bold lines corrected for the judge's errors with
their 95% bands over words, drawn over the raw lines, and a table of both. The correction is
PPI++ per layer (patchdb.report.ppi) or, with `--correction rogan-gladen`, Rogan-Gladen
(patchdb.report.corrected)."""

import math
import textwrap
from dataclasses import dataclass

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from patchdb.errors import CalibrationError
from patchdb.report import Report
from patchdb.report.aggregate import ExperimentRates, Line
from patchdb.report.corrected import (
    DRAWS,
    SEED,
    ScoreCalibration,
    rogan_gladen_lines,
    score_calibration,
    strata_counts,
)
from patchdb.report.export import inside
from patchdb.report.layer_runs import fill_by_layer, plot_by_layer, rate_axis
from patchdb.report.plots import LEGEND_WIDTH, PAIR_YLABEL, SINGLE_YLABEL, save_figure
from patchdb.report.ppi import LineBands, StrataCounts, power_tuning, ppi_lines
from patchdb.report.rates_json import Corrected
from patchdb.store import Store
from patchdb.store.sweeps import get_experiments, get_sweep

CORRECTIONS = ("ppi", "rogan-gladen")


@dataclass(frozen=True)
class Band:
    """One layer of a corrected line: the estimate, its band, and why it is n/a ("" if not)."""

    estimate: float
    lower: float
    upper: float
    reason: str = ""


def aligned(rates: ExperimentRates, counts: StrataCounts | None,
            lines: list[LineBands]) -> list[list[Band]]:
    """The corrected lines placed on the report's layers and in its line order (a layer or a
    line the counts lack is n/a)."""
    by_label = {line.label: line for line in lines}
    at = {layer: i for i, layer in enumerate(counts.layers)} if counts else {}
    out = []
    for group in rates.groups:
        line = by_label.get(_line_label(rates, group))
        row = []
        for layer in rates.layers:
            i = at.get(layer)
            if line is None or i is None:
                row.append(Band(math.nan, math.nan, math.nan, "n/a: nothing scored"))
            else:
                row.append(Band(float(line.estimate[i]), float(line.lower[i]),
                                float(line.upper[i]), line.reasons[i]))
        out.append(row)
    return out


def _line_label(rates: ExperimentRates, group: Line) -> str:
    return group.target_word if rates.pairs else ""


def _labels(counts: StrataCounts) -> list[str]:
    return list(counts.targets) if counts.pairs else [""]


def corrected_figure(rates: ExperimentRates, bands: list[list[Band]], title: str,
                     method: str) -> Figure:
    """Raw bold lines dashed and thin; corrected ones bold, with their 95% bands; the legend
    names how the bands were made."""
    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    layers = rates.layers
    palette = colormaps["tab10"]
    for i, (group, line_bands) in enumerate(zip(rates.groups, bands, strict=True)):
        colour = "black" if not rates.pairs else palette(i % 10)
        plot_by_layer(ax, layers, group.rates, color=colour, linestyle="--", linewidth=1,
                      alpha=0.6, markersize=3, label="_nolegend_")
        plot_by_layer(ax, layers, [b.estimate for b in line_bands], color=colour,
                      linewidth=2.5, label=group.label)
        fill_by_layer(ax, layers, [b.lower for b in line_bands], [b.upper for b in line_bands],
                      color=colour, alpha=0.2, linewidth=0)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1))
    labels.append("raw (judge as is)")
    handles.append(Patch(color="grey", alpha=0.2, linewidth=0))
    labels.append(textwrap.fill(f"95% band: {method}", LEGEND_WIDTH))  # fits the margin
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    ax.set_ylabel((PAIR_YLABEL if rates.pairs else SINGLE_YLABEL) + ", corrected")
    ax.set_xlabel("Patch layer")
    rate_axis(ax)
    if layers:
        ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.08, right=0.74, bottom=0.1, top=0.93)
    return fig


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{round(100 * value)}"


def _cell(layer: int, raw: float, b: Band) -> str:
    if math.isnan(b.estimate):
        return f"{layer}: {_percent(raw)} -> -"
    if math.isnan(b.lower):
        return f"{layer}: {_percent(raw)} -> {_percent(b.estimate)} [n/a]"
    return (f"{layer}: {_percent(raw)} -> {_percent(b.estimate)} "
            f"[{_percent(b.lower)}, {_percent(b.upper)}]")


def corrected_table(rates: ExperimentRates, bands: list[list[Band]]) -> str:
    """Per bold line: the raw rate and the corrected rate [95% band] at each layer, in %; then
    why a layer has no corrected rate or no band."""
    lines = [f"{rates.name}, corrected: rate in % by patch layer, raw -> corrected [95% band]"]
    why: dict[str, list[str]] = {}
    for group, line_bands in zip(rates.groups, bands, strict=True):
        cells = [_cell(layer, raw, b)
                 for layer, raw, b in zip(rates.layers, group.rates, line_bands, strict=True)]
        lines.append(f"  {group.label}: " + "; ".join(cells))
        for layer, b in zip(rates.layers, line_bands, strict=True):
            if b.reason:
                why.setdefault(b.reason, []).append(f"{group.label} {layer}")
    for reason, places in why.items():
        lines.append(f"  {reason} at {', '.join(places)}")
    return "\n".join(lines)


def correct(counts: dict[str, StrataCounts], correction: str, lam: float,
            calibration: ScoreCalibration | None, draws: int = DRAWS,
            seed: int = SEED) -> dict[str, list[LineBands]]:
    """Every experiment's corrected lines by one method."""
    out = {}
    for name, c in counts.items():
        if correction == "rogan-gladen":
            assert calibration is not None
            out[name] = rogan_gladen_lines(c, calibration, _labels(c), draws, seed)
        else:
            out[name] = ppi_lines(c, lam, _labels(c), draws, seed)
    return out


def corrected_report(store: Store, report: Report, fmt: str, correction: str = "ppi",
                     collect: Corrected | None = None) -> list[str]:
    """Correct every experiment of a built report; return the lines `report` prints, and put
    each experiment's (method, bands per bold line and layer) into `collect` (for rates.json).
    Refuses (CalibrationError) where the labels cannot support a correction."""
    if report.judge.id is None:
        raise CalibrationError("cannot correct: the sweep has no judgments yet")
    out: list[str] = []
    counts: dict[str, StrataCounts] = {}
    lines: dict[str, list[LineBands]] = {}
    with store.read() as session:
        sweep = get_sweep(session, report.sweep)
        graders = {e.name: e.detection_grader for e in get_experiments(session, sweep)}
        for grader in sorted({graders[e.name] for e in report.experiments}):
            what = f"the rates of the {grader} experiments"
            mine = strata_counts(session, sweep, grader, report.judge.id)
            labeled = sum(int(c.labeled.sum()) for c in mine.values())
            calibration = None
            lam = math.nan
            if correction == "rogan-gladen":
                calibration = score_calibration(session, sweep, grader, report.judge.id)
                calibration.check(what)
                out.append(_rogan_gladen_line(grader, report.judge.id, calibration))
            else:
                if labeled == 0:
                    raise CalibrationError(
                        f"cannot correct {what}: none of their scored rollouts has a hand "
                        "label for both graders; label some with `patchdb label`")
                lam = power_tuning(list(mine.values()))
                out.append(_ppi_line(grader, report.judge.id, mine, lam))
            wanted = {e.name for e in report.experiments if e.name in mine}
            counts.update({n: c for n, c in mine.items() if n in wanted})
            lines.update(correct({n: mine[n] for n in wanted}, correction, lam, calibration))
    method = ("Rogan-Gladen" if correction == "rogan-gladen" else "PPI++") + \
        ", bootstrap over words and labels, Wilson-t"
    for exp in report.experiments:
        bands = aligned(exp.rates, counts.get(exp.name), lines.get(exp.name, []))
        if collect is not None:
            collect[exp.name] = (method, bands)
        title = f"{exp.name} (sweep {report.sweep}), corrected for judge errors"
        path = exp.plot.with_name(f"sweep_plot_corrected.{fmt}")
        save_figure(corrected_figure(exp.rates, bands, title, method),
                    inside(report.out_dir, path))
        out += ["", corrected_table(exp.rates, bands), f"Corrected plot: {path}"]
    return out


def _rogan_gladen_line(grader: str, judge_id: int, c: ScoreCalibration) -> str:
    se, sp = c.se_sp
    return (f"Correction for the {grader} experiments (judge config #{judge_id}): Rogan-Gladen, "
            f"{c.judged_yes} labeled scores the judge said YES to ({c.judged_yes_true} true), "
            f"{c.judged_no} it said NO to ({c.judged_no_true} true); score TPR {se:.2f}, "
            f"TNR {sp:.2f} at every layer; bands over words and labels, bootstrap {DRAWS} "
            f"draws, seed {SEED}.")


def _ppi_line(grader: str, judge_id: int, counts: dict[str, StrataCounts], lam: float) -> str:
    yes = sum(int(c.labeled[..., 1].sum()) for c in counts.values())
    yes_true = sum(int(c.labeled_true[..., 1].sum()) for c in counts.values())
    no = sum(int(c.labeled[..., 0].sum()) for c in counts.values())
    no_true = sum(int(c.labeled_true[..., 0].sum()) for c in counts.values())
    return (f"Correction for the {grader} experiments (judge config #{judge_id}): PPI++ per "
            f"experiment and layer, lambda {lam:.2f}; {yes + no} labeled scores ({yes} the judge "
            f"detected, {yes_true} true; {no} it did not, {no_true} true); bands over words and "
            f"labels, bootstrap {DRAWS} draws, seed {SEED}.")

