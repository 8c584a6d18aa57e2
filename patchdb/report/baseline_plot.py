"""The baselines on a sweep plot: a dashed line per target word at its unpatched rate, in the
word's colour, and the false-positive rate of the no-injection control as a grey dotted line
in its grey Wilson 95% band (legend "False pos."). With `report --net` every rate is drawn
minus that rate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from patchdb.experiments import NO_STEERING
from patchdb.report.aggregate import ExperimentRates, Line
from patchdb.report.baselines import net_interval, require_control

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BASELINE_STYLE = "--"
CONTROL_COLOUR = "grey"
UNPATCHED_LABEL = "Unpatched"


def shift_of(rates: ExperimentRates, net: bool) -> float:
    """What every drawn rate is lowered by: the false-positive rate with `net`, else 0."""
    return require_control(rates.control).rate if net else 0.0


def net_band(line: Line, rates: ExperimentRates) -> tuple[NDArray[np.float64],
                                                          NDArray[np.float64]]:
    """The 95% band of a bold line minus the false-positive rate (Newcombe's interval)."""
    return net_interval(line.rates, line.n_effective, require_control(rates.control))


def draw_references(ax: Axes, rates: ExperimentRates, colour_of: dict[str, Any],
                    shift: float) -> None:
    """Each target word's unpatched rate (dashed, its colour) and the false-positive rate."""
    drawn = False
    for target, baseline in rates.baselines.items():
        if target == NO_STEERING or baseline.n_scored == 0:
            continue  # the unsteered target's baseline is the control, drawn below
        ax.axhline(baseline.rate - shift, color=colour_of.get(target, CONTROL_COLOUR),
                   linestyle=BASELINE_STYLE, linewidth=1.2, label="_nolegend_")
        drawn = True
    if drawn:
        ax.plot([], [], color="dimgray", linestyle=BASELINE_STYLE, label=UNPATCHED_LABEL)
    control = rates.control
    if control is not None:
        lower, upper = control.interval()
        ax.axhspan(lower - shift, upper - shift, color=CONTROL_COLOUR, alpha=0.15, linewidth=0)
        ax.axhline(control.rate - shift, color=CONTROL_COLOUR, linestyle=":", linewidth=1.5,
                   label=f"False pos. {control.rate:.0%}")  # short: the legend is narrow
