"""Drawing against patch layer: a marker at every layer that was run, and a line or a band only
between adjacent layers (b == a + 1). A sweep of layers 20 and 28 has no rate at 21-27, so
nothing may be drawn there; a lone layer gets its marker and a narrow box for its band.

Every plot that draws by patch layer (sweep, readout, comparison, corrected) draws through
`plot_by_layer` and `fill_by_layer`, and a rate axis is set by `rate_axis`, which shows 0 and 1
with a margin so a line at 0% or 100% is not hidden under the frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.collections import PolyCollection
    from matplotlib.lines import Line2D
    from numpy.typing import NDArray

    Values = Sequence[float] | NDArray[np.float64]

MARKER = "o"
MARKER_SIZE = 5  # a lone layer is only its marker: big enough to see
LONE_HALF_WIDTH = 0.15  # half the width of a lone layer's band, in layers
RATE_MARGIN = 0.04  # below 0 and above 1 on a rate axis
TICK_STEP = 0.2


def layer_runs(layers: Sequence[int]) -> list[range]:
    """The index ranges of runs of consecutive layers: [20, 28] -> [range(0, 1), range(1, 2)],
    [40, 41, 42, 50] -> [range(0, 3), range(3, 4)]."""
    runs: list[range] = []
    start = 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[i - 1] + 1:
            runs.append(range(start, i))
            start = i
    return runs


def broken(layers: Sequence[int], values: Values) -> tuple[list[float], list[float]]:
    """x and y with a NaN point between runs, where matplotlib breaks the line."""
    xs: list[float] = []
    ys: list[float] = []
    for run in layer_runs(layers):
        if xs:
            xs.append(math.nan)
            ys.append(math.nan)
        xs += [float(layers[i]) for i in run]
        ys += [float(values[i]) for i in run]
    return xs, ys


def plot_by_layer(ax: Axes, layers: Sequence[int], values: Values,
                  **style: Any) -> Line2D:
    """One line: a marker at every layer, segments only between adjacent layers."""
    style.setdefault("marker", MARKER)
    style.setdefault("markersize", MARKER_SIZE)
    xs, ys = broken(layers, values)
    (line,) = ax.plot(xs, ys, **style)
    return line


def fill_by_layer(ax: Axes, layers: Sequence[int], lower: Values, upper: Values,
                  **style: Any) -> PolyCollection:
    """A band over each run of adjacent layers; a lone layer's is a box LONE_HALF_WIDTH to each
    side of it (it still has a vertex at the layer itself)."""
    xs: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    for run in layer_runs(layers):
        if xs:
            xs.append(math.nan)
            lo.append(math.nan)
            hi.append(math.nan)
        if len(run) == 1:
            (i,) = run
            xs += [layers[i] - LONE_HALF_WIDTH, float(layers[i]), layers[i] + LONE_HALF_WIDTH]
            lo += [float(lower[i])] * 3
            hi += [float(upper[i])] * 3
        else:
            xs += [float(layers[i]) for i in run]
            lo += [float(lower[i]) for i in run]
            hi += [float(upper[i]) for i in run]
    return ax.fill_between(xs, lo, hi, **style)


def rate_axis(ax: Axes, shift: float = 0.0) -> None:
    """A rate axis from 0 to 1 (lowered by `shift`, as --net draws it) with RATE_MARGIN either
    side, ticks every TICK_STEP."""
    bottom, top = -shift, 1.0 - shift
    ax.set_ylim(bottom - RATE_MARGIN, top + RATE_MARGIN)
    first = math.ceil(bottom / TICK_STEP - 1e-9)
    last = math.floor(top / TICK_STEP + 1e-9)
    ax.set_yticks([round(k * TICK_STEP, 10) for k in range(first, last + 1)])
