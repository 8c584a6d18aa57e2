"""The readout plot, drawn beside each experiment's sweep plot: first-token P(yes) against patch
layer, laid out as the rate plot (faint keys and bold target-word lines for the pair
experiments; a line per word and a bold black mean for the single-word ones), each target
condition's unpatched P(yes) dashed in its colour, the random-vector control's dash-dotted and
the no-injection P(yes) grey and dotted. Where the unrelated questions were asked, a second
panel draws the yes-bias index the same way around 0. Lines join only adjacent patch layers
(patchdb.report.layer_runs).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from patchdb.report.layer_runs import plot_by_layer, rate_axis
from patchdb.report.readouts import ExperimentReadouts

PAIR_ALPHA = 0.15
SINGLE_ALPHA = 0.5
BOLD_WIDTH = 2.5
YLABELS = {"p_yes": "First-token P(yes)", "yes_bias": "Yes-bias index (unrelated questions)"}


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _panel(ax: Axes, er: ExperimentReadouts, measure: str, legend: bool) -> None:
    layers = er.layers
    if er.pairs:
        colour_of = dict(zip([g.target_word for g in er.groups], _colours(len(er.groups)),
                             strict=True))
        for line in er.keys:
            plot_by_layer(ax, layers, line.values(measure),
                          color=colour_of.get(line.target_word, "grey"), alpha=PAIR_ALPHA,
                          linewidth=1, markersize=3, label="_nolegend_")
        for g in er.groups:
            plot_by_layer(ax, layers, g.values(measure), color=colour_of[g.target_word],
                          linewidth=BOLD_WIDTH, label=g.label)
    else:
        colour_of = dict(zip([k.target_word or k.source_word for k in er.keys],
                             _colours(len(er.keys)), strict=True))
        for k in er.keys:
            plot_by_layer(ax, layers, k.values(measure),
                          color=colour_of[k.target_word or k.source_word], alpha=SINGLE_ALPHA,
                          linewidth=1.5, label=k.label)
        for g in er.groups:
            plot_by_layer(ax, layers, g.values(measure), color="black", linewidth=BOLD_WIDTH,
                          label=g.label)
    span = (layers[0] - 0.5, layers[-1] + 0.5) if layers else (0.0, 1.0)
    first = {"base": True, "random": True}
    for word, point in er.baselines.items():
        value = getattr(point, measure)
        if word and not math.isnan(value):
            ax.hlines(value, *span, colors=[colour_of.get(word, "grey")], linestyles="dashed",
                      linewidth=1.2, label="unpatched" if first.pop("base", False) else "_nolegend_")
    for word, point in er.random_vector.items():
        value = getattr(point, measure)
        if not math.isnan(value):
            ax.hlines(value, *span, colors=[colour_of.get(word, "grey")], linestyles="dashdot",
                      linewidth=1, label="random vector" if first.pop("random", False) else "_nolegend_")
    control = getattr(er.control, measure, math.nan) if er.control is not None else math.nan
    if measure == "yes_bias":
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1.2, label="no injection")
    elif not math.isnan(control):
        ax.axhline(control, color="grey", linestyle=":", linewidth=1.5, label="no injection")
    ax.set_ylabel(YLABELS[measure])
    ax.set_xlim(*span)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")


def readout_figure(er: ExperimentReadouts, title: str) -> Figure:
    """One experiment's readout plot: P(yes) by patch layer, and the yes-bias index below it
    where the unrelated questions were asked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = ["p_yes"] + (["yes_bias"] if er.has_yes_bias else [])
    fig = Figure(figsize=(10, 6 if len(panels) == 1 else 9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, measure) in enumerate(zip(axes, panels, strict=True)):
        _panel(ax, er, measure, legend=i == 0)
        if measure == "p_yes":
            rate_axis(ax)  # 0 and 1 with a margin
    axes[-1].set_xlabel("Patch layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(title)
    fig.subplots_adjust(left=0.08, right=0.8, bottom=0.08, top=0.94, hspace=0.12)
    return fig
