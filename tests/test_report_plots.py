"""The sweep plots: drawn as docs/science.md describes, then inspected as figure objects and as files."""

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from test_import_json import NEGATIVE, POSITIVE, SINGLE, cli, write_tree

from patchdb.report.aggregate import ExperimentRates, choose_judge_config, experiment_rates
from patchdb.report.plots import sweep_figure
from patchdb.store import open_store
from patchdb.store.sweeps import get_sweep, sweep_config


@pytest.fixture
def rates(tmp_path: Path, db_path: Path) -> dict[str, ExperimentRates]:
    tree = write_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    store = open_store(str(db_path))
    try:
        with store.read() as session:
            sweep = get_sweep(session, None)
            judge = choose_judge_config(session, sweep, None)
            found = experiment_rates(session, sweep, sweep_config(sweep),
                                     ["failure_to_success", "unsteered_to_steered"], judge.id)
    finally:
        store.close()
    return {r.name: r for r in found}


def legend_texts(fig: Figure) -> list[str]:
    legend = fig.axes[0].get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


def test_pair_plot(rates: dict[str, ExperimentRates]) -> None:
    fig = sweep_figure(rates["failure_to_success"], "title")
    ax = fig.axes[0]
    faint = [line for line in ax.get_lines() if line.get_alpha() == 0.15]
    bold = [line for line in ax.get_lines() if line.get_alpha() is None]
    assert len(faint) == len(NEGATIVE) * len(POSITIVE)
    assert len(bold) == len(POSITIVE)
    assert len(ax.get_lines()) == len(faint) + len(bold)
    assert legend_texts(fig) == POSITIVE
    # faint lines take their target word's colour
    colour = {b.get_label(): b.get_color() for b in bold}
    assert [f.get_color() for f in faint] == [colour[t] for _ in NEGATIVE for t in POSITIVE]
    assert all(b.get_linewidth() > f.get_linewidth() for b in bold for f in faint)
    assert ax.get_ylim() == (0.0, 1.0)
    assert ax.get_ylabel() == "Coherent & Detect+Identify Rate"
    assert ax.get_xlabel() == "Patch layer"
    low, high = ax.get_xlim()
    assert low <= 40 and high >= 42
    assert not ax.collections  # no bands without --ci


def test_single_word_plot(rates: dict[str, ExperimentRates]) -> None:
    fig = sweep_figure(rates["unsteered_to_steered"], "title")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_alpha() for line in lines] == [0.5] * len(SINGLE) + [None]
    assert lines[-1].get_color() == "black"
    assert legend_texts(fig) == [*SINGLE, "Mean"]
    assert ax.get_ylim() == (0.0, 1.0)
    assert ax.get_ylabel() == "Coherent & Detect Rate"


def test_gaps_are_nan_never_zero(rates: dict[str, ExperimentRates]) -> None:
    """Trees has no scorable sample at any layer, and layer 42 was never judged."""
    fig = sweep_figure(rates["unsteered_to_steered"], "title")
    by_label = {line.get_label(): line for line in fig.axes[0].get_lines()}
    trees = np.asarray(by_label["Trees"].get_ydata(), dtype=float)
    assert np.isnan(trees).all()
    mean = np.asarray(by_label["Mean"].get_ydata(), dtype=float)
    assert math.isnan(mean[2]) and not math.isnan(mean[0])
    assert mean[0] == pytest.approx((2 / 3 + 0.5) / 2)


def test_ci_adds_one_band_per_bold_line(rates: dict[str, ExperimentRates]) -> None:
    pairs = sweep_figure(rates["failure_to_success"], "title", ci=True).axes[0]
    single = sweep_figure(rates["unsteered_to_steered"], "title", ci=True).axes[0]
    assert sum(isinstance(c, PolyCollection) for c in pairs.collections) == len(POSITIVE)
    assert sum(isinstance(c, PolyCollection) for c in single.collections) == 1


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_plot_files_are_valid_images(tmp_path: Path, db_path: Path, fmt: str) -> None:
    tree = write_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    result = cli("report", "--db", db_path, "--format", fmt, "--ci",
                     "--experiments", "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    path = tmp_path / "patchdb_report" / "patching_layer_sweep" / "unsteered_to_steered" / \
        f"sweep_plot.{fmt}"
    assert f"Plot: {path.relative_to(tmp_path)}" in result.output
    data = path.read_bytes()
    if fmt == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    elif fmt == "svg":
        assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg"
    else:
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert not (path.parent.parent / "failure_to_success").exists()
