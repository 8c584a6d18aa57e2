"""Why an experiment's rates are missing, with numbers and the command that fills them.

One function (`missing_reason`) words it; the report's table, the HTML page and the end of
`patchdb sweep` all show its text, so a user never sees a bare gap or a dash without the cause.
"""

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.experiments import EXPERIMENTS, experiment_keys
from patchdb.store.models import Experiment, Sweep
from patchdb.store.status import GRADERS_PER_ROLLOUT, judgment_counts, rollout_counts


@dataclass(frozen=True)
class Tally:
    """One experiment's rows under one judge config: what a rate needs and what is there."""

    rollouts_expected: int
    rollouts: int
    parsed: int
    unparsed: int
    errors: int


def missing_reason(t: Tally) -> str:
    """Why rates are missing ("" when every expected rollout has both verdicts parsed)."""
    if t.rollouts == 0:
        return "no rollouts yet: run `patchdb generate`"
    stored = t.parsed + t.unparsed + t.errors
    if stored == 0:
        return "no judgments yet: run `patchdb judge`"
    parts = []
    if t.unparsed:
        parts.append(f"{t.unparsed:,} of {stored:,} verdicts unparsed: see `patchdb status`; "
                     "`patchdb judge --retry-unparsed`")
    if t.errors:
        parts.append(f"{t.errors:,} judge error{'s' if t.errors != 1 else ''}: "
                     "`patchdb judge --retry-errors`")
    calls = t.rollouts * GRADERS_PER_ROLLOUT
    if stored < calls:
        parts.append(f"{calls - stored:,} of {calls:,} judge calls not made yet: `patchdb judge`")
    if t.rollouts < t.rollouts_expected:
        parts.append(f"{t.rollouts_expected - t.rollouts:,} of {t.rollouts_expected:,} rollouts "
                     "not generated yet: `patchdb generate`")
    return "; ".join(parts)


def missing_reasons(session: Session, sweep: Sweep, config: SweepConfig,
                    experiment_names: list[str], judge_config_id: int | None) -> dict[str, str]:
    """missing_reason per experiment, counted in SQL for one judge config."""
    rows = session.execute(select(Experiment.id, Experiment.name).where(
        Experiment.sweep_id == sweep.id, Experiment.name.in_(experiment_names))).all()
    ids = [r.id for r in rows]
    rollouts = rollout_counts(session, ids)
    verdicts = judgment_counts(session, ids, judge_config_id)
    reasons: dict[str, str] = {}
    # the baselines (patch layer -1) are not among the rates this explains
    rollouts = {k: n for k, n in rollouts.items() if k[1] >= 0}  # not baselines or controls
    verdicts = {k: v for k, v in verdicts.items() if k[1] >= 0}
    for exp_id, name in rows:
        n_keys = len(experiment_keys(EXPERIMENTS[name], config.positive_words,
                                     config.negative_words))
        sums = [sum(v[i] for (e, _), v in verdicts.items() if e == exp_id) for i in range(3)]
        reasons[name] = missing_reason(Tally(
            rollouts_expected=n_keys * config.samples * len(config.layers),
            rollouts=sum(n for (e, _), n in rollouts.items() if e == exp_id),
            parsed=sums[0], unparsed=sums[1], errors=sums[2]))
    return reasons
