"""What to label next: a stratified plan per grader.

Per grader, the plan spreads labels over (experiment, patch layer) cells and balances them
between the judge's YES and NO verdicts (of one judge config), so a target of 100 labels per
grader measures both error rates of the judge across the whole sweep. Answers the judge left
unparsed are offered only when no parsed one is left. Within a cell the next rollout is the one
with the smallest sha256 of its id: a fixed order that mixes keys and samples. A rollout labeled
for one of its graders comes next for the other (even past that grader's target), so labels
pair up into hand-labeled scores (coherent AND detected), which corrected rates are calibrated
on.
"""

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from patchdb.choices import DEFAULT_LABEL_TARGET
from patchdb.errors import UnknownNameError
from patchdb.experiments import GRADERS, NO_STEERING_LABEL, judged_word
from patchdb.judge.templates import DEFAULT_TEMPLATES, trial_question
from patchdb.label.widest import pick_widest
from patchdb.report.aggregate import choose_judge_config
from patchdb.store.models import Experiment, Judgment, Label, Rollout, Sweep
from patchdb.store.sweeps import sweep_config

DEFAULT_TARGET = DEFAULT_LABEL_TARGET
# Among graders equally far from their target, a detection grader picks first (balanced on its
# verdicts) and coherence then labels the same rollouts.
LEAD_ORDER = ("detection_identification", "detection", "coherence")


@dataclass(frozen=True)
class Item:
    """One answer to label, with the judge's verdict (shown only after the label is given)."""

    rollout_id: int
    grader: str
    experiment: str
    patch_layer: int
    source: str
    target: str
    word: str
    question: str
    answer: str
    grader_question: str
    judge_config_id: int | None
    judge_verdict: bool | None
    judge_reply: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    grader: str
    labeled: int
    target: int
    available: int

    @property
    def done(self) -> bool:
        return self.labeled >= self.target or self.available == 0


def grader_question(grader: str, word: str) -> str:
    """The grader's question and criteria as the judge reads them, without the answer around it."""
    text = DEFAULT_TEMPLATES.text(grader)
    body = text.split("{response}", 1)[-1]
    body = body.split("\nReason about the reply", 1)[0]
    return body.strip().replace("{word}", word)


def check_graders(graders: list[str] | None) -> list[str]:
    """The graders to label, in the project's order; unknown names are errors."""
    if not graders:
        return list(GRADERS)
    for grader in graders:
        if grader not in GRADERS:
            raise UnknownNameError(f"unknown grader {grader!r} (known: {', '.join(GRADERS)})")
    return [g for g in GRADERS if g in graders]


def _order(rollout_id: int) -> str:
    return hashlib.sha256(str(rollout_id).encode()).hexdigest()


def _candidates(session: Session, sweep: Sweep, grader: str,
                judge_config_id: int | None) -> list[tuple[int, str, int, bool | None]]:
    """(rollout id, experiment, layer, judge verdict) for every rollout the grader is asked."""
    experiments = select(Experiment.id).where(Experiment.sweep_id == sweep.id)
    if grader != "coherence":
        experiments = experiments.where(Experiment.detection_grader == grader)
    judged = and_(Judgment.rollout_id == Rollout.id, Judgment.grader == grader,
                  Judgment.judge_config_id == (judge_config_id or -1))
    rows = session.execute(
        select(Rollout.id, Experiment.name, Rollout.patch_layer, Judgment.verdict)
        .join(Experiment, Experiment.id == Rollout.experiment_id)
        .outerjoin(Judgment, judged)
        .where(Rollout.experiment_id.in_(experiments))
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def _labeled(session: Session, grader: str, labeler: str) -> set[int]:
    return set(session.scalars(select(Label.rollout_id).where(
        Label.grader == grader, Label.labeler == labeler)))


def _partners(session: Session, grader: str, labeler: str) -> set[int]:
    """Rollouts this labeler labeled for another grader: labeling them for this one too gives
    the hand-labeled scores (coherent AND detected) that corrected rates need."""
    return set(session.scalars(select(Label.rollout_id).where(
        Label.grader != grader, Label.labeler == labeler)))


def _pick(candidates: list[tuple[int, str, int, bool | None]], labeled: set[int],
          skipped: set[int], partners: set[int]) -> int | None:
    """The next rollout: one already labeled for its other grader, else the least-labeled
    verdict, then the least-labeled cell within it."""
    done = [c for c in candidates if c[0] in labeled]
    open_ = [c for c in candidates if c[0] not in labeled and c[0] not in skipped]
    if not open_:
        return None
    pending = [c for c in open_ if c[0] in partners]
    if pending:
        return min(pending, key=lambda c: c[0])[0]
    parsed = [c for c in open_ if c[3] is not None]
    pool = parsed or open_
    by_verdict = Counter(c[3] for c in done)
    verdict = min({c[3] for c in pool}, key=lambda v: (by_verdict[v], str(v)))
    pool = [c for c in pool if c[3] == verdict]
    by_cell = Counter((c[1], c[2], c[3]) for c in done)
    by_place = Counter((c[1], c[2]) for c in done)
    best = min(pool, key=lambda c: (by_cell[(c[1], c[2], c[3])], by_place[(c[1], c[2])],
                                    _order(c[0])))
    return best[0]


def _item(session: Session, sweep: Sweep, rollout_id: int, grader: str,
          judge_config_id: int | None) -> Item:
    rollout = session.get(Rollout, rollout_id)
    assert rollout is not None
    experiment = session.get(Experiment, rollout.experiment_id)
    assert experiment is not None
    judgment = session.scalar(select(Judgment).where(
        Judgment.rollout_id == rollout_id, Judgment.grader == grader,
        Judgment.judge_config_id == (judge_config_id or -1)))
    word = judged_word(rollout.source_word, rollout.target_word)
    return Item(
        rollout_id=rollout_id, grader=grader, experiment=experiment.name,
        patch_layer=rollout.patch_layer, source=rollout.source_word or NO_STEERING_LABEL,
        target=rollout.target_word or NO_STEERING_LABEL, word=word,
        question=trial_question(sweep_config(sweep).prompt_trial), answer=rollout.answer,
        grader_question=grader_question(grader, word), judge_config_id=judge_config_id,
        judge_verdict=None if judgment is None else judgment.verdict,
        judge_reply=None if judgment is None else judgment.raw_reply,
    )


Candidates = list[tuple[int, str, int, bool | None]]


def plan_next(session: Session, sweep: Sweep, graders: list[str], labeler: str,
              target: int = DEFAULT_TARGET, judge_config_id: int | None = None,
              skipped: set[tuple[int, str]] | None = None,
              cache: dict[str, Candidates] | None = None,
              plan: str = "balanced") -> tuple[Item | None, list[Progress]]:
    """The next answer to label (None when every grader reached its target) and the progress.
    `cache` keeps each grader's candidates between calls (the labeling page passes one: the
    sweep's rollouts and verdicts do not change while a person labels). `plan` "widest" sends a
    detection grader's next label where the corrected band is widest (patchdb.label.widest)."""
    judge = choose_judge_config(session, sweep, judge_config_id).id
    skipped = skipped or set()
    cache = {} if cache is None else cache

    def candidates_of(grader: str) -> Candidates:
        if grader not in cache:
            cache[grader] = _candidates(session, sweep, grader, judge)
        return cache[grader]

    progress: list[Progress] = []
    choices: list[tuple[bool, float, int, str]] = []
    for grader in check_graders(graders):
        candidates = candidates_of(grader)
        labeled = _labeled(session, grader, labeler) & {c[0] for c in candidates}
        skip = {r for r, g in skipped if g == grader}
        open_ = {c[0] for c in candidates if c[0] not in labeled and c[0] not in skip}
        step = Progress(grader, len(labeled), target, len(open_))
        progress.append(step)
        # A rollout labeled for its other grader is finished first, even past the target, so
        # every labeled answer yields a hand-labeled score.
        pending = bool(open_ & _partners(session, grader, labeler))
        if pending or not step.done:
            choices.append((not pending, len(labeled) / target, LEAD_ORDER.index(grader), grader))
    for *_, grader in sorted(choices):
        candidates = candidates_of(grader)
        labeled, skip = _labeled(session, grader, labeler), {r for r, g in skipped if g == grader}
        partners = _partners(session, grader, labeler)
        chosen = _pick(candidates, labeled, skip, partners)
        if plan == "widest" and grader != "coherence" and judge is not None \
                and chosen not in partners:
            still_open = [c for c in candidates if c[0] not in labeled and c[0] not in skip
                          and c[2] >= 0]
            # As in the balanced plan: unparsed answers only when no parsed one is left.
            parsed = [c for c in still_open if c[3] is not None]
            chosen = pick_widest(session, sweep, grader, judge, parsed or still_open,
                                 _order) or chosen
        if chosen is not None:
            return _item(session, sweep, chosen, grader, judge), progress
    return None, progress
