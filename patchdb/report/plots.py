"""The sweep plot (docs/science.md, "Plots"): rate against patch layer, one per experiment.

Figures are built with the object API on the Agg canvas (no pyplot state, no display needed).
Missing rates are NaN, which matplotlib draws as a gap; every layer gets a marker, and lines
and bands join only adjacent layers (patchdb.report.layer_runs).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn, so `report --help` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from patchdb.choices import FORMATS as FORMATS  # defined there for the CLI's --help
from patchdb.report.aggregate import ExperimentRates, Line
from patchdb.report.bands import DEFAULT_CI_METHOD, Band, drawn, legend_method
from patchdb.report.baseline_plot import draw_references, group_band, shift_of
from patchdb.report.layer_findings import shade_layers
from patchdb.report.layer_runs import fill_by_layer, plot_by_layer, rate_axis
from patchdb.report.layer_test import LayerTest

PAIR_YLABEL = "Coherent & Detect+Identify Rate"
SINGLE_YLABEL = "Coherent & Detect Rate"
PAIR_ALPHA = 0.15
SINGLE_ALPHA = 0.5
BOLD_WIDTH = 2.5


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


BAND_ALPHA = 0.2


def _band(ax: Axes, layers: list[int], rates: ExperimentRates, line: Line, colour: Any,
          net: bool, ci_method: str, bands: list[Band]) -> None:
    """The bold line's 95% band, built for the mean of key rates that the line draws (with
    `net`, the band of that mean minus the false-positive rate; patchdb.report.bands)."""
    band = group_band(rates, line, net, ci_method)
    bands.append(band)
    if drawn(band):
        fill_by_layer(ax, layers, band.lower, band.upper, color=colour, alpha=BAND_ALPHA,
                      linewidth=0)


LEGEND_WIDTH = 30  # characters per line of a long legend entry


def band_label(bands: list[Band]) -> str:
    """The legend entry of a plot's bands, '95% band: Wilson-t over 8 words', on as many
    lines of LEGEND_WIDTH characters as it needs (the legend sits in a narrow margin)."""
    return textwrap.fill(f"95% band: {legend_method(bands)}", LEGEND_WIDTH)


def sweep_figure(rates: ExperimentRates, title: str, ci: bool = False, net: bool = False,
                 ci_method: str = DEFAULT_CI_METHOD, decided: LayerTest | None = None) -> Figure:
    """Draw one experiment's sweep plot; `ci` adds 95% bands around the bold lines (over
    words by default, `ci_method` "samples" for the Wilson bands over samples; the legend
    names the method; patchdb.report.bands); the baselines are dashed lines and the
    false-positive rate a grey band; `net` draws every rate minus the false-positive rate
    (patchdb.report.baselines); `decided` shades the layers its layer test flags
    (patchdb.report.layer_findings)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    layers = rates.layers
    shift = shift_of(rates, net)  # 0.0, or the false-positive rate with `net`
    bands: list[Band] = []
    if rates.pairs:
        colour_of = dict(zip([g.target_word for g in rates.groups],
                             _colours(len(rates.groups)), strict=True))
        for line in rates.keys:
            plot_by_layer(ax, layers, [r - shift for r in line.rates],
                          color=colour_of.get(line.target_word, "grey"), alpha=PAIR_ALPHA,
                          linewidth=1, markersize=3, label="_nolegend_")
        for group in rates.groups:
            colour = colour_of[group.target_word]
            plot_by_layer(ax, layers, [r - shift for r in group.rates], color=colour,
                          linewidth=BOLD_WIDTH, label=group.label)
            if ci:
                _band(ax, layers, rates, group, colour, net, ci_method, bands)
        ax.set_ylabel(PAIR_YLABEL)
    else:
        colour_of = dict(zip([line.target_word for line in rates.keys],
                             _colours(len(rates.keys)), strict=True))
        for line, colour in zip(rates.keys, _colours(len(rates.keys)), strict=True):
            plot_by_layer(ax, layers, [r - shift for r in line.rates], color=colour,
                          alpha=SINGLE_ALPHA, linewidth=1.5, label=line.label)
        for group in rates.groups:
            plot_by_layer(ax, layers, [r - shift for r in group.rates], color="black",
                          linewidth=BOLD_WIDTH, label=group.label)
            if ci:
                _band(ax, layers, rates, group, "black", net, ci_method, bands)
        ax.set_ylabel(SINGLE_YLABEL)
    draw_references(ax, rates, colour_of, shift, ci_method)
    if net:
        ax.set_ylabel(f"{ax.get_ylabel()} minus {rates.reference}")
    ax.set_xlabel("Patch layer")
    rate_axis(ax, shift)  # 0 and 1 (less the shift) with a margin, so 100% is not the frame
    if layers:
        ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if decided is not None:
        shade_layers(ax, decided)
    handles, labels = ax.get_legend_handles_labels()
    if ci and bands:
        labels.append(band_label(bands))
        handles.append(Patch(color="dimgray", alpha=BAND_ALPHA, linewidth=0))
    if handles:
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  fontsize="small")
    # Fixed margins with room for the legend on the right: tight_layout costs a full text
    # layout. A long legend entry (a band's method) gets a wider margin.
    widest = max((len(part) for label in labels for part in label.split("\n")), default=0)
    fig.subplots_adjust(left=0.08, right=max(0.55, 0.84 - 0.0065 * max(0, widest - 16)),
                        bottom=0.1, top=0.93)
    return fig


SAVE_DPI = 120
PNG_COMPRESS_LEVEL = 3  # zlib's level: a third quicker than savefig's 6, and still smaller


def save_figure(fig: Figure, path: Path) -> Path:
    """Write the figure; the format comes from the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".")
    if fmt == "png":
        _save_png(fig, path)
    else:
        fig.savefig(path, format=fmt, dpi=SAVE_DPI)
    return path


def _save_png(fig: Figure, path: Path) -> None:
    """The PNG that savefig writes, pixel for pixel (the same rendering, dpi and Software
    text), but without the alpha channel where every pixel is opaque, as the report's figures
    are: a PNG with three channels at a lower zlib level encodes in about half the time (the
    four full-size sweep plots: 0.39 s instead of 0.60 s) and is a little smaller."""
    import matplotlib
    import numpy as np
    from PIL import Image, PngImagePlugin

    dpi = fig.dpi
    fig.set_dpi(SAVE_DPI)
    try:
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())  # type: ignore[attr-defined]
    finally:
        fig.set_dpi(dpi)
    opaque = bool((pixels[..., 3] == 255).all())
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"Matplotlib version{matplotlib.__version__}, https://matplotlib.org/")
    Image.fromarray(pixels[..., :3] if opaque else pixels).save(
        path, format="png", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info,
        dpi=(SAVE_DPI, SAVE_DPI))
