"""`report --json`: rates.json carries the numbers the plots draw, with their bands, method
and counts; `report --compare --json` does so for every compared sweep at its own layers."""

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import file_digest, run_cli
from matplotlib.collections import PolyCollection
from test_report_bands import FALSE_POSITIVE, over_words, wilson
from word_store import hand_sweep, import_sweep

from patchdb.report import build_report
from patchdb.report.compare_plot import compare_figure
from patchdb.report.compare_run import run_compare
from patchdb.report.plots import sweep_figure
from patchdb.store import open_store


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite"
    import_sweep(path, hand_sweep(tmp_path / "tree"), "hand")
    return path


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def rows_of(data: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in data["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_json_writes_rates_beside_the_plots_and_prints_its_path(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = run_cli("report", "--db", str(db), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"Rates with their 95% bands: {out}/rates.json"
    data = load(out / "rates.json")
    assert {k: data[k] for k in ("format", "level", "ci_method", "net", "corrected")} == {
        "format": "patchdb-rates/1", "level": 0.95, "ci_method": "words", "net": False,
        "corrected": False}
    bread = rows_of(data, experiment="unsteered_to_steered", kind="line", layer=40)
    assert len(bread) == 1
    low, high = over_words([0.10, 0.0, 0.25], 100)
    assert bread[0] == {
        "sweep": "hand", "judge_config_id": 1, "experiment": "unsteered_to_steered",
        "kind": "line", "line": "Mean", "target_word": "", "layer": 40,
        "rate": pytest.approx(0.35 / 3), "lower": pytest.approx(low), "upper": pytest.approx(high),
        "method": "Wilson-t over 3 words", "n_samples": 300, "n_words": 3}
    pair = rows_of(data, experiment="failure_to_success", kind="line", line="Trees", layer=41)
    assert pair[0]["n_sources"] == 3 and pair[0]["n_targets"] == 1
    assert pair[0]["method"] == "Wilson-t over 3 sources"
    base = rows_of(data, experiment="failure_to_success", kind="baseline", line="Origami")[0]
    assert (base["rate"], base["n_samples"], base["layer"]) == (0.8, 100, None)
    assert (base["lower"], base["upper"]) == pytest.approx(wilson(0.8, 100))
    assert base["method"] == "Wilson over its samples, one condition"
    (mean_base,) = rows_of(data, kind="baseline_mean")  # only unsteered_to_steered has several
    assert mean_base["experiment"] == "unsteered_to_steered" and mean_base["n_words"] == 3
    assert (mean_base["lower"], mean_base["upper"]) == pytest.approx(
        over_words([0.2, 0.5, 0.1], 100))
    (control,) = rows_of(data, kind="control")
    assert control == {
        "sweep": "hand", "judge_config_id": 1, "experiment": "steered_to_unsteered",
        "kind": "control", "line": "(none)", "target_word": "", "layer": None,
        "rate": 0.29, "lower": pytest.approx(wilson(0.29, 100)[0]),
        "upper": pytest.approx(wilson(0.29, 100)[1]),
        "method": "Wilson over its samples, one condition", "n_samples": 100, "n_words": 0}
    # 3 experiments x their bold lines x 2 layers, 6 baselines (not the control's), 1 mean, 1
    assert len(data["rows"]) == (3 + 1 + 1) * 2 + 6 + 1 + 1
    assert not any("net_rate" in r for r in data["rows"])


def test_json_carries_what_the_plot_draws(db: Path, tmp_path: Path) -> None:
    """Every bold line's points and band in rates.json are the figure's, for --net --ci too."""
    result = run_cli("report", "--db", str(db), "--out", str(tmp_path / "r"), "--json",
                     "--net", "--ci")
    assert result.exit_code == 0, result.output
    data = load(tmp_path / "r" / "rates.json")
    assert data["net"] is True
    store = open_store(str(db))
    try:
        report = build_report(store, None, out_dir=tmp_path / "again")
    finally:
        store.close()
    for exp in report.experiments:
        ax = sweep_figure(exp.rates, "t", ci=True, net=True).axes[0]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        for group, band in zip(exp.rates.groups, bands, strict=True):
            drawn = next(line for line in ax.lines if line.get_label() == group.label
                         and line.get_linewidth() > 2)
            vertices = np.concatenate([p.vertices for p in band.get_paths()])
            for i, layer in enumerate(exp.rates.layers):
                (row,) = rows_of(data, experiment=exp.name, kind="line", line=group.label,
                                 layer=layer)
                assert row["net_rate"] == pytest.approx(float(drawn.get_ydata()[i]))
                assert row["net_rate"] == pytest.approx(row["rate"] - FALSE_POSITIVE)
                ys = vertices[np.isclose(vertices[:, 0], layer)][:, 1]
                assert (row["net_lower"], row["net_upper"]) == pytest.approx(
                    (ys.min(), ys.max()))
                assert row["net_method"] == row["method"] + \
                    " minus false positives (Newcombe)"
    base = rows_of(data, experiment="unsteered_to_steered", kind="baseline", line="Trees")[0]
    assert base["net_rate"] == pytest.approx(0.5 - FALSE_POSITIVE)


def test_undefined_numbers_are_null(tmp_path: Path) -> None:
    """One word: its mean line has no band over words ('n/a: 1 word'), written as null."""
    from word_store import write_sweep

    db = tmp_path / "one.sqlite"
    tree = write_sweep(tmp_path / "one", {"unsteered_to_steered": {
        40: {"Bread": (3, 4)}, 41: {"Bread": (0, 4)}}})
    import_sweep(db, tree, "one")
    result = run_cli("report", "--db", str(db), "--out", str(tmp_path / "r"), "--json", "--ci",
                     "--html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert page.count('<span class="band">n/a</span>') == 2  # the Mean column, both layers
    assert "the 95% band of a mean line (n/a: 1 word)" in page
    text = (tmp_path / "r" / "rates.json").read_text()
    assert "NaN" not in text
    rows = rows_of(json.loads(text), kind="line")
    assert [(r["rate"], r["lower"], r["upper"], r["method"]) for r in rows] == [
        (0.75, None, None, "n/a: 1 word"), (0.0, None, None, "n/a: 1 word")]
    assert "  lower" in result.output  # the table's band rows show the gap
    lower_row = next(line for line in result.output.splitlines() if line.startswith("  lower"))
    assert lower_row.split() == ["lower", "-", "-"]


def test_samples_method_is_named_in_the_json(db: Path, tmp_path: Path) -> None:
    assert run_cli("report", "--db", str(db), "--out", str(tmp_path / "r"), "--json",
                   "--ci-method", "samples").exit_code == 0
    data = load(tmp_path / "r" / "rates.json")
    assert data["ci_method"] == "samples"
    (row,) = rows_of(data, experiment="unsteered_to_steered", kind="line", layer=41)
    assert row["method"] == "Wilson over samples"
    assert (row["lower"], row["upper"]) == pytest.approx(wilson(0.6, 300))


def test_net_json_without_a_control_changes_nothing(tmp_path: Path) -> None:
    from word_store import write_sweep

    db = tmp_path / "nocontrol.sqlite"
    tree = write_sweep(tmp_path / "t", {"unsteered_to_steered": {40: {"Bread": (1, 2),
                                                                     "Trees": (2, 2)}}})
    import_sweep(db, tree, "nc")
    before = file_digest(db)
    result = run_cli("report", "--db", str(db), "--out", str(tmp_path / "r"), "--json", "--net")
    assert result.exit_code == 1
    assert result.output.startswith("Error: --net needs the false-positive rate")
    assert len(result.output.strip().splitlines()) == 1
    assert file_digest(db) == before
    assert not (tmp_path / "r" / "rates.json").exists()


@pytest.fixture
def layered(tmp_path: Path) -> Path:
    """Two sweeps with the same counts, one patched at layers 40 and 41, one at 41 and 44."""
    db = tmp_path / "two.sqlite"
    import_sweep(db, hand_sweep(tmp_path / "a"), "early")
    import_sweep(db, hand_sweep(tmp_path / "b", layers=(41, 44)), "late")
    return db


def test_compare_places_each_sweep_on_its_own_layers(layered: Path, tmp_path: Path) -> None:
    """early's layer-40 counts sit at 40, late's at 41; the shared axis is 40, 41, 44."""
    store = open_store(str(layered))
    try:
        result = run_compare(store, ["early", "late"], ["unsteered_to_steered"],
                             tmp_path / "c", html=True, ci=True, rates_json=True)
    finally:
        store.close()
    ax = compare_figure(result.comparison, "unsteered_to_steered", ci=True).axes[0]
    means = {line.get_label(): ([x for x in line.get_xdata() if not math.isnan(x)],
                                [y for y in line.get_ydata() if not math.isnan(y)])
             for line in ax.lines if line.get_label().startswith("Mean [")}
    assert means["Mean [early]"] == ([40, 41], pytest.approx([0.35 / 3, 0.6]))
    assert means["Mean [late]"] == ([41, 44], pytest.approx([0.35 / 3, 0.6]))
    # late ran 41 and 44, not 42 and 43: its line and band break there
    late = next(line for line in ax.lines if line.get_label() == "Mean [late]")
    assert math.isnan(late.get_xdata()[1])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    xs = [[(round(float(p.vertices[:, 0].min()), 6), round(float(p.vertices[:, 0].max()), 6))
           for p in b.get_paths()] for b in bands]
    assert xs == [[(40.0, 41.0)], [(40.85, 41.15), (43.85, 44.15)]]
    table = result.tables["unsteered_to_steered"].splitlines()
    assert table[1].split()[-3:] == ["40", "41", "44"]
    early = next(line for line in table if line.split()[:2] == ["Mean", "early"])
    late = next(line for line in table if line.split()[:2] == ["Mean", "late"])
    assert early.split()[-3:] == ["12", "60", "-"]
    assert late.split()[-3:] == ["-", "12", "60"]
    assert result.html is not None
    page = result.html.read_text(encoding="utf-8")
    for sweep, cells in (("early", ["12", "60", ""]), ("late", ["", "12", "60"])):  # in %
        row = page.split(f"<th>Mean</th><th>{sweep}</th>")[1].split("</tr>")[0]
        found = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>.*?</td>", row)]
        assert found[1:] == cells  # after the unpatched column
    assert result.rates_json is not None
    data = load(result.rates_json)
    for sweep, layers in (("early", [40, 41]), ("late", [41, 44])):
        rows = rows_of(data, sweep=sweep, experiment="unsteered_to_steered", kind="line")
        assert [r["layer"] for r in rows] == layers
        assert [r["rate"] for r in rows] == pytest.approx([0.35 / 3, 0.6])
        assert rows[0]["lower"] == pytest.approx(over_words([0.10, 0.0, 0.25], 100)[0])
    legend_texts = [" ".join(t.get_text().split()) for legend in ax.get_children()
                    if type(legend).__name__ == "Legend" for t in legend.get_texts()]
    assert "95% band: Wilson-t over 3 words" in legend_texts


def test_compare_cli_takes_ci_and_json(layered: Path, tmp_path: Path) -> None:
    result = run_cli("report", "--db", str(layered), "--compare", "early", "late", "--ci",
                     "--json", "--out", str(tmp_path / "c"), "--experiments",
                     "unsteered_to_steered")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == \
        f"Rates with their 95% bands: {tmp_path / 'c'}/rates.json"
    data = load(tmp_path / "c" / "rates.json")
    assert {r["sweep"] for r in data["rows"]} == {"early", "late"}
    assert len(rows_of(data, kind="control")) == 2
    assert not math.isnan(rows_of(data, sweep="late", kind="control")[0]["rate"])
