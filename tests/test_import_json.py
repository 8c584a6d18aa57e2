"""`patchdb import-json`: a sweep in the JSON layout moves into the store, once, or not at all."""

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from conftest import file_digest, run_cli
from sqlalchemy import func, select

from patchdb.store import JudgeConfig, Judgment, Rollout, open_store
from patchdb.store.sweeps import get_sweep, sweep_config

LAYERS = (40, 41, 42)
JUDGED_LAYERS = (40, 41)  # layer 42 has rollouts only, as if judging had not reached it
SAMPLES = 3
NEGATIVE = ["Dust", "Milk"]
POSITIVE = ["Bread", "Trees"]
SINGLE = ["Bread", "Trees", "Café"]
ANSWERS = ["I notice an injected thought about bread \u2014 warm loaves.", "",
           "Je d\u00e9tecte une pens\u00e9e : \u00ab arbres \u00bb \U0001f332", "Nothing unusual.",
           "Yes. It is about \"quotes\" and\nnew lines."]


def cli(*args: object) -> Result:
    """run_cli, taking paths and numbers as they are."""
    return run_cli(*(str(a) for a in args))


def dump(path: Path, data: Any) -> None:
    """Write JSON as the old scripts did (json.dump with indent=2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="ascii")


def rate(coherent: list[bool | None], detected: list[bool | None]) -> float | None:
    scored = [c and d for c, d in zip(coherent, detected, strict=True)
              if c is not None and d is not None]
    return sum(scored) / len(scored) if scored else None


def write_experiment(folder: Path, keys: list[str], grader: str, seed: int) -> None:
    rng = random.Random(seed)
    all_scores: dict[str, dict[str, float | None]] = {}
    for layer in LAYERS:
        answers = {k: [rng.choice(ANSWERS) for _ in range(SAMPLES)] for k in keys}
        dump(folder / f"layer_{layer}" / "rollouts.json", answers)
        if layer not in JUDGED_LAYERS:
            continue
        coherence = {k: [rng.choice([True, True, False, None]) for _ in range(SAMPLES)]
                     for k in keys}
        detected = {k: [rng.choice([True, False, None]) for _ in range(SAMPLES)] for k in keys}
        coherence[keys[1]] = [None] * SAMPLES  # a key with no scorable sample: rate null
        coherence[keys[0]] = [True] * SAMPLES
        detected[keys[0]] = [True, False, True]
        dump(folder / f"layer_{layer}" / "judgments_coherence.json", coherence)
        dump(folder / f"layer_{layer}" / f"judgments_{grader}.json", detected)
        scores = {k: rate(coherence[k], detected[k]) for k in keys}
        dump(folder / f"layer_{layer}" / "judge_scores.json", scores)
        all_scores[str(layer)] = scores
    dump(folder / "all_layer_scores.json", all_scores)


def write_tree(root: Path) -> Path:
    """A small sweep in the layout users have: two experiments, three layers, odd answers."""
    pairs = [f"{s}_to_{t}" for s in NEGATIVE for t in POSITIVE]
    write_experiment(root / "failure_to_success", pairs, "detection_identification", 1)
    write_experiment(root / "unsteered_to_steered", SINGLE, "detection", 2)
    return root


def json_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json"))}


def count(db: Path, model: type) -> int:
    store = open_store(str(db))
    try:
        with store.read() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        store.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "patching_layer_sweep")


def test_import_registers_the_sweep_it_finds(tree: Path, db_path: Path) -> None:
    result = cli("import-json", tree, "--db", db_path, "--model", "google/gemma-3-27b-it")
    assert result.exit_code == 0, result.output
    n_rollouts = (4 + 3) * len(LAYERS) * SAMPLES
    n_judgments = (4 + 3) * len(JUDGED_LAYERS) * SAMPLES * 2
    assert f"Imported {n_rollouts} new rollouts and {n_judgments} new judgments" in result.output
    store = open_store(str(db_path))
    try:
        with store.read() as session:
            sweep = get_sweep(session, None)
            config = sweep_config(sweep)
            backends = session.scalars(select(JudgeConfig.backend)).all()
            answer = session.scalar(select(Rollout.answer).where(
                Rollout.answer.like("Je d%")).limit(1))
            unparsed = session.scalar(select(func.count()).select_from(Judgment)
                                      .where(Judgment.verdict.is_(None)))
    finally:
        store.close()
    assert sweep.name == "patching_layer_sweep"
    assert config.model == "google/gemma-3-27b-it"
    assert config.experiments == ["failure_to_success", "unsteered_to_steered"]
    assert config.negative_words == NEGATIVE
    assert config.positive_words == ["Bread", "Trees", "Café"]
    assert config.patch_layers == "40-42"
    assert config.samples == SAMPLES
    assert backends == ["import"]
    assert answer == ANSWERS[2]
    assert unparsed and unparsed > 0
    assert count(db_path, Rollout) == n_rollouts
    assert count(db_path, Judgment) == n_judgments


def test_hidden_folders_are_skipped(tree: Path, db_path: Path) -> None:
    (tree / ".ipynb_checkpoints").mkdir()
    (tree / "failure_to_success" / ".cache").mkdir()
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 0, result.output


def test_importing_twice_changes_nothing(tree: Path, db_path: Path) -> None:
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    before = file_digest(db_path)
    again = cli("import-json", tree, "--db", db_path)
    assert again.exit_code == 0, again.output
    assert "already in the store" in again.output
    assert "Imported 0 new rollouts and 0 new judgments" in again.output
    assert file_digest(db_path) == before


def test_import_adds_judgments_that_arrive_later(tree: Path, db_path: Path) -> None:
    judged = tree / "failure_to_success" / "layer_42"
    moved = {p: p.read_bytes() for p in judged.parent.glob("layer_41/judgments_*.json")}
    for path in moved:
        path.unlink()
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    for path, data in moved.items():
        path.write_bytes(data)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 0, result.output
    assert f"Imported 0 new rollouts and {4 * SAMPLES * 2} new judgments" in result.output


def test_sweep_name_option(tree: Path, db_path: Path) -> None:
    assert cli("import-json", tree, "--db", db_path, "--sweep", "old-run").exit_code == 0
    result = cli("status", "--db", db_path, "--sweep", "old-run")
    assert result.exit_code == 0, result.output


def _bad_json(tree: Path) -> tuple[Path, str]:
    path = tree / "failure_to_success" / "layer_41" / "rollouts.json"
    path.write_text('{"Dust_to_Bread": ["a", "b",', encoding="utf-8")
    return path, "invalid JSON (Expecting value at line 1 column 29)"


def _not_an_object(tree: Path) -> tuple[Path, str]:
    path = tree / "unsteered_to_steered" / "layer_40" / "rollouts.json"
    dump(path, ["an answer"])
    return path, "expected an object {key: ...}, got list"


def _answer_not_text(tree: Path) -> tuple[Path, str]:
    path = tree / "unsteered_to_steered" / "layer_40" / "rollouts.json"
    dump(path, {"Bread": ["fine", 3]})
    return path, "key 'Bread' must hold a list of answer strings"


def _verdict_not_bool(tree: Path) -> tuple[Path, str]:
    path = tree / "unsteered_to_steered" / "layer_41" / "judgments_detection.json"
    dump(path, {"Bread": ["yes", True, None]})
    return path, "key 'Bread' must hold a list of true, false or null"


def _wrong_length(tree: Path) -> tuple[Path, str]:
    path = tree / "failure_to_success" / "layer_40" / "judgments_coherence.json"
    dump(path, {"Dust_to_Bread": [True]})
    return path, "key 'Dust_to_Bread' has 1 verdicts for 3 answers in rollouts.json"


def _not_a_pair(tree: Path) -> tuple[Path, str]:
    path = tree / "failure_to_success" / "layer_42" / "rollouts.json"
    dump(path, {"Dust": ["a"]})
    return path, "key 'Dust' is not Source_to_Target (experiment failure_to_success)"


def _unknown_key(tree: Path) -> tuple[Path, str]:
    path = tree / "failure_to_success" / "layer_40" / "judgments_detection_identification.json"
    dump(path, {"Milk_to_Milk": [True, True, True]})
    return path, "key 'Milk_to_Milk' has no answers in rollouts.json"


def _unknown_grader(tree: Path) -> tuple[Path, str]:
    path = tree / "failure_to_success" / "layer_40" / "judgments_vibes.json"
    dump(path, {})
    return path, ("unknown judgment type 'vibes' "
                  "(known: coherence, detection, detection_identification)")


def _unknown_experiment(tree: Path) -> tuple[Path, str]:
    path = tree / "steered_to_nowhere"
    path.mkdir()
    return path, ("not an experiment folder (known: failure_to_success, success_to_failure, "
                  "steered_to_unsteered, unsteered_to_steered)")


def _bad_score(tree: Path) -> tuple[Path, str]:
    path = tree / "failure_to_success" / "all_layer_scores.json"
    dump(path, {"40": {"Dust_to_Bread": "high"}})
    return path, "key 'Dust_to_Bread' must hold a rate (a number or null)"


@pytest.mark.parametrize("breaks", [
    _bad_json, _not_an_object, _answer_not_text, _verdict_not_bool, _wrong_length, _not_a_pair,
    _unknown_key, _unknown_grader, _unknown_experiment, _bad_score,
])
def test_a_malformed_file_is_named_and_nothing_is_imported(
        tree: Path, db_path: Path, breaks: Any) -> None:
    assert cli("init", "--db", db_path).exit_code == 0
    before = file_digest(db_path)
    path, problem = breaks(tree)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 1
    assert result.output == f"Error: {path}: {problem}\n"
    assert file_digest(db_path) == before


def test_a_file_that_disagrees_with_the_store_is_refused(tree: Path, db_path: Path) -> None:
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    before = file_digest(db_path)
    path = tree / "unsteered_to_steered" / "layer_41" / "judgments_detection.json"
    data = json.loads(path.read_text())
    data["Trees"][0] = not data["Trees"][0] if data["Trees"][0] is not None else True
    dump(path, data)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {path}: sample 0 of (none)/Trees differs from the imported verdict already in "
        "the store; nothing was imported\n")
    assert file_digest(db_path) == before


def test_a_missing_store_is_not_created_for_a_bad_tree(tree: Path, db_path: Path) -> None:
    _bad_json(tree)
    assert cli("import-json", tree, "--db", db_path).exit_code == 1
    assert not db_path.exists()


def test_patch_layers_before_the_default_steer_layer_need_the_option(
        tmp_path: Path, db_path: Path) -> None:
    root = tmp_path / "early"
    dump(root / "unsteered_to_steered" / "layer_10" / "rollouts.json", {"Bread": ["a"]})
    result = cli("import-json", root, "--db", db_path)
    assert result.exit_code == 1
    assert result.output == ("Error: patch layers start at 10, not after the default steer layer "
                             "38; pass --steer-layer\n")
    result = cli("import-json", root, "--db", db_path, "--steer-layer", "5")
    assert result.exit_code == 0, result.output


def test_stale_judge_scores_are_noted_not_trusted(tree: Path, db_path: Path) -> None:
    path = tree / "failure_to_success" / "layer_40" / "judge_scores.json"
    scores = json.loads(path.read_text())
    scores["Dust_to_Bread"] = 0.99
    dump(path, scores)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 0, result.output
    assert (f"Note: {path} disagrees with its judgments; patchdb recomputes rates from the "
            "judgments.") in result.output
    assert cli("report", "--db", db_path, "--export-json", "--out", "out").exit_code == 0
    exported = json.loads(Path("out/failure_to_success/layer_40/judge_scores.json").read_text())
    assert exported["Dust_to_Bread"] == 2 / 3
