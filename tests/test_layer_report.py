"""The layer test in the report: the plot shades the layers that differ, `patchdb report` prints
the test's line and the per-word BH p-values, and the HTML page shows them, on a store whose
every count is chosen by hand (tests/word_store.py).

The sweep: unsteered_to_steered with eight words, patch layers 40-46, 64 samples per key, every
word's baseline 32 of 64. At layers 43 and 44 every word falls to 4-10 of 64; elsewhere each
word sits a few samples off its baseline, with the same offsets at every such layer. Every word
below its baseline at 43-44 is the most extreme of the 256 sign patterns, together with its
mirror image: the cluster 43-44 has p = 2/256 = 0.008. Flipping words can line up the offsets
of the other layers, but their t stays near 5 a layer (|offsets| 3,1,2,4,1,2,5,3: mean 2.6,
sd 1.4), far below the cluster's mass (t about -30 at each of 43 and 44).
"""

import math
from fractions import Fraction
from html import escape
from pathlib import Path

import pytest
from conftest import run_cli
from matplotlib.colors import to_hex
from word_store import import_sweep, write_sweep

from patchdb.report import build_report
from patchdb.report.html import write_html_report
from patchdb.report.layer_findings import SHADE_COLOUR, SHADE_LABEL, format_cell_p
from patchdb.store import open_store

WORDS = ("Algorithms", "Aquariums", "Bread", "Origami", "Satellites", "Trees", "Vegetables",
         "Volcanoes")
LAYERS = tuple(range(40, 47))
BASE = 32
OFFSETS = (3, -1, 2, -4, 1, -2, 5, -3)
DROPPED = (4, 6, 8, 10, 5, 7, 9, 6)  # successes at layers 43 and 44
LINE = ("layers 43-44 differ from the unpatched baseline, below it (cluster permutation test "
        "over 8 words, p = 0.008; max-t simultaneous band)")


def successes(word: int, layer: int) -> int:
    return DROPPED[word] if layer in (43, 44) else BASE + OFFSETS[word]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    experiments = {"unsteered_to_steered": {
        layer: {w: (successes(i, layer), 64) for i, w in enumerate(WORDS)} for layer in LAYERS}}
    baselines = {"unsteered_to_steered": {w: (BASE, 64) for w in WORDS}}
    path = tmp_path / "store.sqlite"
    import_sweep(path, write_sweep(tmp_path / "tree", experiments, baselines), "hand")
    return path


def fisher(k1: int, k0: int, n: int = 64) -> float:
    """Two-sided Fisher exact p of k1 of n against k0 of n, with exact fractions."""
    total = k1 + k0
    prob = {x: Fraction(math.comb(n, x) * math.comb(n, total - x), math.comb(2 * n, total))
            for x in range(max(0, total - n), min(total, n) + 1)}
    return float(sum(p for p in prob.values() if p <= prob[k1]))


def bh_by_hand(p: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    order = sorted(p, key=lambda cell: p[cell])
    adjusted, running = {}, 1.0
    for rank in range(len(order), 0, -1):
        cell = order[rank - 1]
        running = min(running, p[cell] * len(order) / rank)
        adjusted[cell] = running
    return adjusted


def test_the_plot_shades_the_flagged_layers(db: Path, tmp_path: Path) -> None:
    store = open_store(str(db))
    try:
        report = build_report(store, None, out_dir=tmp_path / "r")
    finally:
        store.close()
    (experiment,) = report.experiments
    assert experiment.layer_test is not None and experiment.layer_test.flagged == (43, 44)
    from patchdb.report.plots import sweep_figure

    ax = sweep_figure(experiment.rates, "t", decided=experiment.layer_test).axes[0]
    spans = [p for p in ax.patches if to_hex(p.get_facecolor()) == SHADE_COLOUR]
    assert [(s.get_x(), s.get_x() + s.get_width()) for s in spans] == [(42.5, 44.5)]
    assert SHADE_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]


def test_report_prints_the_line_and_the_bh_p_values(db: Path, tmp_path: Path) -> None:
    result = run_cli("report", "--db", str(db), "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert LINE in lines
    raw = {(i, layer): fisher(successes(i, layer), BASE)
           for i in range(len(WORDS)) for layer in LAYERS}
    adjusted = bh_by_hand(raw)
    for i, word in enumerate(WORDS):
        row = [line for line in lines if line.split()[:1] == [word]][-1]  # the p row, last
        assert row.split()[1:] == [format_cell_p(adjusted[(i, layer)]) for layer in LAYERS]
    assert any("over the 56 cells of this table" in line for line in lines)


def test_the_html_page_shows_the_layer_test(db: Path, tmp_path: Path) -> None:
    store = open_store(str(db))
    try:
        page = write_html_report(store, None, tmp_path / "h").read_text(encoding="utf-8")
    finally:
        store.close()
    assert escape(LINE) in page
    assert "Where the difference is decided" in page
