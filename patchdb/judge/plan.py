"""What the judge still has to do, as queries against the store.

A call is one (rollout, grader) pair. Every rollout gets "coherence" plus its experiment's
detection grader. Which calls are pending depends on the mode:

  only_missing    no judgment row yet for this grader and judge config
  retry_unparsed  a row with a NULL verdict and no error
  retry_errors    a row with an error
  overwrite       every call, whatever is stored
"""

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.errors import UnknownNameError
from patchdb.experiments import GRADERS, judged_word
from patchdb.store.models import Experiment, JudgeConfig, Judgment, Rollout
from patchdb.store.sweeps import expected_units

MODES = ("only_missing", "retry_unparsed", "retry_errors", "overwrite")
PAGE_ROLLOUTS = 2000


@dataclass(frozen=True)
class Call:
    """One judge call to make: a grader applied to a rollout's answer."""

    rollout_id: int
    grader: str
    answer: str
    word: str


@dataclass(frozen=True)
class Scope:
    """Which rollouts and graders a run covers: {experiment id: graders}, optional layers."""

    graders: dict[int, tuple[str, ...]]
    layers: tuple[int, ...] | None = None


def graders_for(experiment: Experiment, chosen: Sequence[str] | None) -> tuple[str, ...]:
    """Coherence plus the experiment's detection grader, narrowed to `chosen`."""
    own = ("coherence", experiment.detection_grader)
    return tuple(g for g in own if chosen is None or g in chosen)


def make_scope(
    experiments: Sequence[Experiment], graders: Sequence[str] | None, layers: Sequence[int] | None
) -> Scope:
    return Scope(
        {e.id: graders_for(e, graders) for e in experiments if graders_for(e, graders)},
        tuple(layers) if layers is not None else None,
    )


def _needs(mode: str, row: tuple[bool | None, str | None] | None) -> bool:
    if mode == "overwrite":
        return True
    if mode == "only_missing":
        return row is None
    if row is None:
        return False
    verdict, error = row
    if mode == "retry_unparsed":
        return verdict is None and error is None
    return error is not None


def pending_page(
    session: Session, scope: Scope, config_id: int | None, mode: str, after_id: int,
    skip: set[tuple[int, str]] | None = None, page: int = PAGE_ROLLOUTS,
) -> tuple[list[Call], int | None]:
    """Pending calls among the next `page` rollouts with id > after_id, and the last rollout
    id looked at (None once no rollouts are left). Calls in `skip` are left out."""
    query = (
        select(Rollout.id, Rollout.experiment_id, Rollout.source_word, Rollout.target_word)
        .where(Rollout.experiment_id.in_(list(scope.graders)), Rollout.id > after_id)
        .order_by(Rollout.id)
        .limit(page)
    )
    if scope.layers is not None:
        query = query.where(Rollout.patch_layer.in_(scope.layers))
    rollouts = session.execute(query).all()
    if not rollouts:
        return [], None
    ids = [r.id for r in rollouts]
    stored: dict[tuple[int, str], tuple[bool | None, str | None]] = {}
    if config_id is not None:
        for rid, grader, verdict, error in session.execute(
            select(Judgment.rollout_id, Judgment.grader, Judgment.verdict, Judgment.error).where(
                Judgment.judge_config_id == config_id, Judgment.rollout_id.in_(ids)
            )
        ):
            stored[(rid, grader)] = (verdict, error)
    wanted: list[tuple[int, str, str]] = []
    for r in rollouts:
        for grader in scope.graders[r.experiment_id]:
            key = (r.id, grader)
            if (skip is None or key not in skip) and _needs(mode, stored.get(key)):
                wanted.append((r.id, grader, judged_word(r.source_word, r.target_word)))
    answers: dict[int, str] = {}
    need_ids = sorted({rid for rid, _, _ in wanted})
    for start in range(0, len(need_ids), 900):
        chunk = need_ids[start:start + 900]
        for rid, answer in session.execute(
            select(Rollout.id, Rollout.answer).where(Rollout.id.in_(chunk))
        ):
            answers[rid] = answer
    calls = [Call(rid, grader, answers[rid], word) for rid, grader, word in wanted]
    return calls, ids[-1]


def count_pending(session: Session, scope: Scope, config_id: int | None, mode: str) -> int:
    """How many calls the mode would make now, counted in SQL."""
    total = 0
    for exp_id, graders in scope.graders.items():
        rollouts = select(Rollout.id).where(Rollout.experiment_id == exp_id)
        if scope.layers is not None:
            rollouts = rollouts.where(Rollout.patch_layer.in_(scope.layers))
        n_rollouts = session.scalar(select(func.count()).select_from(rollouts.subquery())) or 0
        if config_id is None:
            rows = {"all": 0, "unparsed": 0, "errors": 0}
        else:
            stored = select(
                func.count(),
                func.sum(case((Judgment.verdict.is_(None) & Judgment.error.is_(None), 1), else_=0)),
                func.sum(case((Judgment.error.is_not(None), 1), else_=0)),
            ).where(
                Judgment.judge_config_id == config_id,
                Judgment.grader.in_(graders),
                Judgment.rollout_id.in_(rollouts),
            )
            n_all, n_unparsed, n_errors = session.execute(stored).one()
            rows = {"all": n_all or 0, "unparsed": n_unparsed or 0, "errors": n_errors or 0}
        expected = n_rollouts * len(graders)
        total += {
            "overwrite": expected,
            "only_missing": expected - rows["all"],
            "retry_unparsed": rows["unparsed"],
            "retry_errors": rows["errors"],
        }[mode]
    return total


def find_judge_config(
    session: Session, model: str, reasoning: str, template_version: str, backend: str,
    verdict_mode: str = "last-word",
) -> int | None:
    return session.scalar(
        select(JudgeConfig.id).where(
            JudgeConfig.model == model,
            JudgeConfig.reasoning == reasoning,
            JudgeConfig.template_version == template_version,
            JudgeConfig.backend == backend,
            JudgeConfig.verdict_mode == verdict_mode,
        )
    )


@dataclass
class PlanRow:
    experiment: str
    keys: int
    samples: int
    layers: int
    graders: int
    calls: int
    done: int


def call_table(
    session: Session, config: SweepConfig, experiments: Sequence[Experiment],
    layers: Sequence[int] | None, graders: Sequence[str] | None, config_id: int | None,
) -> list[PlanRow]:
    """The call count per experiment (keys x samples x layers x graders) and the calls
    already stored for this judge config."""
    table: list[PlanRow] = []
    for exp in experiments:
        units = expected_units(config, [exp], list(layers) if layers is not None else None)
        keys = {(u.source_word, u.target_word) for u in units}
        n_layers = len({u.patch_layer for u in units})
        exp_graders = graders_for(exp, graders)
        done = 0
        if config_id is not None and exp_graders:
            rollouts = select(Rollout.id).where(Rollout.experiment_id == exp.id)
            if layers is not None:
                rollouts = rollouts.where(Rollout.patch_layer.in_(list(layers)))
            done = session.scalar(
                select(func.count()).select_from(Judgment).where(
                    Judgment.judge_config_id == config_id,
                    Judgment.grader.in_(exp_graders),
                    Judgment.rollout_id.in_(rollouts),
                )
            ) or 0
        calls = len(keys) * config.samples * n_layers * len(exp_graders)
        table.append(PlanRow(exp.name, len(keys), config.samples, n_layers, len(exp_graders),
                             calls, done))
    return table


def check_graders(graders: Sequence[str] | None) -> None:
    for g in graders or ():
        if g not in GRADERS:
            raise UnknownNameError(f"unknown grader {g!r} (known: {', '.join(GRADERS)})")
