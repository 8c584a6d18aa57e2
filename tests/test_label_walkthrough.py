"""The labels -> calibrate -> corrected walk-through on the demo store, from committed fixtures.

tests/fixtures/demo_labels.json holds the team's labels of every demo answer (both graders) and
demo_labels_judge.json the demo judge's P(YES) for the same answers. They are loaded into a
fresh store registered with the demo config (no model is run), and `calibrate` and `report
--corrected` must say what docs/labels.md says they say. The expected counts are recomputed here
from the two files by plain counting, and the headline ones are also written out by hand.
"""

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli
from sqlalchemy import select

from patchdb.label.labels import set_label
from patchdb.store import Experiment, JudgeConfig, Judgment, Rollout, open_store

FIXTURES = Path(__file__).parent / "fixtures"
# The grader texts demo_labels_judge.json was judged with (before the identification grader
# asked for a clear claim and "Trial 1:" left the judge's question); docs/labels.md says so.
FIXTURE_TEMPLATES = "ebc18cbddf5bba7f"
DOC = (Path(__file__).parent.parent / "docs" / "labels.md").read_text(encoding="utf-8")
LABELS = json.loads((FIXTURES / "demo_labels.json").read_text())
JUDGE = json.loads((FIXTURES / "demo_labels_judge.json").read_text())["rollouts"]
DETECTION = {"failure_to_success": "detection_identification",
             "success_to_failure": "detection_identification",
             "steered_to_unsteered": "detection", "unsteered_to_steered": "detection"}


def parse(key: str) -> tuple[str, int, str, str, int]:
    """experiment/layer/key/sample -> (experiment, layer, source, target, sample)."""
    experiment, layer, words, sample = key.split("/")
    if "_to_" in words:
        source, target = words.split("_to_")
    elif experiment == "steered_to_unsteered":
        source, target = words, ""
    else:
        source, target = "", words
    return experiment, int(layer), source, target, int(sample)


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store registered with the demo config, holding the demo's answers, its judge's
    verdicts and the team's labels (built once: the tests only read it)."""
    db = str(tmp_path_factory.mktemp("walkthrough") / "demo.sqlite")
    result = run_cli("init", "--config", "demo", "--db", db)
    assert result.exit_code == 0, result.output
    store = open_store(db)

    def fill(session) -> None:  # type: ignore[no-untyped-def]
        judge = JudgeConfig(model="smollm2-135m", reasoning="none", backend="hf",
                            template_version=FIXTURE_TEMPLATES, verdict_mode="logprobs")
        session.add(judge)
        session.flush()
        experiments = {e.name: e.id for e in session.scalars(select(Experiment))}
        for key, entry in LABELS["rollouts"].items():
            experiment, layer, source, target, sample = parse(key)
            rollout = Rollout(experiment_id=experiments[experiment], patch_layer=layer,
                              source_word=source, target_word=target, sample_index=sample,
                              answer=entry["answer"], n_tokens=16, finish_reason="length",
                              seed=sample)
            session.add(rollout)
            session.flush()
            for grader, p_yes in JUDGE[key].items():
                session.add(Judgment(rollout_id=rollout.id, grader=grader,
                                     judge_config_id=judge.id, p_yes=p_yes,
                                     verdict=p_yes > 0.5, raw_reply="(reasoning)"))
                set_label(session, rollout.id, grader, "team", entry[grader], entry.get("note"))

    store.transact(fill)
    store.close()
    return db


def hand_counts() -> dict[str, Counter[str]]:
    """Per grader: the judge's verdicts against the labels, counted from the fixture files."""
    counts: dict[str, Counter[str]] = {}
    for key, entry in LABELS["rollouts"].items():
        for grader, p_yes in JUDGE[key].items():
            judged, truth = p_yes > 0.5, entry[grader]
            cell = {(True, True): "tp", (False, True): "fn", (True, False): "fp",
                    (False, False): "tn"}[(judged, truth)]
            counts.setdefault(grader, Counter())[cell] += 1
    return counts


def test_the_fixture_is_every_demo_answer_labeled_for_both_graders() -> None:
    rollouts = LABELS["rollouts"]
    assert len(rollouts) == 96 and LABELS["labeler"] == "team"
    for key, entry in rollouts.items():
        experiment = key.split("/")[0]
        assert {"coherence", DETECTION[experiment]} <= set(entry)
        assert set(JUDGE[key]) == {"coherence", DETECTION[experiment]}
    yes = Counter(g for e in rollouts.values() for g in ("coherence", "detection",
                                                          "detection_identification")
                  if e.get(g))
    # what docs/labels.md reports: 13 of 96 coherent, 8 of 24 detections, no identification
    assert yes == Counter({"coherence": 13, "detection": 8})
    scores = sum(e["coherence"] and e.get("detection", False) for e in rollouts.values())
    assert scores == 4


def test_calibrate_reports_the_hand_counted_tables(demo_db: str) -> None:
    result = run_cli("calibrate", "--db", demo_db, "--json")
    assert result.exit_code == 0, result.output
    rows = {r["grader"]: r for r in json.loads(result.output)["calibration"]}
    counts = hand_counts()
    for grader, cells in counts.items():
        assert {c: rows[grader][c] for c in ("tp", "fn", "fp", "tn")} == {
            c: cells[c] for c in ("tp", "fn", "fp", "tn")}
    # the same tables, written out: the demo judge says YES to nearly everything
    assert [rows["coherence"][c] for c in ("tp", "fn", "fp", "tn")] == [11, 2, 81, 2]
    assert [rows["detection"][c] for c in ("tp", "fn", "fp", "tn")] == [7, 1, 16, 0]
    assert [rows["detection_identification"][c] for c in ("tp", "fn", "fp", "tn")] == [0, 0, 70, 2]
    assert rows["coherence"]["tpr"] == pytest.approx(11 / 13)
    assert rows["coherence"]["tnr"] == pytest.approx(2 / 83)
    # kappa of the coherence table by hand: observed 13/96, chance (92*13 + 4*83) / 96**2
    chance = (92 * 13 + 4 * 83) / 96**2
    assert rows["coherence"]["kappa"] == pytest.approx((13 / 96 - chance) / (1 - chance))
    assert rows["coherence"]["kappa"] < 0 and rows["detection"]["kappa"] < 0
    assert rows["detection_identification"]["tpr"] is None  # no answer named its word


def test_the_table_in_the_docs_is_what_calibrate_prints(demo_db: str) -> None:
    result = run_cli("calibrate", "--db", demo_db)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 5  # the config, the header, one row per grader
    for line in lines[1:]:
        assert line in DOC.splitlines()


@pytest.mark.parametrize("experiments, line", [
    (None, "Error: cannot correct the rates of the detection experiments: 23 labeled rollouts "
           "the judge scored YES and 1 it scored NO (labels for both graders); needs 10 of each"),
    ("failure_to_success,success_to_failure",
     "Error: cannot correct the rates of the detection_identification experiments: 69 labeled "
     "rollouts the judge scored YES and 3 it scored NO (labels for both graders); "
     "needs 10 of each"),
])
def test_report_corrected_rogan_gladen_refuses_in_one_line(
        demo_db: str, tmp_path: Path, experiments: str | None, line: str) -> None:
    # the judged scores by hand: a rollout is judged YES when both of its verdicts are YES
    single = [k for k in JUDGE if DETECTION[k.split("/")[0]] == "detection"]
    judged_yes = sum(all(p > 0.5 for p in JUDGE[k].values()) for k in single)
    assert (judged_yes, len(single) - judged_yes) == (23, 1)
    args = ["report", "--db", demo_db, "--corrected", "--correction", "rogan-gladen",
            "--out", str(tmp_path / "out")]
    result = run_cli(*args, *(["--experiments", experiments] if experiments else []))
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == line
    if experiments is None:
        assert line in DOC.splitlines()  # docs/labels.md quotes it


def labeled_lines() -> dict[tuple[str, str], dict[int, float]]:
    """Per (experiment, bold line) and layer, the mean over its keys of each key's share of
    samples labeled coherent AND detected, counted from the fixture."""
    keys: dict[tuple[str, str, int, str], list[bool]] = {}
    for key, entry in LABELS["rollouts"].items():
        experiment, layer, source, target, _ = parse(key)
        score = entry["coherence"] and entry[DETECTION[experiment]]
        keys.setdefault((experiment, target if source and target else "Mean", layer,
                         f"{source}>{target}"), []).append(score)
    lines: dict[tuple[str, str], dict[int, list[float]]] = {}
    for (experiment, line, layer, _), scores in keys.items():
        lines.setdefault((experiment, line), {}).setdefault(layer, []).append(
            sum(scores) / len(scores))
    return {k: {layer: sum(v) / len(v) for layer, v in by_layer.items()}
            for k, by_layer in lines.items()}


def test_report_corrected_ppi_draws_the_labeled_truth(demo_db: str, tmp_path: Path) -> None:
    """Every demo answer is labeled, so PPI's corrected rates are the labeled ones, whatever the
    judge says: by hand, only steered_to_unsteered scores (1 of 6 samples at layer 20, 3 of 6
    at layer 28); every other line is 0."""
    truth = labeled_lines()
    assert truth[("steered_to_unsteered", "Mean")] == {20: 1 / 6, 28: 3 / 6}
    assert sum(v for k, by in truth.items() for v in by.values()) == pytest.approx(4 / 6)
    result = run_cli("report", "--db", demo_db, "--corrected", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    printed = {}
    experiment = ""
    for line in result.output.splitlines():
        if line.endswith(", corrected: rate in % by patch layer, raw -> corrected [95% band]"):
            experiment = line.split(",")[0]
        elif experiment and line.startswith("  ") and " -> " in line:
            name, cells = line.strip().split(": ", 1)
            for cell in cells.split("; "):
                layer, rest = cell.split(": ", 1)
                printed[(experiment, name, int(layer))] = int(rest.split(" -> ")[1].split()[0])
    assert printed == {(e, n, layer): round(100 * v) for (e, n), by in truth.items()
                       for layer, v in by.items()}
    quoted = [line for line in result.output.splitlines()
              if line.startswith(("Correction for", "  Mean: 20"))]
    assert len(quoted) == 4
    for line in quoted:
        assert line in DOC.splitlines()  # docs/labels.md quotes them
