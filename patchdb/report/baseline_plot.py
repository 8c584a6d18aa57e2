"""The baselines on a sweep plot: a dashed line per target word at its unpatched rate, in the
word's colour, and the false-positive rate of the no-injection control as a grey dotted line
in its grey 95% band (legend "False pos."; one condition, so a Wilson band over its samples).
With `report --net` every rate is drawn minus that rate, and a bold line's band is the band of
that difference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from patchdb.experiments import NO_STEERING
from patchdb.report.aggregate import FALSE_POSITIVES, ExperimentRates, Line
from patchdb.report.bands import DEFAULT_CI_METHOD, Band, control_interval, line_band, net_line_band
from patchdb.report.baselines import require_control

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BASELINE_STYLE = "--"
CONTROL_COLOUR = "grey"
UNPATCHED_LABEL = "Unpatched"


def shift_of(rates: ExperimentRates, net: bool) -> float:
    """What every drawn rate is lowered by: the false-positive rate with `net`, else 0."""
    return require_control(rates.control).rate if net else 0.0


def group_band(rates: ExperimentRates, line: Line, net: bool,
               ci_method: str = DEFAULT_CI_METHOD) -> Band:
    """The 95% band of a bold line, or with `net` of that line minus the false-positive rate
    (Newcombe's interval of the difference)."""
    if net:
        return net_line_band(rates, line, require_control(rates.control), ci_method)
    return line_band(rates, line, ci_method)


def control_label(rates: ExperimentRates, ci_method: str = DEFAULT_CI_METHOD) -> str | None:
    """The legend entry of the false-positive rate, naming its band's method."""
    if rates.control is None:
        return None
    c = control_interval(rates.control, ci_method)
    name = "False pos." if rates.reference == FALSE_POSITIVES else "Random vec."
    over = (f"Wilson-t, {c.n_words} words" if c.n_words > 1
            else f"Wilson, {c.n_samples} samples")
    return f"{name} {c.estimate:.0%}\n({over})"  # a narrow legend


def draw_references(ax: Axes, rates: ExperimentRates, colour_of: dict[str, Any],
                    shift: float, ci_method: str = DEFAULT_CI_METHOD) -> None:
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
        c = control_interval(control, ci_method)
        ax.axhspan(c.lower - shift, c.upper - shift, color=CONTROL_COLOUR, alpha=0.15,
                   linewidth=0)
        ax.axhline(c.estimate - shift, color=CONTROL_COLOUR, linestyle=":", linewidth=1.5,
                   label=control_label(rates, ci_method))
