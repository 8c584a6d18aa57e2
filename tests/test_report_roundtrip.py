"""Import a tree in the plan's layout, report, export: the same rates and the same files come back."""

import json
from pathlib import Path

import pytest
from plan_tree import JUDGED_LAYERS, RATES, json_files, write_plan_tree
from test_import_json import cli, write_tree


def import_and_export(tree: Path, db: Path, out: Path) -> Path:
    assert cli("import-json", tree, "--db", db).exit_code == 0
    result = cli("report", "--db", db, "--export-json", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_the_plan_tree_keeps_its_rates(tmp_path: Path, db_path: Path) -> None:
    out = import_and_export(write_plan_tree(tmp_path / "patching_layer_sweep"), db_path,
                            tmp_path / "out")
    for experiment, by_layer in RATES.items():
        folder = out / experiment
        all_scores = json.loads((folder / "all_layer_scores.json").read_text())
        assert all_scores == {str(layer): by_layer[layer] for layer in JUDGED_LAYERS}
        for layer in JUDGED_LAYERS:
            scores = json.loads((folder / f"layer_{layer}" / "judge_scores.json").read_text())
            assert scores == by_layer[layer]


def test_the_plan_tree_comes_back_byte_for_byte(tmp_path: Path, db_path: Path) -> None:
    """The export writes the plan's names with json.dump(..., indent=4), as the tree has them."""
    tree = write_plan_tree(tmp_path / "patching_layer_sweep")
    out = import_and_export(tree, db_path, tmp_path / "out")
    original, exported = json_files(tree), json_files(out)
    assert sorted(exported) == sorted(original)
    for name, data in original.items():
        assert exported[name] == data, name
    assert not list(out.rglob("judgments_detection_identification.json"))


def test_a_tree_of_the_later_naming_exports_in_the_plans(tmp_path: Path, db_path: Path) -> None:
    out = import_and_export(write_plan_tree(tmp_path / "split", "split"), db_path,
                            tmp_path / "out")
    assert json_files(out) == json_files(write_plan_tree(tmp_path / "plan"))


def test_plain_detection_beside_keeps_the_later_naming(tmp_path: Path, db_path: Path) -> None:
    """Where a pair layer holds plain detection verdicts too, one file cannot hold both: the
    export writes both files under the later naming, which imports back the same."""
    tree = write_plan_tree(tmp_path / "both", "both")
    out = import_and_export(tree, db_path, tmp_path / "out")
    assert json_files(out) == json_files(tree)


@pytest.mark.parametrize("naming", ["plan", "split", "both"])
def test_export_import_export_is_byte_identical(tmp_path: Path, naming: str) -> None:
    tree = write_plan_tree(tmp_path / "patching_layer_sweep", naming)
    first, second = tmp_path / "first.sqlite", tmp_path / "second.sqlite"
    import_and_export(tree, first, tmp_path / "a")
    assert cli("import-json", tmp_path / "a", "--db", second, "--sweep",
               "patching_layer_sweep").exit_code == 0
    assert cli("report", "--db", second, "--export-json", "--out", tmp_path / "b").exit_code == 0
    assert json_files(tmp_path / "a") == json_files(tmp_path / "b")


def test_the_round_trip_keeps_odd_content(tmp_path: Path, db_path: Path) -> None:
    """Non-ASCII text, empty answers, null verdicts and null rates all survive."""
    out = import_and_export(write_tree(tmp_path / "patching_layer_sweep"), db_path,
                            tmp_path / "out") / "unsteered_to_steered"
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
    assert scores["40"]["Bread"] == 2 / 3  # coherent T, T, T; detected T, F, T
    assert not (out / "layer_42" / "judge_scores.json").exists()
    assert (out / "layer_42" / "rollouts.json").exists()
    text = (out / "layer_40" / "rollouts.json").read_text(encoding="ascii")
    assert text.startswith('{\n    "') and not text.endswith("\n")  # indent=4, as json.dump
