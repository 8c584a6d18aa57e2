"""What `patchdb status` reports: expected vs present rows per experiment and layer, judge cost,
and the stages that are running or crashed. Counting is done in SQL."""

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from patchdb.controls import RANDOM_VECTOR, RANDOM_VECTOR_LAYER
from patchdb.experiments import BASELINE_LAYER, NO_STEERING, baseline_targets, experiment_keys
from patchdb.store.baselines import baseline_units
from patchdb.store.judge_choice import choose_judge_config
from patchdb.store.models import Experiment, JudgeBatch, Judgment, Rollout, StageRun
from patchdb.store.readouts import expected_readouts, present_readouts, random_vector_units
from patchdb.store.runs import db_now, effective_status
from patchdb.store.store import Store
from patchdb.store.sweeps import expected_units, experiment_def, get_sweep, sweep_config

GRADERS_PER_ROLLOUT = 2  # coherence + the experiment's detection grader


@dataclass
class LayerStatus:
    experiment: str
    patch_layer: int
    rollouts_expected: int
    rollouts_present: int
    judgments_expected: int
    judged: int = 0
    unparsed: int = 0  # no verdict, no error, not cut off
    errors: int = 0  # an error, and not cut off
    cut_off: int = 0  # no verdict: the judge's reply reached its token cap


@dataclass
class StageStatus:
    id: int
    stage: str
    status: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: str
    error: str | None


@dataclass
class SweepStatus:
    sweep: str
    model: str
    layers: list[LayerStatus] = field(default_factory=list)
    judge_cost: float = 0.0
    judge_configs: int = 0
    counted_judge_config: int | None = None
    judge_choice: str = "no judgments yet"  # which config is counted, and why
    stages: list[StageStatus] = field(default_factory=list)
    prompt_hash: str | None = None  # see prompt_hash(); None until generate stores the prompt
    temperature: float | None = None
    top_k: int | None = None  # None until generate resolves and records the sampling
    top_p: float | None = None
    batches_live: int = 0  # judge batches submitted and not yet collected (judge --batch)
    batch_requests_live: int = 0
    batches_collected: int = 0
    readouts_expected: int = 0  # first-token readouts (patchdb.store.readouts)
    readouts_present: int = 0

    def totals(self) -> dict[str, int]:
        keys = ("rollouts_expected", "rollouts_present", "judgments_expected", "judged",
                "unparsed", "errors", "cut_off")
        return {k: sum(getattr(row, k) for row in self.layers) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = self.totals()
        return data


def prompt_hash(text: str | None) -> str | None:
    """The first 12 hex digits of the sha256 of the rendered prompt (UTF-8), so two stores'
    prompts compare at a glance."""
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def rollout_counts(session: Session, exp_ids: list[int]) -> dict[tuple[int, int], int]:
    """Rollouts present per (experiment id, patch layer)."""
    return {
        (eid, layer): n
        for eid, layer, n in session.execute(
            select(Rollout.experiment_id, Rollout.patch_layer, func.count())
            .where(Rollout.experiment_id.in_(exp_ids))
            .group_by(Rollout.experiment_id, Rollout.patch_layer)
        )
    }


def judgment_counts(session: Session, exp_ids: list[int],
                    config_id: int | None) -> dict[tuple[int, int], tuple[int, int, int]]:
    """(parsed, unparsed, errors) judgments of one judge config per (experiment id, layer).
    Unparsed means no YES/NO in the reply and no error; an error row is counted apart."""
    if config_id is None:
        return {}
    return {
        (eid, layer): (judged or 0, unparsed or 0, errors or 0)
        for eid, layer, judged, unparsed, errors in session.execute(
            select(
                Rollout.experiment_id,
                Rollout.patch_layer,
                func.sum(case((Judgment.verdict.is_not(None), 1), else_=0)),
                func.sum(
                    case((Judgment.verdict.is_(None) & Judgment.error.is_(None), 1), else_=0)
                ),
                func.sum(case((Judgment.error.is_not(None), 1), else_=0)),
            )
            .join(Rollout, Rollout.id == Judgment.rollout_id)
            .where(Rollout.experiment_id.in_(exp_ids), Judgment.judge_config_id == config_id)
            .group_by(Rollout.experiment_id, Rollout.patch_layer)
        )
    }


def cut_off_counts(session: Session, exp_ids: list[int],
                   config_id: int | None) -> dict[tuple[int, int], tuple[int, int]]:
    """Judgments with no verdict whose reply was cut off at the token cap, per (experiment id,
    layer): (those without an error, those with one), so status can count them apart."""
    if config_id is None:
        return {}
    no_verdict = Judgment.verdict.is_(None) & Judgment.cut_off.is_(True)
    return {
        (eid, layer): (int(plain or 0), int(failed or 0))
        for eid, layer, plain, failed in session.execute(
            select(Rollout.experiment_id, Rollout.patch_layer,
                   func.sum(case((no_verdict & Judgment.error.is_(None), 1), else_=0)),
                   func.sum(case((no_verdict & Judgment.error.is_not(None), 1), else_=0)))
            .join(Rollout, Rollout.id == Judgment.rollout_id)
            .where(Rollout.experiment_id.in_(exp_ids), Judgment.judge_config_id == config_id)
            .group_by(Rollout.experiment_id, Rollout.patch_layer)
        )
    }


def sweep_status(store: Store, sweep_name: str | None,
                 judge_config_id: int | None = None) -> SweepStatus:
    """Expected and present rows per experiment and layer, counting the judgments of the judge
    config every report reads (patchdb.store.judge_choice) or of `judge_config_id`."""
    with store.read() as session:
        sweep = get_sweep(session, sweep_name)
        config = sweep_config(sweep)
        experiments = session.scalars(
            select(Experiment).where(Experiment.sweep_id == sweep.id).order_by(Experiment.id)
        ).all()
        exp_ids = [e.id for e in experiments]
        counts = rollout_counts(session, exp_ids)
        judge = choose_judge_config(session, sweep, judge_config_id)
        tallies = judgment_counts(session, exp_ids, judge.id)
        cut = cut_off_counts(session, exp_ids, judge.id)
        cost, n_configs = session.execute(
            select(func.coalesce(func.sum(Judgment.cost), 0.0),
                   func.count(func.distinct(Judgment.judge_config_id)))
            .join(Rollout, Rollout.id == Judgment.rollout_id)
            .where(Rollout.experiment_id.in_(exp_ids))
        ).one()
        result = SweepStatus(sweep=sweep.name, model=sweep.model, judge_cost=float(cost or 0.0),
                             judge_configs=int(n_configs), counted_judge_config=judge.id,
                             judge_choice=judge.why)
        result.prompt_hash = prompt_hash(sweep.prompt_text)
        result.temperature, result.top_k, result.top_p = sweep.temperature, sweep.top_k, sweep.top_p
        # the baselines come first, as patch layer -1 (BASELINE_LAYER)
        # then the random-vector control, as patch layer -2 (RANDOM_VECTOR_LAYER)
        controls = {RANDOM_VECTOR_LAYER} if RANDOM_VECTOR in config.controls else set()
        layers = sorted(set(config.layers) | {BASELINE_LAYER} | controls
                        | {layer for _, layer in counts}, key=lambda x: (x >= 0, -x if x < 0 else x))
        for exp in experiments:
            words = (config.positive_words, config.negative_words)
            n_keys = len(experiment_keys(experiment_def(exp), *words))
            targets = baseline_targets(experiment_def(exp), *words)
            n_words = len([t for t in targets if t != NO_STEERING])
            for layer in layers:
                expected = (n_keys * config.samples if layer in config.layers
                            else len(targets) * config.samples if layer == BASELINE_LAYER
                            else n_words * config.samples if layer in controls else 0)
                if layer in controls and not expected and not counts.get((exp.id, layer)):
                    continue  # no target word: no random vector (steered_to_unsteered)
                judged, unparsed, errors = tallies.get((exp.id, layer), (0, 0, 0))
                cut_plain, cut_failed = cut.get((exp.id, layer), (0, 0))
                result.layers.append(
                    LayerStatus(exp.name, layer, expected, counts.get((exp.id, layer), 0),
                                expected * GRADERS_PER_ROLLOUT, judged, unparsed - cut_plain,
                                errors - cut_failed, cut_plain + cut_failed)
                )
        units = (baseline_units(config, list(experiments))
                 + random_vector_units(config, list(experiments))
                 + expected_units(config, list(experiments)))
        wanted = {r.key for r in expected_readouts(config, list(experiments), units)}
        result.readouts_expected = len(wanted)
        result.readouts_present = len(wanted & present_readouts(session, exp_ids))
        for live, n, requests in session.execute(
            select(JudgeBatch.collected_at.is_(None), func.count(), func.sum(JudgeBatch.requests))
            .where(JudgeBatch.sweep_id == sweep.id).group_by(JudgeBatch.collected_at.is_(None))
        ):
            if live:
                result.batches_live, result.batch_requests_live = int(n), int(requests or 0)
            else:
                result.batches_collected = int(n)
        runs = session.scalars(
            select(StageRun).where((StageRun.sweep_id == sweep.id) | StageRun.sweep_id.is_(None))
            .order_by(StageRun.id.desc()).limit(10)
        ).all()
        now = db_now(session)
        for run in runs:
            result.stages.append(StageStatus(
                run.id, run.stage, effective_status(run, now), run.host, run.pid,
                run.started_at.isoformat(), run.heartbeat_at.isoformat(), run.error,
            ))
    return result
