"""The bands the report draws and prints, on a store whose every count is chosen by hand
(tests/word_store.py: three words a side, 100 samples per key, the control at 29/100).

Expected values are worked out here with the formulas written out again: a mean over W words
with sample variance s^2 is worth n_eff = p(1 - p) / (s^2 / W) samples (at most all of them),
banded by Wilson's score interval at n_eff with Student's t on W - 1 df for z; a net band is
Newcombe's combination of the line's band and the control's Wilson band.
"""

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from word_store import hand_sweep, import_sweep

from patchdb.report import build_report
from patchdb.report.aggregate import ExperimentRates
from patchdb.report.plots import sweep_figure
from patchdb.store import open_store

Z = 1.959963984540054
T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # Student's t, 97.5%, 2 df, in closed form
FALSE_POSITIVE = 0.29  # the control: 29 of 100


def wilson(p: float, n: float, z: float = Z) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def over_words(rates: list[float], samples: int) -> tuple[float, float]:
    """The band of the mean of three words' rates (2 df), each word with `samples` samples."""
    p = sum(rates) / len(rates)
    s2 = sum((r - p) ** 2 for r in rates) / (len(rates) - 1)
    total = samples * len(rates)
    n = min(p * (1 - p) / (s2 / len(rates)), total) if s2 > 0 else total
    return wilson(p, n, T2)


def newcombe(p1: float, band1: tuple[float, float], p2: float,
             band2: tuple[float, float]) -> tuple[float, float]:
    d = p1 - p2
    return (d - math.sqrt((p1 - band1[0]) ** 2 + (band2[1] - p2) ** 2),
            d + math.sqrt((band1[1] - p1) ** 2 + (p2 - band2[0]) ** 2))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite"
    import_sweep(path, hand_sweep(tmp_path / "tree"), "hand")
    return path


@pytest.fixture
def rates(db: Path, tmp_path: Path) -> dict[str, ExperimentRates]:
    store = open_store(str(db))
    try:
        report = build_report(store, None, out_dir=tmp_path / "r")
    finally:
        store.close()
    return {e.name: e.rates for e in report.experiments}


def legend(ax: Axes) -> list[str]:
    """The legend's entries, each on one line (long ones are wrapped in the figure)."""
    return [" ".join(t.get_text().split()) for t in ax.get_legend().get_texts()]


def band_at(ax: Axes, index: int, layer: float) -> tuple[float, float]:
    """The lowest and highest y of the index-th band where it meets x = layer."""
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    vertices = np.concatenate([p.vertices for p in bands[index].get_paths()])
    ys = vertices[np.isclose(vertices[:, 0], layer)][:, 1]
    return float(ys.min()), float(ys.max())


def test_the_band_is_drawn_around_the_mean_line(rates: dict[str, ExperimentRates]) -> None:
    """unsteered_to_steered: Bread, Trees, Origami score 10, 0, 25 of 100 at layer 40 (mean
    0.117) and 60, 90, 30 at layer 41 (mean 0.6). A band around 1 - rate would sit near
    0.88 at layer 40."""
    ax = sweep_figure(rates["unsteered_to_steered"], "t", ci=True).axes[0]
    at_40 = over_words([0.10, 0.0, 0.25], 100)
    at_41 = over_words([0.6, 0.9, 0.3], 100)
    assert band_at(ax, 0, 40) == pytest.approx(at_40, abs=1e-9)
    assert band_at(ax, 0, 41) == pytest.approx(at_41, abs=1e-9)
    assert at_40[0] < 0.35 / 3 < at_40[1] < 0.6  # around the line, well below 1 - 0.117
    texts = legend(ax)
    assert texts[-1] == "95% band: Wilson-t over 3 words"
    assert "False pos. 29% (Wilson, 100 samples)" in texts


def test_pair_lines_get_their_band_over_source_words(rates: dict[str, ExperimentRates]) -> None:
    """failure_to_success, one band per target word over its three source words."""
    ax = sweep_figure(rates["failure_to_success"], "t", ci=True).axes[0]
    assert band_at(ax, 0, 40) == pytest.approx(over_words([0.2, 0.1, 0.0], 100), abs=1e-9)
    # all three sources at 100 of 100: no spread between words to estimate, so the band is
    # one word's (100 samples), not the three words' pooled samples (300)
    assert band_at(ax, 2, 41) == pytest.approx(wilson(1.0, 100, T2), abs=1e-9)
    assert legend(ax)[-1] == \
        "95% band: Wilson-t over 3 sources"


def test_net_lowers_every_pair_line_by_the_false_positive_rate(
        rates: dict[str, ExperimentRates]) -> None:
    ax = sweep_figure(rates["failure_to_success"], "t", net=True).axes[0]
    bold = {line.get_label(): list(line.get_ydata()) for line in ax.lines
            if line.get_label() in ("Bread", "Trees", "Origami")}
    assert bold["Bread"] == pytest.approx([0.1 - FALSE_POSITIVE, 0.6 - FALSE_POSITIVE])
    assert bold["Trees"] == pytest.approx([0.0 - FALSE_POSITIVE, 0.2 - FALSE_POSITIVE])
    assert bold["Origami"] == pytest.approx([0.7 - FALSE_POSITIVE, 1.0 - FALSE_POSITIVE])
    faint = [list(line.get_ydata()) for line in ax.lines if line.get_alpha() == 0.15]
    assert [0.2 - FALSE_POSITIVE, 0.6 - FALSE_POSITIVE] in [
        pytest.approx(y) for y in faint]  # Dust_to_Bread
    dashed = sorted(float(line.get_ydata()[0]) for line in ax.lines
                    if line.get_linestyle() == "--" and len(line.get_ydata()) == 2)
    assert dashed == pytest.approx(sorted(b - FALSE_POSITIVE for b in (0.3, 0.0, 0.8)))


def test_net_band_is_the_band_of_the_difference(rates: dict[str, ExperimentRates]) -> None:
    """Bread's line minus the control: Newcombe's combination of the line's band over its
    three sources and the control's Wilson band over its 100 samples."""
    ax = sweep_figure(rates["failure_to_success"], "t", net=True, ci=True).axes[0]
    control = wilson(FALSE_POSITIVE, 100)
    for layer, words in ((40, [0.2, 0.1, 0.0]), (41, [0.6, 0.8, 0.4])):
        p = sum(words) / 3
        expected = newcombe(p, over_words(words, 100), FALSE_POSITIVE, control)
        assert band_at(ax, 0, layer) == pytest.approx(expected, abs=1e-9)
    texts = legend(ax)
    assert texts[-1] == "95% band: Wilson-t over 3 sources minus false positives (Newcombe)"


def test_samples_method_draws_the_wilson_band_over_samples(
        rates: dict[str, ExperimentRates]) -> None:
    ax = sweep_figure(rates["unsteered_to_steered"], "t", ci=True, ci_method="samples").axes[0]
    assert band_at(ax, 0, 41) == pytest.approx(wilson(0.6, 300), abs=1e-9)
    assert legend(ax)[-1] == \
        "95% band: Wilson over samples"


def test_the_control_keeps_its_count(rates: dict[str, ExperimentRates]) -> None:
    """The baseline view gives a rate; its count is rebuilt as round(rate * n): 0.29 * 100 is
    28.999999999999996 in floating point, so flooring would give 28."""
    control = rates["failure_to_success"].control
    assert control is not None
    assert (control.successes, control.n_scored) == (29, 100)
    assert rates["unsteered_to_steered"].baselines["Trees"].successes == 50


def test_table_prints_the_bands_and_names_the_method(db: Path) -> None:
    result = run_cli("report", "--db", str(db), "--ci", "--experiments", "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    mean = next(i for i, line in enumerate(lines) if line.startswith("Mean"))
    lower, upper = over_words([0.10, 0.0, 0.25], 100), over_words([0.6, 0.9, 0.3], 100)
    base = over_words([0.2, 0.5, 0.1], 100)  # the mean of the three words' baselines
    assert lines[mean].split()[:5] == ["Mean", "27", "|", "12", "60"]
    assert lines[mean + 1].split() == ["lower", f"{round(100 * base[0])}", "|",
                                       f"{round(100 * lower[0])}", f"{round(100 * upper[0])}"]
    assert lines[mean + 2].split() == ["upper", f"{round(100 * base[1])}", "|",
                                       f"{round(100 * lower[1])}", f"{round(100 * upper[1])}"]
    assert ("lower, upper: the 95% band of the row above (Wilson-t over 3 words; "
            "docs/statistics.md)") in lines
    low, high = wilson(0.29, 100)
    assert (f"False positives (no injection, no patch): 29% (29/100; 95% band "
            f"{round(100 * low)}-{round(100 * high)}%: Wilson over its samples, one condition)"
            in lines)
    samples = run_cli("report", "--db", str(db), "--ci", "--ci-method", "samples",
                      "--experiments", "unsteered_to_steered").output
    assert ("lower, upper: the 95% band of the row above (Wilson over samples; "
            "docs/statistics.md)") in samples.splitlines()
    plain = run_cli("report", "--db", str(db), "--experiments", "unsteered_to_steered").output
    assert not any(line.strip().startswith(("lower", "upper")) for line in plain.splitlines())


def test_a_bad_ci_method_is_one_line(db: Path) -> None:
    result = run_cli("report", "--db", str(db), "--ci-method", "bootstrap")
    assert result.exit_code == 1
    assert "Invalid value for '--ci-method': 'bootstrap' is not one of 'words', 'samples'" \
        in result.output
