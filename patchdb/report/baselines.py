"""Baselines in the report: each target condition's unpatched rate, the false-positive rate of
the no-injection control, and the net rate (rate minus the false-positive rate).

The rates come from the store's `baseline_rates` view under the report's judge config. The
control is the baseline of steered_to_unsteered (no steering at all, no patch), judged for
detection; every plot of the sweep draws it, whichever experiments are reported.

Intervals of a net rate: a rate p1 with interval (l1, u1) minus the false-positive rate p2 with
Wilson interval (l2, u2) gets Newcombe's hybrid score interval for a difference of two
independent estimates (`newcombe`),
    lower = (p1 - p2) - sqrt((p1 - l1)^2 + (u2 - p2)^2)
    upper = (p1 - p2) + sqrt((u1 - p1)^2 + (p2 - l2)^2),
where a bold line's own interval is its band over words (patchdb.report.bands) or, with
`--ci-method samples`, its Wilson interval at its effective sample size (`net_interval`).
"""

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import text
from sqlalchemy.orm import Session

from patchdb.errors import PatchdbError
from patchdb.experiments import NO_STEERING, NO_STEERING_LABEL
from patchdb.report.stats import Z_95, wilson_interval

CONTROL_EXPERIMENT = "steered_to_unsteered"

BASELINES_SQL = """
SELECT experiment, target_word, n, n_scored, rate
FROM baseline_rates
WHERE sweep = :sweep AND judge_config_id = :jc
ORDER BY experiment, target_word
"""


@dataclass(frozen=True)
class Baseline:
    """One target condition's unpatched rate under one judge config."""

    experiment: str
    target_word: str
    n: int  # rollouts judged for coherence under the config
    n_scored: int
    successes: int

    @property
    def label(self) -> str:
        return self.target_word if self.target_word != NO_STEERING else NO_STEERING_LABEL

    @property
    def rate(self) -> float:
        """successes / n_scored; NaN when nothing is scored."""
        return self.successes / self.n_scored if self.n_scored else math.nan

    def interval(self, z: float = Z_95) -> tuple[float, float]:
        """The rate's Wilson 95% interval (NaN, NaN when nothing is scored)."""
        lower, upper = wilson_interval(self.successes, self.n_scored, z)
        return float(lower), float(upper)


@dataclass(frozen=True)
class WordsReference(Baseline):
    """A reference rate over several target words (the random-vector control: each target word
    its own random direction): the unweighted mean of the words' rates, as a line is, banded
    over those words (patchdb.report.bands.baseline_interval), not over their pooled samples.
    `successes` and `n_scored` are the pooled counts, for display."""

    word_rates: tuple[float, ...] = ()
    word_samples: tuple[int, ...] = ()

    @property
    def rate(self) -> float:
        return sum(self.word_rates) / len(self.word_rates) if self.word_rates else math.nan


def read_baselines(session: Session, sweep: str,
                   judge_config_id: int | None) -> dict[str, dict[str, Baseline]]:
    """{experiment: {target word: Baseline}} for the sweep under one judge config."""
    found: dict[str, dict[str, Baseline]] = {}
    if judge_config_id is None:
        return found
    for experiment, target, n, n_scored, rate in session.execute(
            text(BASELINES_SQL), {"sweep": sweep, "jc": judge_config_id}):
        successes = round(float(rate) * int(n_scored)) if rate is not None else 0
        found.setdefault(experiment, {})[target] = Baseline(
            experiment, target, int(n), int(n_scored), successes)
    return found


def control_of(baselines: dict[str, dict[str, Baseline]]) -> Baseline | None:
    """The no-injection control (no steering, no patch), if the sweep has it scored."""
    control = baselines.get(CONTROL_EXPERIMENT, {}).get(NO_STEERING)
    return control if control is not None and control.n_scored else None


def require_control(control: Baseline | None) -> Baseline:
    """The control, or the error `report --net` gives without one."""
    if control is None:
        raise PatchdbError(
            "--net needs the false-positive rate: the no-injection control "
            f"({CONTROL_EXPERIMENT}'s baseline, no steering and no patch) has no scored sample "
            "under this judge config; run `patchdb generate` and `patchdb judge` for it")
    return control


def newcombe(p1: NDArray[np.float64] | float, l1: NDArray[np.float64] | float,
             u1: NDArray[np.float64] | float, p2: float, l2: float,
             u2: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Newcombe's interval of p1 - p2 from the two estimates' own intervals (module
    docstring); NaN wherever either interval is."""
    a = np.asarray(p1, dtype=float)
    d = a - p2
    lower = d - np.sqrt((a - np.asarray(l1, dtype=float)) ** 2 + (u2 - p2) ** 2)
    upper = d + np.sqrt((np.asarray(u1, dtype=float) - a) ** 2 + (p2 - l2) ** 2)
    return lower, upper


def net_interval(rates: list[float], n_effective: list[float], control: Baseline,
                 z: float = Z_95) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Newcombe's interval of each rate minus the control's rate, every sample taken as an
    independent draw (`--ci-method samples`; module docstring)."""
    p1 = np.asarray(rates, dtype=float)
    n1 = np.asarray(n_effective, dtype=float)
    l1, u1 = wilson_interval(np.where(n1 > 0, p1 * n1, 0.0), n1, z)
    l2, u2 = control.interval(z)
    return newcombe(p1, l1, u1, control.rate, l2, u2)
