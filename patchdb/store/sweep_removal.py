"""Listing sweeps and removing one that holds no results: the way out of a sweep registered by
mistake (a misspelled model id), whose name `init` would otherwise refuse for ever."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from patchdb.errors import SweepNotEmptyError, UnknownNameError
from patchdb.store.models import Experiment, JudgeBatch, Readout, Rollout, StageRun, Sweep
from patchdb.store.runs import db_now, effective_status


@dataclass(frozen=True)
class SweepSummary:
    """One line of `patchdb sweeps ls`."""

    name: str
    model: str
    experiments: int
    rollouts: int
    readouts: int
    created_at: datetime


@dataclass(frozen=True)
class RemovedSweep:
    name: str
    experiments: int
    stage_runs: int


def _count(session: Session, table: type[Rollout] | type[Readout], sweep_id: int) -> int:
    return session.scalar(
        select(func.count(table.id)).join(Experiment, table.experiment_id == Experiment.id)
        .where(Experiment.sweep_id == sweep_id)
    ) or 0


def results_held(session: Session, sweep_id: int) -> list[str]:
    """What the sweep holds that a removal would lose, as phrases ('12 rollouts'); empty when
    nothing. Judgments and labels hang off rollouts, so a sweep without rollouts has none."""
    held = []
    for noun, count in (("rollout", _count(session, Rollout, sweep_id)),
                        ("readout", _count(session, Readout, sweep_id)),
                        ("judge batch", session.scalar(
                            select(func.count(JudgeBatch.id))
                            .where(JudgeBatch.sweep_id == sweep_id)) or 0)):
        if count:
            held.append(f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('h') else 's'}")
    return held


def sweep_summaries(session: Session) -> list[SweepSummary]:
    """Every sweep in registration order, with what it holds."""
    rows = []
    for sweep in session.scalars(select(Sweep).order_by(Sweep.id)):
        experiments = session.scalar(
            select(func.count(Experiment.id)).where(Experiment.sweep_id == sweep.id)) or 0
        rows.append(SweepSummary(sweep.name, sweep.model, experiments,
                                 _count(session, Rollout, sweep.id),
                                 _count(session, Readout, sweep.id), sweep.created_at))
    return rows


def remove_empty_sweep(session: Session, name: str) -> RemovedSweep:
    """Delete the sweep, its experiments and its stage runs (the record of runs that wrote
    nothing), in the caller's transaction. Refused, changing nothing, when the sweep holds
    rollouts, readouts or judge batches, or a stage is running on it. Concept vectors belong
    to a model, not a sweep, and are kept."""
    sweep = session.scalar(select(Sweep).where(Sweep.name == name))
    if sweep is None:
        known = session.scalars(select(Sweep.name).order_by(Sweep.name)).all()
        raise UnknownNameError(
            f"no sweep named {name!r} in the store (known: {', '.join(known) or 'none'})")
    held = results_held(session, sweep.id)
    if held:
        raise SweepNotEmptyError(
            f"sweep {name!r} holds {' and '.join(held)}; `patchdb sweeps rm` removes only a "
            "sweep with no results (register the new config under another name)")
    runs = session.scalars(select(StageRun).where(StageRun.sweep_id == sweep.id)).all()
    now = db_now(session)
    live = [run for run in runs if effective_status(run, now) == "running"]
    if live:
        run = live[0]
        raise SweepNotEmptyError(
            f"sweep {name!r} has a {run.stage} running on it (pid {run.pid} on {run.host}); "
            "stop it first")
    experiments = session.scalar(
        select(func.count(Experiment.id)).where(Experiment.sweep_id == sweep.id)) or 0
    session.execute(delete(Experiment).where(Experiment.sweep_id == sweep.id))
    session.execute(delete(StageRun).where(StageRun.sweep_id == sweep.id))
    session.delete(sweep)
    session.flush()
    return RemovedSweep(name, experiments, len(runs))
