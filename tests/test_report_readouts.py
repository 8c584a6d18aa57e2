"""The readouts as the report arranges them, on a store whose readout rows are written here by
hand (no model): the bold lines, baselines, random vector, no-injection readout and yes-bias
index against hand-computed values, the table, the JSON, the exported file and the plot."""

import json
import math
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli

from patchdb.config import config_from_json
from patchdb.report.readout_export import export_readouts
from patchdb.report.readout_plot import readout_figure
from patchdb.report.readouts import readout_table, readouts_json, sweep_readouts
from patchdb.store import open_store

CONFIG = """
[sweep]
name = "r"
model = "nowhere"
steer_layer = 1
patch_layers = "2-3"
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
experiments = ["failure_to_success", "steered_to_unsteered"]
controls = ["random_vector", "unrelated_questions"]
"""

# (experiment, layer, source, target, question, p_yes)
ROWS = [
    ("failure_to_success", 2, "Dust", "Bread", "", 0.2),
    ("failure_to_success", 3, "Dust", "Bread", "", 0.4),
    ("failure_to_success", 2, "Dust", "Trees", "", 0.6),
    ("failure_to_success", -1, "", "Bread", "", 0.1),
    ("failure_to_success", -1, "", "Trees", "", 0.3),
    ("failure_to_success", -2, "", "Bread", "", 0.15),
    ("failure_to_success", 2, "Dust", "Bread", "Q1?", 0.5),
    ("failure_to_success", 2, "Dust", "Bread", "Q2?", 0.3),
    ("failure_to_success", -1, "", "", "Q1?", 0.2),
    ("failure_to_success", -1, "", "", "Q2?", 0.4),
    ("steered_to_unsteered", 2, "Bread", "", "", 0.5),
    ("steered_to_unsteered", 2, "Trees", "", "", 0.7),
    ("steered_to_unsteered", 3, "Bread", "", "", 0.9),
    ("steered_to_unsteered", -1, "", "", "", 0.05),
]


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    db = tmp_path / "r.sqlite"
    (tmp_path / "r.toml").write_text(CONFIG)
    assert run_cli("init", "--config", tmp_path / "r.toml", "--db", db).exit_code == 0
    with sqlite3.connect(db) as conn:
        ids = dict(conn.execute("SELECT name, id FROM experiments"))
        conn.executemany(
            "INSERT INTO readouts (experiment_id, patch_layer, source_word, target_word, "
            "question, p_yes, p_no, entropy, top_token, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 2.0, 'x', '2026-12-08 00:00:00')",
            [(ids[e], layer, s, t, q, p, 1 - p - 0.1) for e, layer, s, t, q, p in ROWS])
    return db


def _readouts(db: Path) -> dict[str, object]:
    store = open_store(str(db))
    try:
        with store.read() as session:
            from sqlalchemy import text

            config = config_from_json(session.execute(text("SELECT config_json FROM sweeps"))
                                      .scalar_one())
            found = sweep_readouts(session, "r", config,
                                   ["failure_to_success", "steered_to_unsteered"])
    finally:
        store.close()
    return {er.name: er for er in found}


def test_lines_baselines_controls_and_the_yes_bias_index(store_path: Path) -> None:
    ers = _readouts(store_path)
    pairs, single = ers["failure_to_success"], ers["steered_to_unsteered"]
    assert pairs.layers == [2, 3]
    assert [k.label for k in pairs.keys] == ["Dust_to_Bread", "Dust_to_Trees"]
    bread, trees = pairs.groups
    assert (bread.label, trees.label) == ("Bread", "Trees")
    assert bread.values("p_yes") == pytest.approx([0.2, 0.4])
    assert trees.values("p_yes")[0] == pytest.approx(0.6) and math.isnan(trees.values("p_yes")[1])
    assert bread.values("p_no") == pytest.approx([0.7, 0.5])
    # ((0.5 - 0.2) + (0.3 - 0.4)) / 2, the view's mean over the questions
    assert bread.values("yes_bias")[0] == pytest.approx(0.1)
    assert math.isnan(bread.values("yes_bias")[1]) and pairs.has_yes_bias
    assert {w: p.p_yes for w, p in pairs.baselines.items()} == {"Bread": 0.1, "Trees": 0.3}
    assert {w: p.p_yes for w, p in pairs.random_vector.items()} == {"Bread": 0.15}
    assert pairs.control is not None and pairs.control.p_yes == 0.05
    [mean] = single.groups
    assert mean.label == "Mean" and mean.values("p_yes") == pytest.approx([0.6, 0.9])
    assert single.baselines[""].p_yes == 0.05 and not single.has_yes_bias

    assert readout_table(pairs).splitlines() == [
        "First-token readout, failure_to_success",
        "P(yes)             2     3   base",
        "Bread           0.20  0.40   0.10",
        "Trees           0.60     -   0.30",
        "yes-bias Bread  0.10     -      -",
        "yes-bias Trees     -     -      -",
        "no injection: P(yes) 0.050, P(no) 0.850, entropy 2.00 nats",
    ]
    assert readout_table(single).splitlines()[2] == "Mean    0.60  0.90   0.05"

    data = json.loads(json.dumps(readouts_json([pairs, single])))
    assert data["failure_to_success"]["lines"][1]["p_yes"] == [0.6, None]
    assert data["failure_to_success"]["random_vector"]["Bread"]["p_yes"] == 0.15
    assert data["steered_to_unsteered"]["no_injection"]["p_no"] == pytest.approx(0.85)


def test_the_exported_file_and_the_plot(store_path: Path, tmp_path: Path) -> None:
    ers = _readouts(store_path)
    [path] = export_readouts(ers["failure_to_success"], tmp_path / "out")
    assert path == tmp_path / "out" / "failure_to_success" / "all_layer_readouts.json"
    data = json.loads(path.read_text())
    assert list(data) == ["2", "3", "baseline", "random_vector"]
    assert data["2"]["Dust_to_Bread"] == {"p_yes": 0.2, "p_no": pytest.approx(0.7),
                                          "entropy": 2.0, "yes_bias": pytest.approx(0.1)}
    assert list(data["3"]) == ["Dust_to_Bread"]  # Dust_to_Trees has no readout at layer 3
    assert data["baseline"]["Trees"]["p_yes"] == 0.3
    assert data["random_vector"] == {"Bread": {"p_yes": 0.15, "p_no": pytest.approx(0.75),
                                               "entropy": 2.0, "yes_bias": None}}

    figure = readout_figure(ers["failure_to_success"], "failure_to_success")
    assert len(figure.axes) == 2  # P(yes), and the yes-bias index below it
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert labels == ["Bread", "Trees", "unpatched", "random vector", "no injection"]
    assert figure.axes[0].get_ylabel() == "First-token P(yes)"
    out = tmp_path / "readout_plot.png"
    figure.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(readout_figure(ers["steered_to_unsteered"], "s").axes) == 1


def test_report_draws_prints_and_writes_the_readouts(store_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = run_cli("report", "--db", store_path, "--out", out, "--json", "--html",
                     "--export-json")
    assert result.exit_code == 0, result.output
    assert f"Readout plot: {out / 'failure_to_success' / 'readout_plot.png'}" in result.output
    assert "Bread           0.20  0.40   0.10" in result.output  # the readout table
    png = (out / "steered_to_unsteered" / "readout_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "readouts.json").read_text())
    assert document["format"] == "patchdb-readouts/1"
    assert document["experiments"]["steered_to_unsteered"]["lines"][0]["p_yes"] == \
        pytest.approx([0.6, 0.9])
    exported = json.loads((out / "failure_to_success" / "all_layer_readouts.json").read_text())
    assert exported["baseline"]["Bread"]["p_yes"] == 0.1
    page = (out / "report.html").read_text()
    assert '<section id="readouts"><h2>First-token readout</h2>' in page
    assert page.count('alt="first-token P(yes) against patch layer') == 2


def test_net_against_the_random_vector(tmp_path: Path) -> None:
    from word_store import import_sweep, write_sweep

    root = write_sweep(tmp_path / "tree", {
        "failure_to_success": {40: {"Dust_to_Bread": (6, 10), "Dust_to_Trees": (2, 10)}},
        "steered_to_unsteered": {40: {"Bread": (5, 10)}},
    }, {"failure_to_success": {"Bread": (3, 10), "Trees": (1, 10)},
        "steered_to_unsteered": {"(none)": (1, 10)}})
    # the random-vector rollouts in their own folder: 2 + 4 of 20 claim detection
    for key, k in (("Bread", 2), ("Trees", 4)):
        folder = root / "failure_to_success" / "random_vector"
        folder.mkdir(exist_ok=True)
        for name, values in (("rollouts", [f"a{i}" for i in range(10)]),
                             ("judgments_coherence", [True] * 10),
                             ("judgments_detection_identification", [True] * k + [False] * (10 - k))):
            path = folder / f"{name}.json"
            data = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps({**data, key: values}))
    db = tmp_path / "w.sqlite"
    import_sweep(db, root, "w")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM rollouts WHERE patch_layer = -2").fetchone() \
            == (20,)
        assert '"controls": ["random_vector"]' in conn.execute(
            "SELECT config_json FROM sweeps").fetchone()[0]

    def net_rates(*extra: str) -> dict[tuple[str, str], tuple[float, str]]:
        out = tmp_path / ("out" + "".join(extra))
        result = run_cli("report", "--db", db, "--out", out, "--net", "--json", *extra)
        assert result.exit_code == 0, result.output
        rows = json.loads((out / "rates.json").read_text())["rows"]
        return {(r["experiment"], r["line"]): (r["net_rate"], r["net_method"])
                for r in rows if r["kind"] == "line"}

    against = net_rates("--against", "random_vector")
    # rate minus the mean of the words' random-vector rates (2/10, 4/10); steered_to_unsteered
    # keeps the control
    assert against[("failure_to_success", "Bread")][0] == pytest.approx(0.6 - 0.3)
    assert against[("failure_to_success", "Trees")][0] == pytest.approx(0.2 - 0.3)
    assert against[("failure_to_success", "Bread")][1].endswith("minus random vector (Newcombe)")
    assert against[("steered_to_unsteered", "Mean")][0] == pytest.approx(0.5 - 0.1)
    control = net_rates()
    assert control[("failure_to_success", "Bread")][0] == pytest.approx(0.6 - 0.1)
    assert control[("failure_to_success", "Bread")][1].endswith("minus false positives (Newcombe)")
    printed = run_cli("report", "--db", db, "--out", tmp_path / "p", "--net", "--against",
                      "random_vector").output
    assert ("Random vector (each target word's own direction at its norm, no patch; the mean "
            "over 2 words): 30%") in printed
    assert "Wilson-t over 2 words)" in printed  # its band is over the words, not their samples
