"""The label plan offers answers the judge left unparsed only when no parsed one is left
(patchdb/label/plan.py), on a hand-made candidate list and through `label --next`, with the
balanced plan and with `--plan widest`."""

import json
from pathlib import Path

from conftest import run_cli
from labeled_store import fill, init_store
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from patchdb.label.labels import set_label
from patchdb.label.plan import _pick
from patchdb.store import Experiment, Judgment, Rollout, open_store


def test_pick_takes_every_parsed_answer_before_an_unparsed_one() -> None:
    """Two parsed answers (one YES, one NO) and two unparsed ones in one experiment: labeling
    whatever comes next, the two parsed ones come first (NO before YES: equal counts, and the
    plan's tie-break is the verdict's name), then the unparsed ones."""
    candidates = [(1, "e", 3, True), (2, "e", 3, False), (3, "e", 3, None), (4, "e", 4, None)]
    labeled: set[int] = set()
    order = []
    while (chosen := _pick(candidates, labeled, set(), set())) is not None:
        order.append(chosen)
        labeled.add(chosen)
    assert order[:2] == [2, 1]
    assert sorted(order[2:]) == [3, 4]


def test_a_skipped_parsed_answer_lets_the_unparsed_ones_come() -> None:
    """Only a skipped parsed answer is left: the plan moves on to the unparsed ones rather
    than stopping."""
    candidates = [(1, "e", 3, True), (2, "e", 3, None)]
    assert _pick(candidates, set(), {1}, set()) == 2
    assert _pick(candidates, {2}, {1}, set()) is None


def unparse_all_but(session: Session, keep: set[tuple[str, int, int]]) -> None:
    """Make the coherence verdict NULL (the judge's reply could not be parsed) on every
    rollout but those at (experiment, layer, sample) in `keep`."""
    rows = session.execute(select(Rollout.id, Experiment.name, Rollout.patch_layer,
                                  Rollout.sample_index).join(Experiment))
    gone = [r.id for r in rows if (r.name, r.patch_layer, r.sample_index) not in keep]
    session.execute(update(Judgment).where(Judgment.grader == "coherence",
                                           Judgment.rollout_id.in_(gone)).values(verdict=None))


def test_label_next_offers_unparsed_answers_only_after_the_parsed_ones(tmp_path: Path) -> None:
    """The small judged sweep (48 rollouts, the judge says YES on sample 0 and NO on sample 1)
    with coherence verdicts left only on failure_to_success at layer 3 (four keys x two
    samples: four YES, four NO). Labeling what `label --next` offers for coherence: those
    eight parsed answers come first, then the 40 unparsed ones."""
    db = str(tmp_path / "store.sqlite")
    init_store(db, tmp_path)
    store = open_store(db)
    store.transact(fill)
    keep = {("failure_to_success", 3, 0), ("failure_to_success", 3, 1)}
    store.transact(lambda s: unparse_all_but(s, keep))
    store.close()
    verdicts = []
    for _ in range(10):
        result = run_cli("label", "--db", db, "--next", "--json", "--grader", "coherence",
                         "--target", "48", "--labeler", "ada")
        assert result.exit_code == 0, result.output
        item = json.loads(result.output)["item"]
        verdicts.append(item["judge_verdict"])
        result = run_cli("label", "--db", db, "--set", item["rollout_id"], "--grader",
                         "coherence", "--yes", "--labeler", "ada")
        assert result.exit_code == 0, result.output
    assert sorted(verdicts[:8], key=str) == [False] * 4 + [True] * 4
    assert verdicts[8:] == [None, None]


def test_the_widest_plan_also_offers_parsed_answers_first(tmp_path: Path) -> None:
    """failure_to_success at layer 3 labeled for both its graders, and every detection verdict
    at its layer 4 unparsed: that cell's corrected band is undefined (the widest), but its open
    answers are all unparsed, so `--plan widest` offers a parsed answer elsewhere."""
    db = str(tmp_path / "store.sqlite")
    init_store(db, tmp_path)
    store = open_store(db)
    store.transact(fill)

    def label_and_unparse(session: Session) -> None:
        cell = select(Rollout.id).join(Experiment).where(
            Experiment.name == "failure_to_success")
        for rid in session.scalars(cell.where(Rollout.patch_layer == 3)):
            set_label(session, rid, "coherence", "ada", True)
            set_label(session, rid, "detection_identification", "ada", rid % 2 == 0)
        unparsed = list(session.scalars(cell.where(Rollout.patch_layer == 4)))
        session.execute(update(Judgment).where(
            Judgment.grader == "detection_identification",
            Judgment.rollout_id.in_(unparsed)).values(verdict=None))

    store.transact(label_and_unparse)
    store.close()
    result = run_cli("label", "--db", db, "--labeler", "ada", "--next", "--json",
                     "--grader", "detection_identification", "--plan", "widest")
    assert result.exit_code == 0, result.output
    item = json.loads(result.output)["item"]
    assert item["judge_verdict"] is not None
    assert item["experiment"] == "success_to_failure"  # the only other cells it is asked in
