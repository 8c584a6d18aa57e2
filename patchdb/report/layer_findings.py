"""The layer test in words and on a plot: the lines the report prints, and the shading of the
layers that differ (patchdb.report.layer_test computes them)."""

from __future__ import annotations

import math
import textwrap
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np

from patchdb.report.clusters import word_rates
from patchdb.report.layer_test import LayerTest, layer_test, runs, span
from patchdb.report.word_tests import WordPValues, word_p_values

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    from matplotlib.axes import Axes

    from patchdb.report.aggregate import ExperimentRates

SHADE_COLOUR = "#f2b705"
SHADE_ALPHA = 0.2
# The legend sits in a narrow margin: the label is wrapped as the plots wrap a band's method.
SHADE_LABEL = textwrap.fill("layers that differ from the baseline (cluster permutation test)",
                            30)
REFERENCE = "the unpatched baseline"
GAP = "-"
P_NOTE = ("BH-adjusted p of each word against its own baseline (Fisher's exact test over its "
          "samples; Benjamini-Hochberg over the {n} of this table; {gap} = no test)")


def decide(rates: ExperimentRates) -> tuple[LayerTest, WordPValues] | None:
    """One experiment's layer test and per-word p-values, as the report shows them; None
    where nothing is scored yet."""
    if not any(n for line in rates.keys for n in line.n_scored):
        return None
    words = word_rates(rates)
    return layer_test(words), word_p_values(words)


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


def format_cell_p(p: float) -> str:
    """A p-value in at most 5 characters: '1', '.35', '.004', '<.001'; GAP for no test."""
    if math.isnan(p):
        return GAP
    if p >= 0.995:
        return "1"
    if p >= 0.01:
        return f"{p:.2f}".lstrip("0")
    return f"{p:.3f}".lstrip("0") if p >= 0.001 else "<.001"


def _points(value: float) -> str:
    """A difference in percentage points with its sign: '+7', '-27', '0'."""
    if math.isnan(value):
        return GAP
    points = round(100 * value)
    return f"{points:+d}" if points else "0"


def _cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def layer_test_block(test: LayerTest, p_values: WordPValues) -> str:
    """What `patchdb report` prints under an experiment's rate table: the difference to the
    baselines per layer with its simultaneous band, the findings, and the per-word p-values;
    only the line saying why where no word has a baseline to differ from."""
    tested = int((~np.isnan(p_values.adjusted)).sum())
    if test.why_not and not tested and np.isnan(np.asarray(test.difference, float)).all():
        return "\n".join(finding_lines(test))
    layers = test.layers
    names = list(p_values.words)
    width = max(len("  upper"), *(len(w) for w in names))
    cell = max(5, *(len(str(layer)) for layer in layers))
    header = " ".join([f"{'':<{width}}", *(f"{layer:>{cell}}" for layer in layers)])
    lines = ["Where the difference is decided: rate minus its target's unpatched rate, in "
             "percentage points (mean over keys)", header]
    rows = [("diff", test.difference)]
    if not test.why_not:
        rows += [("  lower", test.lower), ("  upper", test.upper)]
    for label, values in rows:
        lines.append(" ".join([f"{label:<{width}}",
                               *(f"{_points(float(v)):>{cell}}" for v in values)]))
    if not test.why_not:
        lines.append(f"lower, upper: the simultaneous 95% band over all layers (max-t over "
                     f"{test.design}; docs/statistics.md)")
    lines += finding_lines(test)
    lines += [P_NOTE.format(n=_cells(tested), gap=GAP), header]
    for name, row in zip(names, p_values.adjusted, strict=True):
        lines.append(" ".join([f"{name:<{width}}",
                               *(f"{format_cell_p(float(p)):>{cell}}" for p in row)]))
    return "\n".join(lines)


def layer_test_html(test: LayerTest, p_values: WordPValues) -> str:
    """The findings as notes and the BH-adjusted p-values as a table (rows: patch layers)."""
    out = ['<div class="layer-test"><h3>Where the difference is decided</h3>']
    out += [f'<p class="note finding">{escape(line)}</p>' for line in finding_lines(test)]
    tested = int((~np.isnan(p_values.adjusted)).sum())
    if test.why_not and not tested:
        return "\n".join([*out, "</div>"])
    head = "".join(f"<th>{escape(w)}</th>" for w in p_values.words)
    note = P_NOTE.format(n=_cells(tested), gap="blank")
    out.append(f'<table class="rates p-values"><caption>{escape(note)}'
               f"</caption><thead><tr><th>Layer</th>{head}</tr></thead><tbody>")
    for i, layer in enumerate(p_values.layers):
        cells = "".join(
            f"<td>{'' if math.isnan(p) else escape(format_cell_p(float(p)))}</td>"
            for p in p_values.adjusted[:, i])
        out.append(f"<tr><th>{layer}</th>{cells}</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)
