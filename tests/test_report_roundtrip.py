"""Import a sweep in the JSON layout, export it again: users' files come back unchanged."""

import json
from pathlib import Path

from test_import_json import cli, json_files, write_tree


def test_import_then_export_gives_back_the_same_files(tmp_path: Path, db_path: Path) -> None:
    tree = write_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    result = cli("report", "--db", db_path, "--export-json", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    original, exported = json_files(tree), json_files(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, data in original.items():
        assert json.loads(exported[name]) == json.loads(data), name
        assert exported[name] == data, name


def test_the_round_trip_keeps_odd_content(tmp_path: Path, db_path: Path) -> None:
    """Non-ASCII text, empty answers, null verdicts and null rates all survive."""
    tree = write_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    assert cli("report", "--db", db_path, "--export-json", "--out",
                   tmp_path / "out").exit_code == 0
    out = tmp_path / "out" / "unsteered_to_steered"
    answers = json.loads((out / "layer_40" / "rollouts.json").read_text())
    flat = [a for values in answers.values() for a in values]
    assert "" in flat
    assert any("\u00e9" in a for a in flat) and any("\U0001f332" in a for a in flat)
    assert "Caf\u00e9" in answers
    coherence = json.loads((out / "layer_40" / "judgments_coherence.json").read_text())
    assert coherence["Trees"] == [None, None, None]
    scores = json.loads((out / "all_layer_scores.json").read_text())
    assert list(scores) == ["40", "41"]
    assert scores["40"]["Trees"] is None
    assert scores["40"]["Bread"] == 2 / 3
    assert not (out / "layer_42" / "judge_scores.json").exists()
    assert (out / "layer_42" / "rollouts.json").exists()


def test_export_import_export_is_byte_identical(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "patching_layer_sweep")
    first, second = tmp_path / "first.sqlite", tmp_path / "second.sqlite"
    assert cli("import-json", tree, "--db", first).exit_code == 0
    assert cli("report", "--db", first, "--export-json", "--out",
                   tmp_path / "a").exit_code == 0
    assert cli("import-json", tmp_path / "a", "--db", second, "--sweep",
                   "patching_layer_sweep").exit_code == 0
    assert cli("report", "--db", second, "--export-json", "--out",
                   tmp_path / "b").exit_code == 0
    assert json_files(tmp_path / "a") == json_files(tmp_path / "b")
