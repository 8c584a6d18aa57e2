"""Corrected rates from a store: Rogan-Gladen by hand, the refusals, and `report --corrected`
(PPI++ by default) on a labeled store. The PPI simulations are in test_ppi.py."""

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli
from labeled_store import fill, init_store
from sqlalchemy import func, select

from patchdb.errors import CalibrationError
from patchdb.label.labels import set_label
from patchdb.report.corrected import (
    ScoreCalibration,
    Stratum,
    rogan_gladen,
    se_sp,
)
from patchdb.store import Experiment, Rollout, open_store
from patchdb.store.models import Label


def test_rogan_gladen_on_hand_values() -> None:
    # a judge of Se 0.8 and Sp 0.85 reports 0.2 * 0.8 + 0.8 * 0.15 = 0.28 for a true 0.2
    assert float(rogan_gladen(0.28, 0.8, 0.85)) == pytest.approx(0.2)
    # a perfect judge changes nothing; an observed rate below the false-positive rate clips to 0
    assert float(rogan_gladen(0.37, 1.0, 1.0)) == pytest.approx(0.37)
    assert float(rogan_gladen(0.05, 0.8, 0.85)) == 0.0


def test_se_sp_from_classes_sampled_by_the_judges_verdict() -> None:
    """Prevalence 0.3, Se 0.8, Sp 0.9: the judge says YES to 0.24 + 0.07 = 0.31 of all answers;
    of those 0.24/0.31 are true; of its NO answers 0.06/0.69 are true."""
    se, sp = se_sp(0.24 / 0.31, 0.06 / 0.69, 0.31)
    assert se == pytest.approx(0.8) and sp == pytest.approx(0.9)
    # the strata computation agrees: 31 labeled YES answers, 24 true; 69 NO answers, 6 true
    two = ScoreCalibration.two_classes(31, 24, 69, 6, 0.31)
    assert two.se_sp == pytest.approx((0.8, 0.9))


def test_strata_of_the_no_class_are_weighted_by_their_share() -> None:
    """Shares of the four verdict strata: YES/YES 0.2, YES/NO 0.5, NO/YES 0.1, NO/NO 0.2.
    True shares: 16/20 = 0.8, 1/10 = 0.1, 0/10 = 0, and NO/NO (unlabeled) borrows the NO
    class's pooled 1/20 = 0.05. tp = 0.2 * 0.8 = 0.16; fn = 0.5 * 0.1 + 0 + 0.2 * 0.05 = 0.06;
    fp = 0.2 * 0.2 = 0.04; tn = 0.5 * 0.9 + 0.1 * 1 + 0.2 * 0.95 = 0.74.
    Se = 0.16 / 0.22, Sp = 0.74 / 0.78 (pooling the NO class would give 0.8 and 0.95)."""
    calibration = ScoreCalibration((Stratum(True, 0.2, 20, 16), Stratum(False, 0.5, 10, 1),
                                    Stratum(False, 0.1, 10, 0), Stratum(False, 0.2, 0, 0)))
    assert calibration.se_sp == pytest.approx((0.16 / 0.22, 0.74 / 0.78))
    assert (calibration.judged_yes, calibration.judged_no) == (20, 20)


def test_too_few_labels_and_a_chance_judge_are_refused_in_one_line() -> None:
    with pytest.raises(CalibrationError) as few:
        ScoreCalibration.two_classes(9, 8, 30, 3, 0.3).check("experiment x")
    assert str(few.value) == (
        "cannot correct experiment x: 9 labeled rollouts the judge scored YES and 30 it scored "
        "NO (labels for both graders); needs 10 of each")
    # q1 = q0 = 0.5: the verdict says nothing about the truth, so Se + Sp - 1 = 0
    with pytest.raises(CalibrationError) as chance:
        ScoreCalibration.two_classes(20, 10, 20, 10, 0.4).check("experiment x")
    assert str(chance.value) == (
        "cannot correct experiment x: the judge's TPR + TNR - 1 is 0.00 (TPR 0.40, TNR 0.60), "
        "below 0.2; it is too close to chance")
    ScoreCalibration.two_classes(20, 18, 20, 2, 0.4).check("experiment x")  # a useful judge passes
    # exactly 10 of each is enough
    ScoreCalibration.two_classes(10, 9, 10, 1, 0.4).check("experiment x")
    with pytest.raises(CalibrationError):
        ScoreCalibration.two_classes(10, 9, 9, 1, 0.4).check("experiment x")


def test_an_undefined_tpr_or_tnr_is_refused() -> None:
    """10 labels a side and not one true score: Se is 0/0. NaN must not pass the chance check
    (NaN < 0.2 is False, so a check written as 'below' would let it through)."""
    calibration = ScoreCalibration.two_classes(10, 0, 10, 0, 0.5)
    assert math.isnan(calibration.se_sp[0])
    with pytest.raises(CalibrationError) as undefined:
        calibration.check("experiment x")
    assert str(undefined.value) == (
        "cannot correct experiment x: the judge's TPR or TNR is undefined (TPR nan, TNR 0.50): "
        "the labels hold no true score or no false one")
    # and with no false score among the labels, Sp is 0/0
    with pytest.raises(CalibrationError, match="undefined"):
        ScoreCalibration.two_classes(10, 10, 10, 10, 0.5).check("experiment x")


# --- report --corrected on a store ---------------------------------------------------------------

@pytest.fixture
def db(store_db: str, tmp_path: Path) -> str:
    """The small judged sweep (judge: YES on sample 0, NO on sample 1), every pair-experiment
    rollout labeled coherent; detected+identified on 12 of the 16 the judge said YES to and on
    2 of the 16 it said NO to."""
    init_store(store_db, tmp_path)
    store = open_store(store_db)
    store.transact(fill)

    def label(session) -> None:  # type: ignore[no-untyped-def]
        for sample, true_yes in ((0, 12), (1, 2)):
            ids = list(session.scalars(
                select(Rollout.id).join(Experiment)
                .where(Experiment.pairs.is_(True), Rollout.sample_index == sample)
                .order_by(Rollout.id)))
            assert len(ids) == 16
            for i, rid in enumerate(ids):
                set_label(session, rid, "coherence", "ada", True)
                set_label(session, rid, "detection_identification", "ada", i < true_yes)

    store.transact(label)
    store.close()
    return store_db


def rows_of(output: str) -> dict[str, list[str]]:
    """The corrected table's rows: line label -> 'layer: raw -> corrected' per layer."""
    rows = [line.split(": ", 1) for line in output.splitlines() if ": 3: " in line]
    return {word.strip(): [c.split(" [")[0] for c in cells.split("; ")] for word, cells in rows}


def test_report_corrected_rogan_gladen_draws_the_hand_computed_correction(
        db: str, tmp_path: Path) -> None:
    """pi = 0.5, q1 = 12/16, q0 = 2/16: Se = 0.375/0.4375 = 0.857, Sp = 0.4375/0.5625 = 0.778;
    every key's raw rate is 0.5, corrected (0.5 + 0.778 - 1) / (0.857 + 0.778 - 1) = 0.4375."""
    result = run_cli("report", "--db", db, "--out", tmp_path / "out", "--corrected",
                     "--correction", "rogan-gladen",
                     "--experiments", "failure_to_success,success_to_failure")
    assert result.exit_code == 0, result.output
    assert ("Correction for the detection_identification experiments (judge config #1): "
            "Rogan-Gladen, 16 labeled scores the judge said YES to (12 true), 16 it said NO to "
            "(2 true); score TPR 0.86, TNR 0.78 at every layer; bands over words and labels, "
            "bootstrap 2000 draws, seed 0.") in result.output
    rows = rows_of(result.output)
    assert list(rows) == ["Bread", "Trees", "Dust", "Milk"]
    assert all(cells == ["3: 50 -> 44", "4: 50 -> 44"] for cells in rows.values())
    for exp in ("failure_to_success", "success_to_failure"):
        assert (tmp_path / "out" / exp / "sweep_plot_corrected.png").stat().st_size > 0


def test_report_corrected_ppi_is_the_labeled_truth_where_every_rollout_is_labeled(
        db: str, tmp_path: Path) -> None:
    """Every pair rollout is labeled, so PPI's rate is the hand-labeled one, key by key. Truths
    (sample 0, sample 1): failure_to_success layer 3: Dust->Bread (1, 0: its detection label is
    YES but we relabel its coherence NO), Dust->Trees (1, 1), Milk->Bread and Milk->Trees
    (1, 0); layer 4: (1, 0) each. success_to_failure layer 3: (1, 0) each; layer 4: (0, 0).
    Lines: Bread 3: mean(0.5, 0.5) = 50, Trees 3: mean(1, 0.5) = 75, every other 50, and
    success_to_failure's layer 4: 0."""
    store = open_store(db)

    def relabel(session) -> None:  # type: ignore[no-untyped-def]
        rid = session.scalar(select(Rollout.id).join(Experiment).where(
            Experiment.name == "failure_to_success", Rollout.patch_layer == 3,
            Rollout.source_word == "Dust", Rollout.target_word == "Bread",
            Rollout.sample_index == 1))
        set_label(session, rid, "coherence", "ada", False)

    store.transact(relabel)
    store.close()
    result = run_cli("report", "--db", db, "--out", tmp_path / "out", "--corrected", "--json",
                     "--experiments", "failure_to_success,success_to_failure")
    assert result.exit_code == 0, result.output
    assert ("Correction for the detection_identification experiments (judge config #1): PPI++ "
            "per experiment and layer, lambda 1.00; 32 labeled scores (16 the judge detected, 12 "
            "true; 16 it did not, 1 true)") in result.output
    assert rows_of(result.output) == {
        "Bread": ["3: 50 -> 50", "4: 50 -> 50"], "Trees": ["3: 50 -> 75", "4: 50 -> 50"],
        "Dust": ["3: 50 -> 50", "4: 50 -> 0"], "Milk": ["3: 50 -> 50", "4: 50 -> 0"]}
    # rates.json carries the same corrected rates, beside the raw ones
    rows = json.loads((tmp_path / "out" / "rates.json").read_text())["rows"]
    corrected = {(r["line"], r["layer"]): (r["rate"], r["corrected_rate"])
                 for r in rows if r["kind"] == "line"}
    assert corrected == {("Bread", 3): (0.5, 0.5), ("Trees", 3): (0.5, 0.75),
                         ("Bread", 4): (0.5, 0.5), ("Trees", 4): (0.5, 0.5),
                         ("Dust", 3): (0.5, 0.5), ("Milk", 3): (0.5, 0.5),
                         ("Dust", 4): (0.5, 0.0), ("Milk", 4): (0.5, 0.0)}
    assert {r["corrected_method"] for r in rows if r["kind"] == "line"} == {
        "PPI++, bootstrap over words and labels, Wilson-t"}
    assert json.loads((tmp_path / "out" / "rates.json").read_text())["corrected"] is True


def test_report_corrected_refuses_without_labels_in_one_line(db: str, tmp_path: Path) -> None:
    result = run_cli("report", "--db", db, "--out", tmp_path / "out", "--corrected")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        "Error: cannot correct the rates of the detection experiments: none of their scored "
        "rollouts has a hand label for both graders; label some with `patchdb label`")
    result = run_cli("report", "--db", db, "--out", tmp_path / "out", "--corrected",
                     "--correction", "rogan-gladen")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        "Error: cannot correct the rates of the detection experiments: 0 labeled rollouts the "
        "judge scored YES and 0 it scored NO (labels for both graders); needs 10 of each")
    with open_store(db).read() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 64
