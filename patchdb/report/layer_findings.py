"""The layer test in words and on a plot: the lines the report prints, and the shading of the
layers that differ (patchdb.report.layer_test computes them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from patchdb.report.layer_test import LayerTest, runs, span

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    from matplotlib.axes import Axes

SHADE_COLOUR = "#f2b705"
SHADE_ALPHA = 0.2
SHADE_LABEL = "layers that differ from baseline (cluster permutation test)"
REFERENCE = "the unpatched baseline"


def format_p(p: float) -> str:
    """'p = 0.004', or 'p < 0.001'."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _layers(layers: list[int] | tuple[int, ...]) -> str:
    return f"layer {span(layers)} differs" if len(layers) == 1 else (
        f"layers {span(layers)} differ")


def finding_lines(test: LayerTest) -> list[str]:
    """One line per finding: each significant cluster (with the band's word where it agrees),
    each run of layers only the band finds, or the line saying no layer differs."""
    if test.why_not:
        return [f"Layer test: {test.why_not}"]
    band = set(test.band_layers)
    lines = []
    for cluster in sorted((c for c in test.clusters if c.p <= test.alpha),
                          key=lambda c: c.layers):
        side = "above" if cluster.sign > 0 else "below"
        agree = [la for la in cluster.layers if la in band]
        note = ("" if not agree else "; max-t simultaneous band" if len(agree) == len(
            cluster.layers) else f"; max-t simultaneous band at {span(agree)}")
        lines.append(f"{_layers(cluster.layers)} from {REFERENCE}, {side} it (cluster "
                     f"permutation test over {test.design}, {format_p(cluster.p)}{note})")
    for run in runs(sorted(band - set(test.flagged))):
        lines.append(f"{_layers(run)} from {REFERENCE} (max-t simultaneous band over "
                     f"{test.design}; in no significant cluster)")
    if not lines:
        smallest = min((c.p for c in test.clusters), default=None)
        found = ("no layer beyond the threshold" if smallest is None
                 else f"smallest cluster {format_p(smallest)}")
        lines.append(f"no layer differs from {REFERENCE} (cluster permutation test over "
                     f"{test.design}: {found}; the max-t simultaneous band holds 0 at every "
                     "tested layer)")
    return lines


def shade_layers(ax: Axes, test: LayerTest) -> list[Any]:
    """Shade each run of flagged layers, half a layer either side (layers 20 and 28 are two
    spans); the first span carries the legend entry. Returns the spans."""
    spans = []
    for i, run in enumerate(runs(test.flagged)):
        spans.append(ax.axvspan(run[0] - 0.5, run[-1] + 0.5, color=SHADE_COLOUR,
                                alpha=SHADE_ALPHA, linewidth=0, zorder=0,
                                label=SHADE_LABEL if i == 0 else "_nolegend_"))
    return spans
