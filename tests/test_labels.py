"""Human labels: the labels table, `label --set` and the stratified `label --next` plan."""

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import file_digest, run_cli
from labeled_store import CONFIG, fill, init_store
from sqlalchemy import func, select

from patchdb.label.labels import default_labeler
from patchdb.store import Experiment, Rollout, open_store
from patchdb.store.models import Label, Sweep


@pytest.fixture
def db(store_db: str, tmp_path: Path) -> str:
    init_store(store_db, tmp_path)
    store = open_store(store_db)
    store.transact(fill)
    store.close()
    return store_db


def rollout_id(db: str, experiment: str, layer: int, sample: int) -> int:
    store = open_store(db)
    with store.read() as s:
        found = s.scalar(select(Rollout.id).join(Experiment).where(
            Experiment.name == experiment, Rollout.patch_layer == layer,
            Rollout.sample_index == sample).order_by(Rollout.id))
    store.close()
    assert found is not None
    return int(found)


def labels(db: str) -> list[tuple[int, str, str, bool, str | None]]:
    store = open_store(db)
    with store.read() as s:
        rows = s.execute(select(Label.rollout_id, Label.grader, Label.labeler, Label.label,
                                Label.note).order_by(Label.id)).all()
    store.close()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def test_set_writes_overwrites_and_keeps_labelers_apart(db: str) -> None:
    rid = rollout_id(db, "failure_to_success", 3, 0)
    result = run_cli("label", "--db", db, "--set", rid, "--grader", "coherence", "--yes")
    assert result.exit_code == 0, result.output
    me = default_labeler()
    assert result.output == f"Labeled rollout {rid} coherence: YES (by {me}).\n"
    run_cli("label", "--db", db, "--set", rid, "--grader", "coherence", "--no", "--note", "rambles")
    run_cli("label", "--db", db, "--set", rid, "--grader", "detection_identification", "--yes",
            "--labeler", "ada")
    assert labels(db) == [(rid, "coherence", me, False, "rambles"),
                          (rid, "detection_identification", "ada", True, None)]
    store = open_store(db)
    with store.read() as s:
        stamp = s.scalar(select(Label.created_at).limit(1))
    store.close()
    # SQLite gives the stamp back naive; it must be UTC wall time, not local time.
    assert stamp is not None
    now = datetime.now(UTC)
    assert abs(stamp.replace(tzinfo=UTC) - now) < timedelta(minutes=2)


@pytest.mark.parametrize("args, message", [
    (["--set", "99999", "--grader", "coherence", "--yes"], "Error: no rollout with id 99999 in the store\n"),
    (["--set", "{rid}", "--grader", "detection", "--yes"],
     "Error: rollout {rid} (failure_to_success) is graded by coherence and "
     "detection_identification, not detection\n"),
    (["--set", "{rid}", "--yes"], "Error: --set needs exactly one --grader and one of --yes/--no\n"),
    (["--set", "{rid}", "--grader", "coherence", "--yes", "--labeler", " "],
     "Error: the labeler name is empty\n"),
    # --yes --no wrote whichever came last
    (["--set", "{rid}", "--grader", "coherence", "--yes", "--no"],
     "Error: --yes and --no exclude each other; give one\n"),
    (["--set", "{rid}", "--grader", "coherence", "--no", "--yes"],
     "Error: --yes and --no exclude each other; give one\n"),
    (["--set", "{rid}", "--grader", "coherence", "--yes", "--next"],
     "Error: --set and --next exclude each other\n"),
    (["--grader", "coherence", "--no"], "Error: --yes, --no and --note go with --set\n"),
    (["--next", "--note", "why"], "Error: --yes, --no and --note go with --set\n"),
])
def test_bad_labels_are_one_line_and_change_nothing(db: str, args: list[str],
                                                    message: str) -> None:
    rid = rollout_id(db, "failure_to_success", 3, 0)
    before = file_digest(Path(db)) if "://" not in db else None
    proc = subprocess.run([sys.executable, "-m", "patchdb", "label", "--db", db,
                           *[a.format(rid=rid) for a in args]], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", message.format(rid=rid))
    assert labels(db) == []
    if before is not None:
        assert file_digest(Path(db)) == before


@pytest.fixture
def two_sweeps(store_db: str, tmp_path: Path) -> str:
    """The labeled_store sweep "tiny" and a copy named "other", each with its 48 rollouts."""
    init_store(store_db, tmp_path)
    other = tmp_path / "other.toml"
    other.write_text(CONFIG.replace('name = "tiny"', 'name = "other"'))
    assert run_cli("init", "--config", other, "--db", store_db).exit_code == 0
    store = open_store(store_db)
    store.transact(fill)
    store.close()
    return store_db


def rollout_of(db: str, sweep: str) -> int:
    store = open_store(db)
    with store.read() as s:
        found = s.scalar(select(Rollout.id).join(Experiment).join(Sweep)
                         .where(Sweep.name == sweep).order_by(Rollout.id))
    store.close()
    assert found is not None
    return int(found)


def test_set_is_scoped_to_the_sweep(two_sweeps: str) -> None:
    """--set ignored --sweep: a rollout of another sweep was labeled."""
    db = two_sweeps
    theirs, ours = rollout_of(db, "other"), rollout_of(db, "tiny")
    before = file_digest(Path(db)) if "://" not in db else None
    for args, message in (
            (["--sweep", "tiny", "--set", str(theirs)],
             f"Error: rollout {theirs} belongs to sweep 'other', not to sweep 'tiny'\n"),
            (["--set", str(ours)],
             "Error: the store has several sweeps (tiny, other); choose one with --sweep\n"),
            (["--sweep", "nope", "--set", str(ours)],
             "Error: no sweep named 'nope' in the store (known: other, tiny)\n")):
        proc = subprocess.run([sys.executable, "-m", "patchdb", "label", "--db", db, *args,
                               "--grader", "coherence", "--yes"], capture_output=True, text=True)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", message)
    assert labels(db) == []
    if before is not None:
        assert file_digest(Path(db)) == before
    result = run_cli("label", "--db", db, "--sweep", "other", "--set", theirs, "--grader",
                     "coherence", "--no", "--labeler", "ada")
    assert result.output == f"Labeled rollout {theirs} coherence: NO (by ada).\n"
    assert labels(db) == [(theirs, "coherence", "ada", False, None)]


def next_item(db: str, *args: str) -> dict:  # type: ignore[type-arg]
    result = run_cli("label", "--db", db, "--next", "--json", *args)
    assert result.exit_code == 0, result.output
    data: dict = json.loads(result.output)  # type: ignore[type-arg]
    return data


def test_next_balances_judge_verdicts_and_spreads_over_cells(db: str) -> None:
    """Labeling what --next offers, 8 times for coherence: the judge said YES on sample 0 and NO
    on sample 1, so a balanced plan gives 4 of each, and 4 cells (2 experiments... x 2 layers)
    are reached before any cell gets a second label of the same verdict."""
    seen = []
    for _ in range(8):
        item = next_item(db, "--grader", "coherence", "--target", "8")["item"]
        seen.append((item["experiment"], item["patch_layer"], item["judge_verdict"]))
        run_cli("label", "--db", db, "--set", item["rollout_id"], "--grader", "coherence", "--yes")
    assert sorted(v for _, _, v in seen) == [False] * 4 + [True] * 4
    assert len({(e, layer) for e, layer, _ in seen}) == 8  # 4 experiments x 2 layers, no repeat
    assert [v for _, _, v in seen[:2]] in ([False, True], [True, False])
    done = next_item(db, "--grader", "coherence", "--target", "8")
    assert done["item"] is None
    assert done["progress"] == [{"grader": "coherence", "labeled": 8, "target": 8,
                                 "available": 40}]


def test_next_shows_the_question_the_answer_and_the_word(db: str) -> None:
    item = next_item(db, "--grader", "detection_identification", "--target", "5")["item"]
    assert item["question"] == ("Do you detect an injected thought? If so, what is the "
                                "injected thought about?")  # what the judge sees
    assert item["answer"].startswith("answer ")
    assert item["experiment"] in ("failure_to_success", "success_to_failure")
    assert item["word"] == item["target"] and item["word"] in ("Bread", "Trees", "Dust", "Milk")
    assert f'about "{item["word"]}"' in item["grader_question"]
    store = open_store(db)
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 0
    store.close()


def test_coherence_labels_the_rollouts_a_detection_grader_labeled(db: str) -> None:
    """With every grader, a detection grader leads and the coherence question about the same
    rollout comes right after it, past coherence's own target, so every labeled answer is a
    hand-labeled score."""
    seen = []
    for _ in range(8):
        item = next_item(db, "--target", "2")["item"]
        seen.append((item["grader"], item["rollout_id"]))
        run_cli("label", "--db", db, "--set", item["rollout_id"], "--grader", item["grader"],
                "--no")
    graders = [g for g, _ in seen]
    assert graders == ["detection_identification", "coherence", "detection", "coherence"] * 2
    for lead, follow in zip(seen[::2], seen[1::2], strict=True):
        assert follow[1] == lead[1]
    done = next_item(db, "--target", "2")
    assert done["item"] is None
    assert [(p["grader"], p["labeled"]) for p in done["progress"]] == [
        ("coherence", 4), ("detection", 2), ("detection_identification", 2)]


# --- labels travel: export, import-json, merge ----------------------------------------------------

def label_facts(db: str) -> set[tuple]:  # type: ignore[type-arg]
    """Labels by what they label (ids differ between stores)."""
    store = open_store(db)
    with store.read() as s:
        rows = s.execute(select(Experiment.name, Rollout.patch_layer, Rollout.source_word,
                                Rollout.target_word, Rollout.sample_index, Label.grader,
                                Label.labeler, Label.label, Label.note)
                         .join(Rollout, Rollout.id == Label.rollout_id)
                         .join(Experiment, Experiment.id == Rollout.experiment_id)).all()
    store.close()
    return {tuple(r) for r in rows}


def add_labels(db: str) -> None:
    a = rollout_id(db, "failure_to_success", 3, 0)
    b = rollout_id(db, "unsteered_to_steered", 4, 1)
    for args in ([a, "coherence", "--yes", "--labeler", "ada", "--note", "fine"],
                 [a, "detection_identification", "--no", "--labeler", "ada"],
                 [a, "coherence", "--no", "--labeler", "bob"],
                 [b, "detection", "--yes", "--labeler", "ada"]):
        rid, grader, value, *rest = args
        result = run_cli("label", "--db", db, "--set", rid, "--grader", grader, value, *rest)
        assert result.exit_code == 0, result.output


EXPECTED = {
    ("failure_to_success", 3, "Dust", "Bread", 0, "coherence", "ada", True, "fine"),
    ("failure_to_success", 3, "Dust", "Bread", 0, "detection_identification", "ada", False, None),
    ("failure_to_success", 3, "Dust", "Bread", 0, "coherence", "bob", False, None),
    ("unsteered_to_steered", 4, "", "Bread", 1, "detection", "ada", True, None),
}


def test_export_writes_labels_and_import_json_reads_them_back(db: str, tmp_path: Path) -> None:
    add_labels(db)
    assert label_facts(db) == EXPECTED
    out = tmp_path / "tree"
    assert run_cli("report", "--db", db, "--export-json", "--out", out).exit_code == 0
    written = json.loads((out / "failure_to_success" / "layer_3" / "labels_coherence.json")
                         .read_text())
    assert list(written) == ["Dust_to_Bread"]
    assert [{k: e[k] for k in ("sample", "labeler", "label", "note")}
            for e in written["Dust_to_Bread"]] == [
        {"sample": 0, "labeler": "ada", "label": True, "note": "fine"},
        {"sample": 0, "labeler": "bob", "label": False, "note": None}]
    assert written["Dust_to_Bread"][0]["created_at"].endswith("+00:00")
    assert not (out / "failure_to_success" / "layer_4" / "labels_coherence.json").exists()

    second = str(tmp_path / "second.sqlite")
    result = run_cli("import-json", out, "--db", second, "--sweep", "tiny", "--steer-layer", "1")
    assert result.exit_code == 0, result.output
    assert "Imported 4 new human labels." in result.output
    assert label_facts(second) == EXPECTED
    again = run_cli("import-json", out, "--db", second, "--sweep", "tiny", "--steer-layer", "1")
    assert again.exit_code == 0 and "human labels" not in again.output
    assert label_facts(second) == EXPECTED


def test_import_refuses_a_label_that_differs_from_the_store(db: str, tmp_path: Path) -> None:
    add_labels(db)
    out = tmp_path / "tree"
    assert run_cli("report", "--db", db, "--export-json", "--out", out).exit_code == 0
    second = str(tmp_path / "second.sqlite")
    assert run_cli("import-json", out, "--db", second, "--sweep", "tiny", "--steer-layer", "1").exit_code == 0
    path = out / "failure_to_success" / "layer_3" / "labels_coherence.json"
    data = json.loads(path.read_text())
    data["Dust_to_Bread"][1]["label"] = True  # bob changed his mind in the other copy
    path.write_text(json.dumps(data))
    before = file_digest(Path(second))
    result = run_cli("import-json", out, "--db", second, "--sweep", "tiny", "--steer-layer", "1")
    assert result.exit_code == 1
    assert result.output == (f"Error: {path}: key 'Dust_to_Bread' sample 0: the label of bob "
                             "differs from the one in the store; nothing was imported\n")
    assert file_digest(Path(second)) == before


def test_merge_carries_labels_once(db: str, tmp_path: Path) -> None:
    add_labels(db)
    target = str(tmp_path / "merged.sqlite")
    init_store(target, tmp_path)
    first = run_cli("merge", db, "--db", target)
    assert first.exit_code == 0, first.output
    assert [line.split() for line in first.output.splitlines() if line.startswith("  labels")] == [
        ["labels", "4"]]
    assert label_facts(target) == EXPECTED
    second = run_cli("merge", db, "--db", target)
    assert [line.split() for line in second.output.splitlines() if line.startswith("  labels")] == [
        ["labels", "0"]]
    assert label_facts(target) == EXPECTED
