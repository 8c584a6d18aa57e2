"""What `report --net` writes and prints: the net plot under its own name, beside the sweep plot
(never over it), and a table of what that plot draws: each bold line's rate minus the reference
(the no-injection control's false positives, or with `--against random_vector` the experiment's
random-vector rate) per patch layer, with the 95% band of that difference and its method."""

from patchdb.controls import RANDOM_VECTOR
from patchdb.report.aggregate import ExperimentRates
from patchdb.report.bands import DEFAULT_CI_METHOD, Band, legend_method, net_line_band
from patchdb.report.baselines import require_control
from patchdb.report.tables import GAP, control_line, percent


def net_plot_name(against: str, fmt: str) -> str:
    """The net plot's file name: sweep_plot_net.png, or sweep_plot_net_random_vector.png
    against the random vector; the plain sweep_plot.png is left as it is."""
    suffix = f"_{RANDOM_VECTOR}" if against == RANDOM_VECTOR else ""
    return f"sweep_plot_net{suffix}.{fmt}"


def net_table(rates: ExperimentRates, ci_method: str = DEFAULT_CI_METHOD) -> str:
    """Per row the plot draws bold (pairs: each target word; single-word: the mean) and per
    word of a single-word experiment: rate minus the reference in % at each patch layer; under
    each bold row the lower and upper ends of the band of that difference; then the band's
    method and the reference that was subtracted. Refuses (PatchdbError) without a reference,
    as --net does."""
    control = require_control(rates.control)
    rows = rates.groups if rates.pairs else rates.keys + rates.groups
    what = "mean over source words" if rates.pairs else "per word"
    head = (f"{rates.name}, net: rate minus {rates.reference} in % by patch layer ({what}; "
            f"{GAP} = nothing scored)")
    if not rows:
        return f"{head}\n{rates.missing or 'no rollouts yet'}"
    layers = rates.layers
    width = max(len("word"), *(len(r.label) for r in rows))
    cell = max(4, *(len(str(layer)) for layer in layers))
    header = " ".join([f"{'word':<{width}}", *(f"{layer:>{cell}}" for layer in layers)])
    lines = [head, header, "-" * len(header)]
    bands: list[Band] = []
    for row in rows:
        lines.append(" ".join([f"{row.label:<{width}}",
                               *(f"{percent(rate - control.rate):>{cell}}"
                                 for rate in row.rates)]))
        if any(row is g for g in rates.groups):
            band = net_line_band(rates, row, control, ci_method)
            bands.append(band)
            for end, values in (("lower", band.lower), ("upper", band.upper)):
                lines.append(" ".join([f"{'  ' + end:<{width}}",
                                       *(f"{percent(float(v)):>{cell}}" for v in values)]))
    lines.append(f"lower, upper: the 95% band of the difference ({legend_method(bands)}; "
                 "docs/statistics.md)")
    subtracted = control_line(rates, ci_method)
    if subtracted is not None:
        lines.append(f"Subtracted: {subtracted}")
    return "\n".join(lines)
