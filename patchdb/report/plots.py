"""The sweep plot (docs/science.md, "Plots"): rate against patch layer, one per experiment.

Figures are built with the object API on the Agg canvas (no pyplot state, no display needed).
Missing rates are NaN, which matplotlib draws as a gap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn, so `report --help` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from patchdb.report.aggregate import ExperimentRates, Line
from patchdb.report.baseline_plot import draw_references, net_band, shift_of
from patchdb.report.stats import mean_rate_band

PAIR_YLABEL = "Coherent & Detect+Identify Rate"
SINGLE_YLABEL = "Coherent & Detect Rate"
PAIR_ALPHA = 0.15
SINGLE_ALPHA = 0.5
BOLD_WIDTH = 2.5
FORMATS = ("png", "svg", "pdf")


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _band(ax: Axes, layers: list[int], line: Line, colour: Any,
          rates: ExperimentRates | None = None) -> None:
    """The bold line's 95% band: built for the mean of key rates that the line draws (with
    `rates` given, the net band of that mean minus the false-positive rate)."""
    if rates is not None:
        lower, upper = net_band(line, rates)
    else:
        lower, upper = mean_rate_band(line.rates, line.n_effective)
    ax.fill_between(layers, lower, upper, color=colour, alpha=0.2, linewidth=0)


def sweep_figure(rates: ExperimentRates, title: str, ci: bool = False,
                 net: bool = False) -> Figure:
    """Draw one experiment's sweep plot; `ci` adds 95% bands around the bold lines (Wilson
    intervals of each mean of key rates, see patchdb.report.stats); the baselines are dashed
    lines and the false-positive rate a grey band; `net` draws every rate minus the
    false-positive rate (patchdb.report.baselines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    layers = rates.layers
    shift = shift_of(rates, net)  # 0.0, or the false-positive rate with `net`
    netted = rates if net else None
    if rates.pairs:
        colour_of = dict(zip([g.target_word for g in rates.groups],
                             _colours(len(rates.groups)), strict=True))
        for line in rates.keys:
            ax.plot(layers, [r - shift for r in line.rates],
                    color=colour_of.get(line.target_word, "grey"),
                    alpha=PAIR_ALPHA, linewidth=1, label="_nolegend_")
        for group in rates.groups:
            colour = colour_of[group.target_word]
            ax.plot(layers, [r - shift for r in group.rates], color=colour, linewidth=BOLD_WIDTH,
                    marker="o", markersize=3, label=group.label)
            if ci:
                _band(ax, layers, group, colour, netted)
        ax.set_ylabel(PAIR_YLABEL)
    else:
        colour_of = dict(zip([line.target_word for line in rates.keys],
                             _colours(len(rates.keys)), strict=True))
        for line, colour in zip(rates.keys, _colours(len(rates.keys)), strict=True):
            ax.plot(layers, [r - shift for r in line.rates], color=colour, alpha=SINGLE_ALPHA,
                    linewidth=1.5, label=line.label)
        for group in rates.groups:
            ax.plot(layers, [r - shift for r in group.rates], color="black",
                    linewidth=BOLD_WIDTH, marker="o", markersize=3, label=group.label)
            if ci:
                _band(ax, layers, group, "black", netted)
        ax.set_ylabel(SINGLE_YLABEL)
    draw_references(ax, rates, colour_of, shift)
    if net:
        ax.set_ylabel(f"{ax.get_ylabel()} minus false positives")
    ax.set_xlabel("Patch layer")
    ax.set_ylim(-shift, 1 - shift)
    if layers:
        ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    # Fixed margins with room for the legend on the right: tight_layout costs a full text layout.
    fig.subplots_adjust(left=0.08, right=0.84, bottom=0.1, top=0.93)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write the figure; the format comes from the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=path.suffix.lstrip("."), dpi=120)
    return path
