"""Which judge config a report, a status or an export reads: one rule, used by every command.

The rule: the config with the most *scored* samples of the sweep (both of a sample's verdicts
parsed under that config, as the `sample_scores` view decides), ties going to the newest config
(highest id), since a re-judge with new settings or templates makes a newer config. Unparsed
replies and errors count for nothing, so a broken judge run with many rows never wins over a
working one. `--judge-config` overrides the rule.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from patchdb.errors import UnknownNameError
from patchdb.store.models import Experiment, JudgeConfig, Judgment, Rollout, Sweep

SCORED_SQL = """
SELECT judge_config_id, COUNT(score) AS scored
FROM sample_scores
WHERE sweep = :sweep AND judge_config_id IS NOT NULL
GROUP BY judge_config_id
"""


@dataclass(frozen=True)
class JudgeChoice:
    """The judge config a report reads, how it was chosen, and the sweep's other configs."""

    id: int | None
    description: str
    n_configs: int
    scored: int = 0
    others: dict[int, int] = field(default_factory=dict)  # other config id -> scored samples
    requested: bool = False

    @property
    def why(self) -> str:
        """The chosen config and the reason, in one line for the user."""
        if self.id is None:
            return "no judgments yet"
        line = f"{self.description}: {self.scored:,} scored samples"
        if self.requested:
            return line + " (chosen with --judge-config)"
        if self.others:
            rest = ", ".join(f"#{cid} has {n:,}" for cid, n in sorted(self.others.items()))
            line += f", the most of {self.n_configs} judge configs ({rest}; choose with " \
                    "--judge-config)"
        return line


def describe_judge_config(config: JudgeConfig) -> str:
    """'judge config #2 (openai: openai/gpt-5-nano, reasoning medium, templates v1)'."""
    return (f"judge config #{config.id} ({config.backend}: {config.model}, "
            f"reasoning {config.reasoning}, templates {config.template_version})")


def scored_per_config(session: Session, sweep: Sweep,
                      counted: Iterable[tuple[int | None, int]] | None = None) -> dict[int, int]:
    """Scored samples per judge config that has any judgment of the sweep (0 where none parsed).
    `counted`: (judge config id, scored samples) rows the caller already counted over the whole
    sweep's `sample_scores`, added up per config instead of counting again (the report's pass)."""
    judged = session.scalars(
        select(Judgment.judge_config_id).distinct()
        .join(Rollout, Rollout.id == Judgment.rollout_id)
        .join(Experiment, Experiment.id == Rollout.experiment_id)
        .where(Experiment.sweep_id == sweep.id)
    )
    counts = {int(cid): 0 for cid in judged}
    rows = (session.execute(text(SCORED_SQL), {"sweep": sweep.name}) if counted is None
            else counted)
    for cid, scored in rows:
        if cid is not None:
            counts[int(cid)] = counts.get(int(cid), 0) + int(scored)
    return counts


def choose_judge_config(session: Session, sweep: Sweep, requested: int | None,
                        counted: Iterable[tuple[int | None, int]] | None = None) -> JudgeChoice:
    """The requested judge config, else the one with the most scored samples (newest on ties);
    `counted` as scored_per_config takes it."""
    scored = scored_per_config(session, sweep, counted)
    if requested is not None and requested not in scored:
        raise UnknownNameError(
            f"judge config {requested} has no judgments in sweep {sweep.name!r} "
            f"(configs with judgments: {', '.join(map(str, sorted(scored))) or 'none'})"
        )
    if not scored:
        return JudgeChoice(None, "no judgments yet", 0)
    chosen = requested if requested is not None else max(scored, key=lambda c: (scored[c], c))
    config = session.get(JudgeConfig, chosen)
    assert config is not None
    others = {cid: n for cid, n in scored.items() if cid != chosen}
    return JudgeChoice(chosen, describe_judge_config(config), len(scored), scored[chosen],
                       others, requested is not None)
