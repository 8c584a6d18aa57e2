"""Rates corrected for the judge's errors (Rogan-Gladen), with bootstrap bands.

What is corrected is the score itself, coherent AND detected, as one YES/NO: a rollout labeled by
hand for both of its graders has a true score (the AND of its two labels) and a judged score (the
AND of the judge's two verdicts). From those rollouts we estimate the judge's sensitivity (Se)
and specificity (Sp) for the score, once per detection grader (the pair experiments share one,
the single-word experiments another), and assume they hold at every layer and key. A rate the
judge reports as p is then (p + Sp - 1) / (Se + Sp - 1), clipped to [0, 1].

The labeling plan does not pick answers at random: it balances the judge's YES and NO verdicts
of each grader. So Se and Sp are not read off the labeled rollouts directly. The scored rollouts
fall into four strata by the judge's two verdicts (coherent YES/NO x detected YES/NO; only the
YES/YES stratum is a judged YES score). Within a stratum the labels are a fair sample, which
gives q_s, the share of true scores there; the strata's shares w_s of all scored rollouts are
known. Then Se = sum over YES strata of w_s q_s / sum over all of w_s q_s, and Sp likewise with
1 - q_s over the NO strata. A NO stratum without labels borrows the pooled q of the labeled NO
strata.

The band is a percentile bootstrap that redraws both the labels (each stratum's true count,
binomially) and the samples (each key's successes, binomially), so the calibration's own
uncertainty widens it. Too few labels, or a judge barely better than chance (Se + Sp - 1 small,
where the division blows up any noise), are refused.
"""

from collections import Counter
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
Floats = NDArray[np.float64]


@dataclass(frozen=True)
class Stratum:
    """Scored rollouts with one pair of judge verdicts: their share, and their labels."""

    judged: bool  # the judge's score here (YES only where both verdicts are YES)
    share: float  # of all scored rollouts of these experiments
    labeled: int  # rollouts labeled for both graders
    true_yes: int  # of those, true scores


@dataclass(frozen=True)
class ScoreCalibration:
    """The judge's score against hand-labeled scores, stratum by stratum."""

    strata: tuple[Stratum, ...]

    @classmethod
    def two_classes(cls, judged_yes: int, judged_yes_true: int, judged_no: int,
                    judged_no_true: int, yes_share: float) -> "ScoreCalibration":
        """One stratum per judged class: the judge's YES share and the labels of each class."""
        return cls((Stratum(True, yes_share, judged_yes, judged_yes_true),
                    Stratum(False, 1 - yes_share, judged_no, judged_no_true)))

    def _count(self, judged: bool, field: str) -> int:
        return sum(getattr(s, field) for s in self.strata if s.judged == judged)

    @property
    def judged_yes(self) -> int:
        return self._count(True, "labeled")

    @property
    def judged_yes_true(self) -> int:
        return self._count(True, "true_yes")

    @property
    def judged_no(self) -> int:
        return self._count(False, "labeled")

    @property
    def judged_no_true(self) -> int:
        return self._count(False, "true_yes")

    def rates(self, true_yes: Floats) -> tuple[Floats, Floats]:
        """Se and Sp for true counts per stratum (last axis; leading axes are draws)."""
        labeled = np.array([s.labeled for s in self.strata], dtype=float)
        shares = np.array([s.share for s in self.strata])
        judged = np.array([s.judged for s in self.strata])
        with np.errstate(divide="ignore", invalid="ignore"):
            q = true_yes / labeled
            for cls in (True, False):  # an unlabeled stratum borrows its class's pooled q
                members = (judged == cls) & (labeled > 0)
                pooled = true_yes[..., members].sum(-1) / labeled[members].sum()
                missing = (judged == cls) & (labeled == 0)
                q[..., missing] = np.asarray(pooled)[..., None]
            tp = (shares * q)[..., judged].sum(-1)
            fn = (shares * q)[..., ~judged].sum(-1)
            fp = (shares * (1 - q))[..., judged].sum(-1)
            tn = (shares * (1 - q))[..., ~judged].sum(-1)
            return np.asarray(tp / (tp + fn)), np.asarray(tn / (tn + fp))

    @property
    def se_sp(self) -> tuple[float, float]:
        se, sp = self.rates(np.array([s.true_yes for s in self.strata], dtype=float))
        return float(se), float(sp)

    def draw(self, rng: np.random.Generator, draws: int) -> tuple[Floats, Floats]:
        """Se and Sp of `draws` bootstrap redraws of the labels."""
        true_yes = np.stack([
            rng.binomial(s.labeled, s.true_yes / s.labeled, draws) if s.labeled
            else np.zeros(draws) for s in self.strata], axis=-1).astype(float)
        return self.rates(true_yes)

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


def se_sp(q1: float, q0: float, pi: float) -> tuple[float, float]:
    """Se and Sp from the truth shares among the judge's YES (q1) and NO (q0) answers and the
    judge's YES share pi: the two-stratum case, written out."""
    se = pi * q1 / (pi * q1 + (1 - pi) * q0)
    sp = (1 - pi) * (1 - q0) / ((1 - pi) * (1 - q0) + pi * (1 - q1))
    return se, sp


def rogan_gladen(observed: Floats | float, se: Floats | float, sp: Floats | float) -> Floats:
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
    se_b, sp_b = calibration.draw(rng, draws)
    observed = (rng.binomial(total.astype(np.int64), k / total, (draws, len(k))) / total).mean(1)
    corrected = rogan_gladen(observed, se_b, sp_b)
    lower, upper = np.nanpercentile(corrected, [2.5, 97.5])
    return Band(estimate, float(lower), float(upper))


# Both verdicts of the sweep's scored rollouts for one judge config and detection grader.
SCORES_SQL = """
SELECT ss.rollout_id, ss.coherent, ss.detected
FROM sample_scores ss
JOIN experiments e ON e.name = ss.experiment
JOIN sweeps s ON s.id = e.sweep_id AND s.name = ss.sweep
WHERE s.id = :sweep_id AND e.detection_grader = :grader AND ss.judge_config_id = :config
      AND ss.score IS NOT NULL
"""


def score_calibration(session: Session, sweep: Sweep, detection_grader: str,
                      judge_config_id: int) -> ScoreCalibration:
    """The judge config's score against the hand-labeled scores of the sweep's rollouts."""
    verdicts = {int(r): (bool(c), bool(d)) for r, c, d in session.execute(
        text(SCORES_SQL), {"sweep_id": sweep.id, "grader": detection_grader,
                           "config": judge_config_id})}
    truth = truths(session, sweep)
    pool = Counter(verdicts.values())
    labeled: Counter[tuple[bool, bool]] = Counter()
    true_yes: Counter[tuple[bool, bool]] = Counter()
    for rollout, pair in verdicts.items():
        coherent = truth.get((rollout, "coherence"))
        detected = truth.get((rollout, detection_grader))
        if coherent is not None and detected is not None:
            labeled[pair] += 1
            true_yes[pair] += coherent and detected
    total = max(1, len(verdicts))
    return ScoreCalibration(tuple(
        Stratum(pair == (True, True), pool[pair] / total, labeled[pair], true_yes[pair])
        for pair in ((True, True), (True, False), (False, True), (False, False))))
