"""The comparison figure: one experiment's rates of every compared sweep on shared axes.

A word keeps its colour across sweeps (as in the sweep plot); each sweep has its own line style
and marker, and the settings in which the sweeps differ are printed above the plot. A sweep's
baselines are thin lines in its style: each word's unpatched rate in the word's colour, the
false-positive rate of its no-injection control in grey. With `ci` each member's bold lines get
their own 95% bands (patchdb.report.bands), at that member's own patch layers; lines and bands
join only a member's adjacent layers (patchdb.report.layer_runs).
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from patchdb.experiments import EXPERIMENTS, NO_STEERING
from patchdb.report.aggregate import MEAN_LABEL, ExperimentRates
from patchdb.report.bands import DEFAULT_CI_METHOD, Band, drawn, line_band
from patchdb.report.baseline_plot import CONTROL_COLOUR
from patchdb.report.compare import Comparison, describe, rows_of, shared_layers
from patchdb.report.layer_runs import fill_by_layer, plot_by_layer, rate_axis
from patchdb.report.plots import BOLD_WIDTH, PAIR_YLABEL, SINGLE_YLABEL, _colours, band_label

# Matplotlib's dash patterns for the names in compare.LINE_STYLES, in the same order.
DASHES: tuple[Any, ...] = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
REFERENCE_WIDTH = 1.0  # the baselines: thin lines across the plot
REFERENCE_ALPHA = 0.6
BAND_ALPHA = 0.12  # lighter than a sweep plot's: several members' bands overlap


def line_label(word: str, member: str) -> str:
    """The label of one drawn line: 'Bread [demo-strength4]'."""
    return f"{word} [{member}]"


def _references(ax: Axes, rates: ExperimentRates, colour_of: dict[str, Any], style: Any,
                member: str) -> None:
    """One member's baselines: each target word's unpatched rate (thin, in the word's colour)
    and the false-positive rate (grey), both in the member's line style."""
    for target, baseline in rates.baselines.items():
        if target == NO_STEERING or not baseline.n_scored or target not in colour_of:
            continue  # the unsteered target's baseline is the control, drawn below
        ax.axhline(baseline.rate, color=colour_of[target], linestyle=style,
                   linewidth=REFERENCE_WIDTH, alpha=REFERENCE_ALPHA,
                   label=line_label(f"{target} unpatched", member))
    if rates.control is not None:
        ax.axhline(rates.control.rate, color=CONTROL_COLOUR, linestyle=style,
                   linewidth=REFERENCE_WIDTH, label=line_label("false positives", member))


def compare_figure(comparison: Comparison, experiment: str, ci: bool = False,
                   ci_method: str = DEFAULT_CI_METHOD) -> Figure:
    """Draw one experiment for every member that has it: one line per member per word (and
    the mean, for single-word experiments), each at the member's own patch layers, with its
    95% band when `ci`; the differences in settings above the plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    header = [textwrap.fill(line, 120) for line in describe(comparison)[1:]]
    fig = Figure(figsize=(11, 6.5 + 0.25 * sum(h.count("\n") for h in header)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    words: list[str] = []
    for m in comparison.members:
        if experiment in m.rates:
            words += [line.label for line in rows_of(m.rates[experiment])
                      if line.label not in words and line.label != MEAN_LABEL]
    colour_of = dict(zip(words, _colours(len(words)), strict=True))
    word_handles: list[Any] = [Line2D([], [], color=colour_of[w], linewidth=BOLD_WIDTH, label=w)
                    for w in words]
    member_handles = []
    bands: list[Band] = []
    for i, m in enumerate(comparison.members):
        style, marker = DASHES[i % len(DASHES)], MARKERS[i % len(MARKERS)]
        member_handles.append(Line2D([], [], color="black", linestyle=style, marker=marker,
                                     label=m.label))
        rates = m.rates.get(experiment)
        for line in rows_of(rates) if rates is not None else []:
            mean = line.label == MEAN_LABEL
            colour = "black" if mean else colour_of[line.label]
            plot_by_layer(ax, rates.layers, line.rates,  # type: ignore[union-attr]
                          color=colour, linestyle=style, marker=marker, markersize=4,
                          linewidth=BOLD_WIDTH if mean else 1.8,
                          label=line_label(line.label, m.label))
            if ci and rates is not None and any(line is g for g in rates.groups):
                band = line_band(rates, line, ci_method)
                bands.append(band)
                if drawn(band):
                    fill_by_layer(ax, rates.layers, band.lower, band.upper, color=colour,
                                  alpha=BAND_ALPHA, linewidth=0)
        if rates is not None:
            _references(ax, rates, colour_of, style, m.label)
    if any(line.label == MEAN_LABEL for m in comparison.members if experiment in m.rates
           for line in rows_of(m.rates[experiment])):
        word_handles.append(Line2D([], [], color="black", linewidth=BOLD_WIDTH, label=MEAN_LABEL))
    if any(m.rates[experiment].baselines for m in comparison.members if experiment in m.rates):
        word_handles.append(Line2D([], [], color="dimgray", linewidth=REFERENCE_WIDTH,
                                   alpha=REFERENCE_ALPHA, label="unpatched (thin)"))
    if any(m.rates[experiment].control for m in comparison.members if experiment in m.rates):
        word_handles.append(Line2D([], [], color=CONTROL_COLOUR, linewidth=REFERENCE_WIDTH,
                                   label="false positives"))
    if bands:
        word_handles.append(Patch(color="dimgray", alpha=BAND_ALPHA * 2, linewidth=0,
                                  label=band_label(bands)))
    layers = shared_layers(comparison, experiment)
    ax.set_xlabel("Patch layer")
    ax.set_ylabel(PAIR_YLABEL if EXPERIMENTS[experiment].pairs else SINGLE_YLABEL)
    rate_axis(ax)  # 0 and 1 with a margin: lines at 0 or 1 (common when sweeps agree) show
    if layers:
        ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_title(experiment)
    legend = ax.legend(handles=word_handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       fontsize="small", title="word")
    ax.add_artist(legend)
    ax.legend(handles=member_handles, loc="lower left", bbox_to_anchor=(1.01, 0.0),
              fontsize="small", title="sweep")
    top = 1 - (0.05 + 0.035 * sum(h.count("\n") + 1 for h in header))
    fig.text(0.02, 0.99, "\n".join(header), va="top", ha="left", fontsize="small")
    fig.subplots_adjust(left=0.07, right=0.76, bottom=0.09, top=top)
    return fig
