"""Rates corrected for the judge's errors (Rogan-Gladen), with bootstrap bands.

What is corrected is the score itself, coherent AND detected, as one YES/NO: a rollout labeled by
hand for both of its graders has a true score (the AND of its two labels) and a judged score (the
AND of the judge's two verdicts). From those rollouts we estimate the judge's sensitivity (Se)
and specificity (Sp) for the score, once per detection grader (the pair experiments share one,
the single-word experiments another), and assume they hold at every layer and key. A rate the
judge reports as p is then (p + Sp - 1) / (Se + Sp - 1), clipped to [0, 1].

The labeling plan picks answers balanced between the judge's YES and NO, not at random, so Se
and Sp are not read off the labeled rollouts directly. Within each judged class the labels are a
fair sample, which gives q1 = P(true YES | judged YES) and q0 = P(true YES | judged NO); with the
judge's YES share pi over all scored rollouts of those experiments (known, not sampled):
Se = pi q1 / (pi q1 + (1 - pi) q0) and Sp = (1 - pi)(1 - q0) / ((1 - pi)(1 - q0) + pi (1 - q1)).

The band is a percentile bootstrap that redraws both the labels (q1 and q0, binomially within
their class) and the samples (each key's successes, binomially), so the calibration's own
uncertainty widens it. Too few labels, or a judge barely better than chance (Se + Sp - 1 small,
where the division blows up any noise), are refused.
"""

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import text
from sqlalchemy.orm import Session

from patchdb.errors import CalibrationError
from patchdb.report.calibration import truths
from patchdb.store.models import Sweep

MIN_PER_CLASS = 10  # labeled rollouts the judge scored YES, and as many scored NO
MIN_YOUDEN = 0.2  # Se + Sp - 1 below this is "near 0": refused
DRAWS = 2000
SEED = 0


@dataclass(frozen=True)
class ScoreCalibration:
    """The judge's score against hand-labeled scores, by judged class, plus its YES share."""

    judged_yes: int  # labeled rollouts the judge scored YES
    judged_yes_true: int  # of those, truly YES
    judged_no: int
    judged_no_true: int  # labeled rollouts the judge scored NO that are truly YES
    yes_share: float  # the judge's YES share over every scored rollout (pi)

    @property
    def q1(self) -> float:
        return self.judged_yes_true / self.judged_yes

    @property
    def q0(self) -> float:
        return self.judged_no_true / self.judged_no

    @property
    def se_sp(self) -> tuple[float, float]:
        se, sp = se_sp(np.float64(self.q1), np.float64(self.q0), self.yes_share)
        return float(se), float(sp)

    def check(self, what: str) -> None:
        """Refuse, in one line, a calibration that cannot support a correction."""
        if self.judged_yes < MIN_PER_CLASS or self.judged_no < MIN_PER_CLASS:
            raise CalibrationError(
                f"cannot correct {what}: {self.judged_yes} labeled rollouts the judge scored "
                f"YES and {self.judged_no} it scored NO (labels for both graders); "
                f"needs {MIN_PER_CLASS} of each")
        se, sp = self.se_sp
        if not se + sp - 1 >= MIN_YOUDEN:
            raise CalibrationError(
                f"cannot correct {what}: the judge's TPR + TNR - 1 is {se + sp - 1:.2f} "
                f"(TPR {se:.2f}, TNR {sp:.2f}), below {MIN_YOUDEN}; it is too close to chance")


def se_sp(q1: NDArray[np.float64] | np.float64, q0: NDArray[np.float64] | np.float64,
          pi: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Sensitivity and specificity from the within-class truth rates and the judge's YES share."""
    with np.errstate(divide="ignore", invalid="ignore"):
        se = pi * q1 / (pi * q1 + (1 - pi) * q0)
        sp = (1 - pi) * (1 - q0) / ((1 - pi) * (1 - q0) + pi * (1 - q1))
    return np.asarray(se), np.asarray(sp)


def rogan_gladen(observed: NDArray[np.float64] | float, se: NDArray[np.float64] | float,
                 sp: NDArray[np.float64] | float) -> NDArray[np.float64]:
    """The true rate behind an observed rate, for a judge of sensitivity se and specificity sp."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (np.asarray(observed) + sp - 1) / (np.asarray(se) + sp - 1)
    return np.asarray(np.clip(value, 0.0, 1.0))


@dataclass(frozen=True)
class Band:
    estimate: float
    lower: float
    upper: float


def corrected_band(successes: list[int], n: list[int], calibration: ScoreCalibration,
                   rng: np.random.Generator, draws: int = DRAWS) -> Band:
    """The corrected mean rate of some keys (successes[i] of n[i] scored) and its 95% band."""
    k = np.asarray(successes, dtype=float)
    total = np.asarray(n, dtype=float)
    keep = total > 0
    if not keep.any():
        return Band(np.nan, np.nan, np.nan)
    k, total = k[keep], total[keep]
    se, sp = calibration.se_sp
    estimate = float(rogan_gladen(float(np.mean(k / total)), se, sp))
    q1 = rng.binomial(calibration.judged_yes, calibration.q1, draws) / calibration.judged_yes
    q0 = rng.binomial(calibration.judged_no, calibration.q0, draws) / calibration.judged_no
    se_b, sp_b = se_sp(q1, q0, calibration.yes_share)
    observed = (rng.binomial(total.astype(np.int64), k / total, (draws, len(k))) / total).mean(1)
    corrected = rogan_gladen(observed, se_b, sp_b)
    lower, upper = np.nanpercentile(corrected, [2.5, 97.5])
    return Band(estimate, float(lower), float(upper))


# Judged scores of the sweep's rollouts for one judge config and detection grader.
SCORES_SQL = """
SELECT ss.rollout_id, ss.score
FROM sample_scores ss
JOIN experiments e ON e.name = ss.experiment
JOIN sweeps s ON s.id = e.sweep_id AND s.name = ss.sweep
WHERE s.id = :sweep_id AND e.detection_grader = :grader AND ss.judge_config_id = :config
      AND ss.score IS NOT NULL
"""


def score_calibration(session: Session, sweep: Sweep, detection_grader: str,
                      judge_config_id: int) -> ScoreCalibration:
    """The judge config's score against the hand-labeled scores of the sweep's rollouts."""
    scores = {int(r): bool(s) for r, s in session.execute(
        text(SCORES_SQL), {"sweep_id": sweep.id, "grader": detection_grader,
                           "config": judge_config_id})}
    truth = truths(session, sweep)
    counts = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    for rollout, judged in scores.items():
        coherent = truth.get((rollout, "coherence"))
        detected = truth.get((rollout, detection_grader))
        if coherent is not None and detected is not None:
            counts[(judged, coherent and detected)] += 1
    share = sum(scores.values()) / len(scores) if scores else float("nan")
    return ScoreCalibration(
        judged_yes=counts[(True, True)] + counts[(True, False)],
        judged_yes_true=counts[(True, True)],
        judged_no=counts[(False, True)] + counts[(False, False)],
        judged_no_true=counts[(False, True)], yes_share=share)
