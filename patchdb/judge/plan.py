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
from typing import Any, TypeVar

from sqlalchemy import Select, case, func, select
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.errors import UnknownNameError
from patchdb.experiments import BASELINE_LAYER, GRADERS, RANDOM_VECTOR_LAYER, judged_word
from patchdb.store.baselines import baseline_units
from patchdb.store.models import Experiment, JudgeConfig, Judgment, Rollout
from patchdb.store.readouts import random_vector_units
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
    """Which rollouts and graders a run covers: {experiment id: graders}, optional patch
    layers, and whether the baselines (patch layer -1) are in, whatever the layers."""

    graders: dict[int, tuple[str, ...]]
    layers: tuple[int, ...] | None = None
    baselines: bool = True


Q = TypeVar("Q", bound=Select)


def in_scope(query: Q, scope: Scope) -> Q:
    """Narrow a query over rollouts to the scope's patch layers and baselines (with the
    random-vector control's rollouts: unpatched units, kept in like the baselines)."""
    if scope.layers is not None:
        extra = (BASELINE_LAYER, RANDOM_VECTOR_LAYER) if scope.baselines else ()
        return query.where(Rollout.patch_layer.in_(scope.layers + extra))
    if not scope.baselines:
        return query.where(Rollout.patch_layer >= 0)
    return query


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


Key = tuple[int, str]  # (rollout id, grader) under one judge config
Stored = tuple[bool | None, str | None, int | None]  # a judgment's verdict, error, stage run


@dataclass(frozen=True)
class Fresh:
    """The judge runs whose judgments a run counts as this round's: itself (`run_id`), the
    judge runs that were running when it started (`peers`) and every run started since. A key
    one of them wrote is not judged again, whatever the mode, so workers that retry or
    overwrite side by side pay each call once and a --follow run never redoes its own keys."""

    run_id: int
    peers: frozenset[int] = frozenset()

    def wrote(self, stage_run_id: int | None) -> bool:
        return stage_run_id is not None and (stage_run_id >= self.run_id
                                             or stage_run_id in self.peers)


def needs(mode: str, row: Stored | None, fresh: Fresh | None = None) -> bool:
    """Whether a key with this stored judgment (None: none yet) is pending in `mode`."""
    if mode == "only_missing":
        return row is None
    if row is not None and fresh is not None and fresh.wrote(row[2]):
        return False
    if mode == "overwrite":
        return True
    if row is None:
        return False
    verdict, error, _run = row
    if mode == "retry_unparsed":
        return verdict is None and error is None
    return error is not None


def stored_states(session: Session, config_id: int | None,
                  rollout_ids: Sequence[int]) -> dict[Key, Stored]:
    """The stored judgments of these rollouts under one judge config, by key."""
    stored: dict[Key, Stored] = {}
    if config_id is None:
        return stored
    for start in range(0, len(rollout_ids), 900):
        for rid, grader, verdict, error, run in session.execute(
            select(Judgment.rollout_id, Judgment.grader, Judgment.verdict, Judgment.error,
                   Judgment.stage_run_id).where(
                Judgment.judge_config_id == config_id,
                Judgment.rollout_id.in_(list(rollout_ids[start:start + 900])))
        ):
            stored[(rid, grader)] = (verdict, error, run)
    return stored


def pending_page(
    session: Session, scope: Scope, config_id: int | None, mode: str, after_id: int,
    fresh: Fresh | None = None, page: int = PAGE_ROLLOUTS,
) -> tuple[list[Call], int | None]:
    """Pending calls among the next `page` rollouts with id > after_id, and the last rollout
    id looked at (None once no rollouts are left). Keys `fresh` wrote are not pending."""
    query = (
        select(Rollout.id, Rollout.experiment_id, Rollout.source_word, Rollout.target_word)
        .where(Rollout.experiment_id.in_(list(scope.graders)), Rollout.id > after_id)
        .order_by(Rollout.id)
        .limit(page)
    )
    rollouts = session.execute(in_scope(query, scope)).all()
    if not rollouts:
        return [], None
    ids = [r.id for r in rollouts]
    stored = stored_states(session, config_id, ids)
    wanted: list[tuple[int, str, str]] = []
    for r in rollouts:
        for grader in scope.graders[r.experiment_id]:
            if needs(mode, stored.get((r.id, grader)), fresh):
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
        rollouts = in_scope(select(Rollout.id).where(Rollout.experiment_id == exp_id), scope)
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
    """One experiment's line of `judge --dry-run`: the calls the sweep defines, those this
    judge config has stored, those the command would send now (the same count_pending the
    real run starts from) and those whose rollout generate has not written yet."""

    experiment: str
    keys: int
    samples: int
    layers: int
    graders: int
    calls: int
    done: int
    send_now: int = 0
    awaiting_generate: int = 0


def call_table(
    session: Session, config: SweepConfig, experiments: Sequence[Experiment],
    layers: Sequence[int] | None, graders: Sequence[str] | None, config_id: int | None,
    mode: str = "only_missing",
) -> list[PlanRow]:
    """The call count per experiment (keys x samples x layers x graders), the calls already
    stored for this judge config, what `mode` would send now and what waits for generate;
    each experiment's baselines follow it on a row of their own ("  baseline", one layer)."""
    table: list[PlanRow] = []
    chosen = tuple(layers) if layers is not None else None
    for exp in experiments:
        exp_graders = graders_for(exp, graders)
        for name, units, scope in (
            (exp.name, expected_units(config, [exp], list(chosen) if chosen else None),
             Scope({exp.id: exp_graders}, chosen, baselines=False)),
            ("  baseline", baseline_units(config, [exp]),
             Scope({exp.id: exp_graders}, (BASELINE_LAYER,), baselines=False)),
            ("  random vector", random_vector_units(config, [exp]),
             Scope({exp.id: exp_graders}, (RANDOM_VECTOR_LAYER,), baselines=False)),
        ):
            if units:
                table.append(_plan_row(session, name, units, config.samples, scope, config_id,
                                       mode))
    return table


def _plan_row(session: Session, name: str, units: Sequence[Any], samples: int, scope: Scope,
              config_id: int | None, mode: str) -> PlanRow:
    """One line of the dry-run table: the units' calls, counted against the scope's rollouts."""
    keys = {(u.source_word, u.target_word) for u in units}
    n_layers = len({u.patch_layer for u in units})
    exp_graders = next(iter(scope.graders.values()))
    done = present = 0
    if exp_graders:
        rollouts = in_scope(select(Rollout.id).where(Rollout.experiment_id.in_(scope.graders)),
                            scope)
        present = session.scalar(select(func.count()).select_from(rollouts.subquery())) or 0
        if config_id is not None:
            done = session.scalar(
                select(func.count()).select_from(Judgment).where(
                    Judgment.judge_config_id == config_id,
                    Judgment.grader.in_(exp_graders),
                    Judgment.rollout_id.in_(rollouts),
                )
            ) or 0
    calls = len(units) * samples * len(exp_graders)
    send = count_pending(session, scope, config_id, mode) if exp_graders else 0
    return PlanRow(name, len(keys), samples, n_layers, len(exp_graders), calls, done, send,
                   max(0, calls - present * len(exp_graders)))


@dataclass(frozen=True)
class CostEstimate:
    """What `calls` more judge calls would cost, and from what; usd is None when unknown."""

    usd: float | None
    basis: str


def estimate_cost(session: Session, config_id: int | None, calls: int,
                  price_in: float | None = None, price_out: float | None = None) -> CostEstimate:
    """From this judge config's own judged calls: their average recorded cost, or, with prices
    in USD per million tokens, their average prompt and completion tokens times the prices.
    Completion tokens include reasoning tokens, as the API bills them."""
    if calls == 0:
        return CostEstimate(0.0, "nothing to send")
    n_tokens, avg_in, avg_out, n_cost, avg_cost = 0, 0.0, 0.0, 0, 0.0
    if config_id is not None:
        row = session.execute(select(
            func.count(Judgment.prompt_tokens), func.avg(Judgment.prompt_tokens),
            func.avg(Judgment.completion_tokens), func.count(Judgment.cost),
            func.avg(Judgment.cost),
        ).where(Judgment.judge_config_id == config_id, Judgment.error.is_(None))).one()
        n_tokens, n_cost = int(row[0] or 0), int(row[3] or 0)
        avg_in, avg_out, avg_cost = float(row[1] or 0), float(row[2] or 0), float(row[4] or 0)
    which = f"judge config #{config_id}" if config_id is not None else "this judge config"
    if price_in is not None and price_out is not None:
        if not n_tokens:
            return CostEstimate(None, f"{which} has no judged call with token counts in this "
                                      "store to multiply the prices by")
        per_call = (avg_in * price_in + avg_out * price_out) / 1e6
        return CostEstimate(calls * per_call, (
            f"{avg_in:,.0f} prompt + {avg_out:,.0f} completion tokens per call on average over "
            f"{n_tokens:,} judged calls of {which}, at ${price_in:g} / ${price_out:g} per "
            "million tokens"))
    if n_cost:
        return CostEstimate(calls * avg_cost, f"${avg_cost:.6f} per call on average over "
                                              f"{n_cost:,} judged calls of {which}")
    if n_tokens:
        return CostEstimate(None, f"the judged calls of {which} record tokens but no cost; pass "
                                  "--price-in and --price-out (USD per million tokens)")
    return CostEstimate(None, f"{which} has no judged call in this store yet to take the cost "
                              "or tokens per call from")


@dataclass
class DryRun:
    """What `judge --dry-run` shows: the per-experiment table, the judge config it counts
    against (None: a new one), the calls it would send now (after --limit) and their cost."""

    rows: list[PlanRow]
    config_id: int | None
    send_now: int
    cost: CostEstimate
    cost_awaiting: CostEstimate  # of the calls whose rollouts generate has not written yet
    judge: str = ""  # which judge would run: the backend, its host or "in-process", the model


def plan_dry_run(session: Session, config: SweepConfig, experiments: Sequence[Experiment],
                 layers: Sequence[int] | None, graders: Sequence[str] | None,
                 config_id: int | None, mode: str, limit: int | None = None,
                 price_in: float | None = None, price_out: float | None = None) -> DryRun:
    """Count what the same judge command would send now and estimate its cost; writes nothing."""
    rows = call_table(session, config, experiments, layers, graders, config_id, mode)
    send = sum(r.send_now for r in rows)
    if limit is not None:
        send = min(send, limit)
    awaiting = sum(r.awaiting_generate for r in rows)
    return DryRun(rows, config_id, send,
                  estimate_cost(session, config_id, send, price_in, price_out),
                  estimate_cost(session, config_id, awaiting, price_in, price_out))


def check_graders(graders: Sequence[str] | None) -> None:
    for g in graders or ():
        if g not in GRADERS:
            raise UnknownNameError(f"unknown grader {g!r} (known: {', '.join(GRADERS)})")
