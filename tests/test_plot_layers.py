"""Plots draw a marker at every patch layer that was run and join only adjacent layers, and a
rate axis shows 0 and 1 with a margin (issue #27).

Two sweeps imported from hand-written JSON trees into one SQLite store: `two` ran layers 20 and
28 (the demo's), `gappy` ran 40, 41, 42 and 50. Every figure that draws by patch layer is drawn
from them, and its matplotlib lines and bands are read back: a line's segments (its x data split
where matplotlib breaks it, at NaN) must be the runs of consecutive layers, never a segment
through a layer that was not run.
"""

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D
from word_store import import_sweep, write_sweep

from patchdb.report import build_report
from patchdb.report.aggregate import ExperimentRates
from patchdb.report.compare import build_comparison
from patchdb.report.compare_plot import compare_figure
from patchdb.report.corrected_plot import Band, corrected_figure
from patchdb.report.layer_runs import layer_runs
from patchdb.report.plots import sweep_figure
from patchdb.report.readout_plot import readout_figure
from patchdb.report.readouts import ExperimentReadouts, Point, ReadoutLine
from patchdb.store import open_store

# The runs of consecutive layers, written out by hand.
RUNS = {"two": [[20.0], [28.0]], "gappy": [[40.0, 41.0, 42.0], [50.0]]}
LAYERS = {"two": (20, 28), "gappy": (40, 41, 42, 50)}
N = 10


def _tree(root: Path, layers: tuple[int, ...]) -> Path:
    counts = [3, 5, 7, 9]
    return write_sweep(root, {
        "failure_to_success": {layer: {"Dust_to_Bread": (c, N), "Milk_to_Bread": (c - 1, N),
                                       "Dust_to_Trees": (c - 2, N), "Milk_to_Trees": (c, N)}
                               for layer, c in zip(layers, counts, strict=False)},
        "unsteered_to_steered": {layer: {"Bread": (c, N), "Trees": (N - c, N),
                                         "Origami": (N, N)}
                                 for layer, c in zip(layers, counts, strict=False)},
        "steered_to_unsteered": {layer: {"Bread": (c, N), "Trees": (c, N)}
                                 for layer, c in zip(layers, counts, strict=False)},
    }, {"failure_to_success": {"Bread": (2, N), "Trees": (4, N)},
        "unsteered_to_steered": {"Bread": (1, N), "Trees": (2, N), "Origami": (3, N)},
        "steered_to_unsteered": {"(none)": (2, N)}})


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plot_layers")
    path = root / "store.sqlite"
    for name, layers in LAYERS.items():
        import_sweep(path, _tree(root / name, layers), name)
    return path


def _rates(db: Path, sweep: str, tmp_path: Path) -> dict[str, ExperimentRates]:
    store = open_store(str(db))
    try:
        report = build_report(store, sweep, out_dir=tmp_path / sweep)
    finally:
        store.close()
    return {e.name: e.rates for e in report.experiments}


def segments(line: Line2D) -> list[list[float]]:
    """The x values of each piece matplotlib draws connected (split at NaN)."""
    out: list[list[float]] = [[]]
    for x in np.asarray(line.get_xdata(), dtype=float):
        if math.isnan(x):
            out.append([])
        else:
            out[-1].append(float(x))
    return [s for s in out if s]


def by_layer(ax: Axes) -> list[Line2D]:
    """The lines drawn against patch layer: not the legend's empty ones, not the reference
    lines across the plot (axhline: x from 0 to 1 in axes coordinates)."""
    return [line for line in ax.lines if segments(line) and segments(line) != [[0.0, 1.0]]]


def band_xs(ax: Axes) -> list[list[float]]:
    """Each band polygon's x values, sorted, rounded."""
    return [sorted({round(float(x), 6) for x in path.vertices[:, 0]})
            for band in ax.collections if isinstance(band, PolyCollection)
            for path in band.get_paths()]


def assert_runs(ax: Axes, runs: list[list[float]], at_least: int) -> None:
    """Every line by patch layer has a marker and is connected exactly over `runs`."""
    lines = by_layer(ax)
    assert len(lines) >= at_least
    for line in lines:
        assert segments(line) == runs, line.get_label()
        assert line.get_marker() not in (None, "None", "", " "), line.get_label()


def assert_bands(ax: Axes, runs: list[list[float]], at_least: int) -> None:
    """Each band polygon covers one run: a run of several layers from its first to its last,
    a lone layer a narrow box around it; none reaches into a layer that was not run."""
    polygons = band_xs(ax)
    assert len(polygons) >= at_least
    for xs in polygons:
        run = next(r for r in runs if r[0] - 0.5 < xs[0] <= r[0])
        if len(run) == 1:
            assert run[0] - 0.5 < xs[0] < run[0] < xs[-1] < run[0] + 0.5
        else:
            assert (xs[0], xs[-1]) == (run[0], run[-1])


def test_layer_runs_split_where_a_layer_was_not_run() -> None:
    assert layer_runs([20, 28]) == [range(0, 1), range(1, 2)]
    assert layer_runs([40, 41, 42, 50]) == [range(0, 3), range(3, 4)]
    assert layer_runs([3, 4, 5]) == [range(0, 3)]
    assert layer_runs([7]) == [range(0, 1)]
    assert layer_runs([]) == []


@pytest.mark.parametrize("sweep", ["two", "gappy"])
def test_sweep_plot_joins_only_adjacent_layers(db: Path, tmp_path: Path, sweep: str) -> None:
    rates = _rates(db, sweep, tmp_path)
    for name, lines in (("failure_to_success", 4 + 2), ("unsteered_to_steered", 3 + 1)):
        for net in (False, True):
            ax = sweep_figure(rates[name], "t", ci=True, net=net).axes[0]
            assert_runs(ax, RUNS[sweep], lines)  # faint keys and bold lines alike
            assert_bands(ax, RUNS[sweep], len(RUNS[sweep]))


@pytest.mark.parametrize("sweep", ["two", "gappy"])
def test_readout_plot_joins_only_adjacent_layers(sweep: str) -> None:
    layers = list(LAYERS[sweep])
    points = [Point(p_yes=0.1 * (i + 1)) for i in range(len(layers))]
    er = ExperimentReadouts("unsteered_to_steered", False, layers,
                            keys=[ReadoutLine("Bread", "", "Bread", points),
                                  ReadoutLine("Trees", "", "Trees", points)],
                            groups=[ReadoutLine("Mean", "", "", points)])
    ax = readout_figure(er, "t").axes[0]
    assert_runs(ax, RUNS[sweep], 3)
    assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 1


def test_compare_plot_joins_only_each_members_adjacent_layers(db: Path) -> None:
    store = open_store(str(db))
    try:
        with store.read() as session:
            comparison = build_comparison(session, ["two", "gappy"])
    finally:
        store.close()
    ax = compare_figure(comparison, "unsteered_to_steered", ci=True).axes[0]
    by_label = {line.get_label(): line for line in ax.lines}
    for sweep in ("two", "gappy"):
        for word in ("Bread", "Trees", "Origami", "Mean"):
            line = by_label[f"{word} [{sweep}]"]
            assert segments(line) == RUNS[sweep]
            assert line.get_marker() not in (None, "None", "", " ")
    assert_bands(ax, RUNS["two"] + RUNS["gappy"], 4)
    low, high = ax.get_ylim()
    assert low < 0 and high > 1


def test_corrected_plot_joins_only_adjacent_layers(db: Path, tmp_path: Path) -> None:
    rates = _rates(db, "gappy", tmp_path)["unsteered_to_steered"]
    bands = [[Band(0.5, 0.3, 0.7) for _ in rates.layers]]
    ax = corrected_figure(rates, bands, "t", "PPI++").axes[0]
    drawn = by_layer(ax)
    assert len(drawn) == 2  # the raw line (dashed) and the corrected one
    for line in drawn:
        assert segments(line) == RUNS["gappy"]
        assert line.get_marker() not in (None, "None", "", " ")
    assert_bands(ax, RUNS["gappy"], 2)
    low, high = ax.get_ylim()
    assert low < 0 and high > 1


def test_rate_axis_shows_zero_and_one_with_a_margin(db: Path, tmp_path: Path) -> None:
    """Origami scores 10 of 10 at every layer: its line at 1.0 must sit inside the frame."""
    rates = _rates(db, "gappy", tmp_path)["unsteered_to_steered"]
    ax = sweep_figure(rates, "t").axes[0]
    low, high = ax.get_ylim()
    assert -0.1 < low < 0 and 1 < high < 1.1
    assert list(ax.get_yticks()) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # --net draws rate minus the false-positive rate 2/10: the axis is [-0.2, 0.8] with margin
    low, high = sweep_figure(rates, "t", net=True).axes[0].get_ylim()
    assert -0.3 < low < -0.2 and 0.8 < high < 0.9


def test_the_corrected_legend_fits_in_the_figure(db: Path, tmp_path: Path) -> None:
    """The band's method is a long legend entry: it must be wrapped, not cut off at the edge."""
    rates = _rates(db, "gappy", tmp_path)["failure_to_success"]
    bands = [[Band(0.5, 0.3, 0.7) for _ in rates.layers] for _ in rates.groups]
    method = "PPI++, bootstrap over words and labels (2,000 draws), Wilson-t"
    fig = corrected_figure(rates, bands, "t", method)
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    legend = fig.axes[0].get_legend()
    box, frame = legend.get_window_extent(renderer), fig.bbox
    assert box.x0 >= frame.x0 and box.x1 <= frame.x1, (box, frame)
