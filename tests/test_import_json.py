"""`patchdb import-json`: a sweep in the JSON layout moves into the store, once, or not at all.

Two trees: `write_plan_tree` (tests/plan_tree.py) writes the plan's layout with hand-chosen
verdicts and hand-computed rates; `write_tree` here writes a random-content tree in the later
naming (judgments_detection_identification.json) that other report tests build on.
"""

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from conftest import file_digest, run_cli
from plan_tree import COHERENCE, PAIR_KEYS, PLAIN_DETECTION, SCORED, SINGLE_KEYS, write_plan_tree
from plan_tree import SAMPLES as PLAN_SAMPLES
from plan_tree import dump as dump4
from sqlalchemy import func, select

from patchdb.store import JudgeConfig, Judgment, Rollout, open_store
from patchdb.store.models import Experiment
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
    """Write JSON with json.dump's default separators, indented."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="ascii")


def write_experiment(folder: Path, keys: list[str], grader: str, seed: int) -> None:
    """Random answers and verdicts; no score files (the plan tree tests those)."""
    rng = random.Random(seed)
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


def write_tree(root: Path) -> Path:
    """A small sweep in the later naming: two experiments, three layers, odd answers."""
    pairs = [f"{s}_to_{t}" for s in NEGATIVE for t in POSITIVE]
    write_experiment(root / "failure_to_success", pairs, "detection_identification", 1)
    write_experiment(root / "unsteered_to_steered", SINGLE, "detection", 2)
    return root


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
    path, problem = _bad_json(tree)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 1
    assert result.output == f"Error: {path}: {problem}\n"
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


# --- the plan's own layout (tests/plan_tree.py) --------------------------------------------------


def stored_verdicts(db: Path, experiment: str, grader: str) -> dict[tuple[int, str], list[Any]]:
    """{(layer, key): verdicts by sample index} for one experiment and grader."""
    store = open_store(str(db))
    try:
        with store.read() as session:
            rows = session.execute(select(
                Rollout.patch_layer, Rollout.source_word, Rollout.target_word, Judgment.verdict)
                .join(Judgment, Judgment.rollout_id == Rollout.id)
                .where(Judgment.grader == grader, Rollout.experiment_id.in_(
                    select(Experiment.id).where(Experiment.name == experiment)))
                .order_by(Rollout.patch_layer, Rollout.source_word, Rollout.target_word,
                          Rollout.sample_index)).all()
    finally:
        store.close()
    result: dict[tuple[int, str], list[Any]] = {}
    for layer, source, target, verdict in rows:
        key = f"{source}_to_{target}" if source and target else source or target
        result.setdefault((layer, key), []).append(verdict)
    return result


def by_layer_key(data: dict[int, dict[str, list[Any]]]) -> dict[tuple[int, str], list[Any]]:
    return {(layer, key): v for layer, keys in data.items() for key, v in keys.items()}


@pytest.mark.parametrize("naming", ["plan", "split", "both"])
def test_each_naming_puts_verdicts_under_their_grader(
        tmp_path: Path, db_path: Path, naming: str) -> None:
    """Plan naming: a pair experiment's judgments_detection.json is detection+identification;
    beside a judgments_detection_identification.json it is plain detection."""
    tree = write_plan_tree(tmp_path / "patching_layer_sweep", naming)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 0, result.output
    n_keys = len(PAIR_KEYS) + len(SINGLE_KEYS)
    n_judgments = n_keys * 2 * PLAN_SAMPLES * 2 + (
        len(PAIR_KEYS) * 2 * PLAN_SAMPLES if naming == "both" else 0)
    assert result.output.splitlines()[1].startswith(
        f"Imported {n_keys * 3 * PLAN_SAMPLES} new rollouts and {n_judgments} new judgments")
    assert "Note:" not in result.output  # every judge_scores.json agrees with its verdicts
    pairs, single = "failure_to_success", "unsteered_to_steered"
    assert stored_verdicts(db_path, pairs, "detection_identification") == by_layer_key(
        SCORED[pairs])
    assert stored_verdicts(db_path, pairs, "detection") == (
        by_layer_key(PLAIN_DETECTION) if naming == "both" else {})
    assert stored_verdicts(db_path, pairs, "coherence") == by_layer_key(COHERENCE[pairs])
    assert stored_verdicts(db_path, single, "detection") == by_layer_key(SCORED[single])
    assert stored_verdicts(db_path, single, "detection_identification") == {}


def test_a_pair_verdict_that_disagrees_names_the_plan_file(tmp_path: Path, db_path: Path) -> None:
    tree = write_plan_tree(tmp_path / "patching_layer_sweep")
    assert cli("import-json", tree, "--db", db_path).exit_code == 0
    path = tree / "failure_to_success" / "layer_41" / "judgments_detection.json"
    data = json.loads(path.read_text())
    assert data["Dust_to_Bread"][3] is False
    data["Dust_to_Bread"][3] = True
    dump4(path, data)
    before = file_digest(db_path)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {path}: sample 3 of Dust/Bread differs from the imported verdict already in "
        "the store; nothing was imported\n")
    assert file_digest(db_path) == before


def test_stale_judge_scores_are_noted_not_trusted(tmp_path: Path, db_path: Path) -> None:
    tree = write_plan_tree(tmp_path / "patching_layer_sweep")
    path = tree / "failure_to_success" / "layer_40" / "judge_scores.json"
    scores = json.loads(path.read_text())
    scores["Dust_to_Bread"] = 0.99
    dump4(path, scores)
    result = cli("import-json", tree, "--db", db_path)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("Note:")]
    assert notes == [f"Note: {path} disagrees with its judgments; patchdb recomputes rates from "
                     "the judgments."]
    assert cli("report", "--db", db_path, "--export-json", "--out", "out").exit_code == 0
    exported = json.loads(Path("out/failure_to_success/layer_40/judge_scores.json").read_text())
    assert exported["Dust_to_Bread"] == 0.5  # TT, TF, TT, FT: 2 of 4
