"""`patchdb calibrate`: a judge config against human labels, with hand-computed statistics."""

import json
import math
import re
from pathlib import Path

import pytest
from conftest import run_cli
from labeled_store import fill, init_store
from sqlalchemy import select, update

from patchdb.label.labels import set_label
from patchdb.report.calibration import Table, cohen_kappa, wilson
from patchdb.report.html import write_html_report
from patchdb.store import JudgeConfig, Judgment, Rollout, open_store

Z = 1.959963984540054


def wilson_by_bisection(k: int, n: int) -> tuple[float, float]:
    """A second computation of the Wilson interval: the two p where |k/n - p| equals
    z * sqrt(p (1 - p) / n), found by bisection rather than by the closed form."""
    phat = k / n

    def gap(p: float) -> float:
        return abs(phat - p) - Z * math.sqrt(p * (1 - p) / n)

    def root(lo: float, hi: float) -> float:  # gap(lo) and gap(hi) differ in sign
        for _ in range(200):
            mid = (lo + hi) / 2
            if (gap(mid) > 0) == (gap(lo) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    return (root(0.0, phat) if k > 0 else 0.0, root(phat, 1.0) if k < n else 1.0)


@pytest.mark.parametrize("k, n, expected", [
    (8, 10, (0.4902, 0.9433)),
    (9, 10, (0.5958, 0.9821)),
    (0, 10, (0.0, 0.2775)),
    (20, 25, (0.6087, 0.9114)),
])
def test_wilson_matches_hand_values_and_a_second_computation(k: int, n: int,
                                                             expected: tuple[float, float]) -> None:
    got = wilson(k, n)
    assert got == pytest.approx(expected, abs=1e-4)
    assert got == pytest.approx(wilson_by_bisection(k, n), abs=1e-9)


@pytest.mark.parametrize("table, kappa", [
    # observed 17/20 = 0.85; chance 0.45*0.5 + 0.55*0.5 = 0.5; (0.85 - 0.5) / 0.5 = 0.7
    (Table(tp=8, fn=2, fp=1, tn=9), 0.7),
    # observed 0.7; chance 0.6*0.5 + 0.4*0.5 = 0.5 -> 0.4
    (Table(tp=20, fn=5, fp=10, tn=15), 0.4),
    # observed 0.5; chance 0.5 -> 0 (a judge that agrees only by chance)
    (Table(tp=5, fn=5, fp=5, tn=5), 0.0),
    # every verdict the opposite of the truth: observed 0, chance 0.5 -> -1
    (Table(tp=0, fn=10, fp=10, tn=0), -1.0),
])
def test_kappa_matches_hand_computed_tables(table: Table, kappa: float) -> None:
    assert cohen_kappa(table) == pytest.approx(kappa)


def test_kappa_of_one_class_only_is_undefined() -> None:
    assert math.isnan(cohen_kappa(Table(tp=10)))


@pytest.fixture
def db(store_db: str, tmp_path: Path) -> str:
    """Coherence labels making the table tp 8, fn 2, fp 1, tn 9 for judge-a, one unparsed
    verdict on a labeled answer, and one answer whose two labelers disagree (left out)."""
    init_store(store_db, tmp_path)
    store = open_store(store_db)
    store.transact(fill)

    def label(session) -> None:  # type: ignore[no-untyped-def]
        ids = {s: list(session.scalars(select(Rollout.id).where(Rollout.sample_index == s)
                                       .order_by(Rollout.id))) for s in (0, 1)}
        said_yes, said_no = ids[0], ids[1]  # judge-a: YES on sample 0, NO on sample 1
        for i, rid in enumerate(said_yes[:9]):
            set_label(session, rid, "coherence", "ada", i < 8)  # 8 tp, 1 fp
        for i, rid in enumerate(said_no[:11]):
            set_label(session, rid, "coherence", "ada", i < 2)  # 2 fn, 9 tn
        set_label(session, said_no[11], "coherence", "ada", True)
        session.execute(update(Judgment).where(Judgment.rollout_id == said_no[11],
                                               Judgment.grader == "coherence")
                        .values(verdict=None, raw_reply="I cannot decide"))
        set_label(session, said_yes[9], "coherence", "ada", True)
        set_label(session, said_yes[9], "coherence", "bob", False)
        # a second judge config that says YES to everything it judged: the first 10 of each
        other = JudgeConfig(model="judge-b", reasoning="low", template_version="v1",
                            backend="openai")
        session.add(other)
        session.flush()
        for rid in said_yes[:10] + said_no[:10]:
            session.add(Judgment(rollout_id=rid, grader="coherence", judge_config_id=other.id,
                                 verdict=True, raw_reply="YES"))

    store.transact(label)
    store.close()
    return store_db


def test_calibrate_json_has_the_hand_computed_figures(db: str) -> None:
    result = run_cli("calibrate", "--db", db, "--judge-config", "1", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["calibration"]
    assert {k: row[k] for k in ("judge_config_id", "grader", "n", "tp", "fn", "fp", "tn",
                                "unparsed")} == {
        "judge_config_id": 1, "grader": "coherence", "n": 20, "tp": 8, "fn": 2, "fp": 1,
        "tn": 9, "unparsed": 1}
    assert row["tpr"] == pytest.approx(0.8) and row["tnr"] == pytest.approx(0.9)
    assert row["tpr_ci"] == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert row["tnr_ci"] == pytest.approx([0.5958, 0.9821], abs=1e-4)
    assert row["accuracy"] == pytest.approx(0.85) and row["kappa"] == pytest.approx(0.7)


def test_calibrate_table_lists_every_config(db: str) -> None:
    result = run_cli("calibrate", "--db", db)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("judge config #1 (openai: judge-a")
    assert lines[2].split() == ["coherence", "20", "0.800", "[0.490,", "0.943]", "0.900",
                                "[0.596,", "0.982]", "0.850", "0.700", "1"]
    assert lines[3].startswith("judge config #2 (openai: judge-b")
    # judge-b said YES to every labeled answer it judged: 9 of sample 0 (8 YES, 1 NO labels;
    # the tie is left out) and 10 of sample 1 (2 YES, 8 NO): n 19, TPR 1, TNR 0.
    assert lines[5].split()[:2] == ["coherence", "19"]
    assert lines[5].split()[2] == "1.000" and lines[5].split()[5] == "0.000"


def test_against_counts_agreement_on_answers_both_judged(db: str) -> None:
    result = run_cli("calibrate", "--db", db, "--judge-config", "1", "--against", "2", "--json")
    assert result.exit_code == 0, result.output
    (graders,) = json.loads(result.output)["agreement"]["graders"]
    # judge-b judged 10 of judge-a's YES answers and 10 of its NO answers, all YES.
    assert graders == {"grader": "coherence", "n": 20, "both_yes": 10, "both_no": 0,
                       "only_first_yes": 0, "only_second_yes": 10, "agreement": 0.5,
                       "kappa": 0.0}


def test_no_labels_is_one_line(store_db: str, tmp_path: Path) -> None:
    init_store(store_db, tmp_path)
    store = open_store(store_db)
    store.transact(fill)
    store.close()
    result = run_cli("calibrate", "--db", store_db)
    assert result.exit_code == 1
    assert result.output == ("Error: no labeled answer of sweep 'tiny' has a judgment yet; "
                             "label some with `patchdb label`\n")


def test_html_report_has_a_calibration_section(db: str, tmp_path: Path) -> None:
    store = open_store(db)
    page = write_html_report(store, None, tmp_path / "report").read_text(encoding="utf-8")
    store.close()
    section = page.split('<section id="calibration">', 1)[1].split("</section>", 1)[0]
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(\d+)</td><td>([\d.]+) ", section)
    assert [(r[1], r[2], r[3]) for r in rows] == [("coherence", "20", "0.80"),
                                                  ("coherence", "19", "1.00")]
    assert rows[0][0].startswith("judge config #1 (openai: judge-a")
    assert page.index('id="calibration"') < page.index('id="browser"')


def test_html_report_without_labels_has_no_calibration_section(store_db: str,
                                                                tmp_path: Path) -> None:
    init_store(store_db, tmp_path)
    store = open_store(store_db)
    store.transact(fill)
    page = write_html_report(store, None, tmp_path / "report").read_text(encoding="utf-8")
    store.close()
    assert 'id="calibration"' not in page
