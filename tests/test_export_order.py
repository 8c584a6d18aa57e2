"""The JSON export as the original scripts wrote it: keys in their order (failure_to_success
target first), and a rate of nothing scored, which they wrote as 0.0 and patchdb as null."""

import json
from pathlib import Path

from plan_tree import dump, write_plan_tree
from test_import_json import cli

from patchdb.experiments import EXPERIMENTS, key_label
from patchdb.report.export import original_key_order

POSITIVE, NEGATIVE = ["Bread", "Trees"], ["Dust", "Milk", "Rubber"]


def labels(experiment: str) -> list[str]:
    exp = EXPERIMENTS[experiment]
    return [key_label(exp, *key) for key in original_key_order(exp, POSITIVE, NEGATIVE)]


def test_failure_to_success_is_target_first_the_others_source_first() -> None:
    assert labels("failure_to_success") == [
        "Dust_to_Bread", "Milk_to_Bread", "Rubber_to_Bread",
        "Dust_to_Trees", "Milk_to_Trees", "Rubber_to_Trees"]
    assert labels("success_to_failure") == [
        "Bread_to_Dust", "Bread_to_Milk", "Bread_to_Rubber",
        "Trees_to_Dust", "Trees_to_Milk", "Trees_to_Rubber"]
    assert labels("steered_to_unsteered") == ["Bread", "Trees"]
    assert labels("unsteered_to_steered") == ["Bread", "Trees"]


def test_the_export_writes_keys_in_that_order(tmp_path: Path, db_path: Path) -> None:
    tree = write_plan_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    assert cli("report", "--db", db_path, "--export-json", "--out", "out").exit_code == 0
    order = ["Dust_to_Bread", "Milk_to_Bread", "Dust_to_Trees", "Milk_to_Trees"]
    for name in ("layer_40/rollouts.json", "layer_40/judgments_coherence.json",
                 "layer_41/judgments_detection.json", "layer_41/judge_scores.json"):
        assert list(json.loads(Path("out/failure_to_success", name).read_text())) == order
    everything = json.loads(Path("out/failure_to_success/all_layer_scores.json").read_text())
    assert [list(scores) for scores in everything.values()] == [order, order]


def test_an_original_0_0_for_nothing_scored_imports_without_a_note(tmp_path: Path,
                                                                    db_path: Path) -> None:
    """Milk_to_Bread at layer 40 has no coherence verdict parsed: nothing scored. The original
    scripts wrote its rate as 0.0; patchdb takes that as agreeing, and writes null."""
    tree = write_plan_tree(tmp_path / "patching_layer_sweep")
    for name in ("layer_40/judge_scores.json", "all_layer_scores.json"):
        path = tree / "failure_to_success" / name
        scores = json.loads(path.read_text())
        inner = scores.get("40", scores)
        assert inner["Milk_to_Bread"] is None
        inner["Milk_to_Bread"] = 0.0
        dump(path, scores)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 0, result.output
    assert "Note:" not in result.output
    assert cli("report", "--db", db_path, "--export-json", "--out", "out").exit_code == 0
    exported = json.loads(Path("out/failure_to_success/layer_40/judge_scores.json").read_text())
    assert exported["Milk_to_Bread"] is None and exported["Dust_to_Bread"] == 0.5

    # a 0.0 where something was scored is still a disagreement
    path = tree / "failure_to_success" / "layer_41" / "judge_scores.json"
    scores = json.loads(path.read_text())
    scores["Dust_to_Bread"] = 0.0  # 3 of 4 by hand
    dump(path, scores)
    again = cli("import-json", tree, "--db", tmp_path / "second.sqlite")
    assert [line for line in again.output.splitlines() if line.startswith("Note:")] == [
        f"Note: {path} disagrees with its judgments; patchdb recomputes rates from the "
        "judgments."]
