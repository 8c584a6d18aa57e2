"""The store's side of corrected rates, and the Rogan-Gladen correction (`--correction
rogan-gladen`; the default, PPI++, is patchdb.report.ppi).

What is corrected is the score itself, coherent AND detected, as one YES/NO: a rollout labeled by
hand for both of its graders has a true score (the AND of its two labels) and a judged score (the
AND of the judge's two verdicts). `strata_counts` reads both, per key, layer and the judge's
detection verdict (the label plan's strata), for PPI.

Rogan-Gladen estimates the judge's sensitivity (Se) and specificity (Sp) for the score once per
detection grader (the pair experiments share one, the single-word experiments another) and
assumes they hold at every layer and key. A rate the judge reports as p is then
(p + Sp - 1) / (Se + Sp - 1), clipped to [0, 1].

The labeling plan does not pick answers at random: it balances the judge's YES and NO verdicts
of each grader. So Se and Sp are not read off the labeled rollouts directly. The scored rollouts
fall into four strata by the judge's two verdicts (coherent YES/NO x detected YES/NO; only the
YES/YES stratum is a judged YES score). Within a stratum the labels are taken as a fair sample,
which gives q_s, the share of true scores there; the strata's shares w_s of all scored rollouts
are known. Then Se = sum over YES strata of w_s q_s / sum over all of w_s q_s, and Sp likewise
with 1 - q_s over the NO strata. A NO stratum without labels borrows the pooled q of the labeled
NO strata.

Its band redraws the labels (each stratum's true count, binomially) and the words (the cluster
bootstrap of patchdb.report.clusters) together, and goes through the report's Wilson-t step.
Too few labels, or a judge barely better than chance (Se + Sp - 1 small, where the division
blows up any noise), are refused.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import text
from sqlalchemy.orm import Session

from patchdb.errors import CalibrationError
from patchdb.report.calibration import truths
from patchdb.report.clusters import bootstrap_counts
from patchdb.report.ppi import (
    NO,
    YES,
    LineBands,
    StrataCounts,
    bands_of,
    empty_counts,
    line_means,
)
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
        if not (np.isfinite(se) and np.isfinite(sp)):
            raise CalibrationError(
                f"cannot correct {what}: the judge's TPR or TNR is undefined (TPR {se:.2f}, "
                f"TNR {sp:.2f}): the labels hold no true score or no false one")
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


def rogan_gladen_lines(counts: StrataCounts, calibration: ScoreCalibration, labels: list[str],
                       draws: int = DRAWS, seed: int = SEED) -> list[LineBands]:
    """Rogan-Gladen applied to each bold line's mean of key rates (what the raw line draws),
    with the band of words and labels redrawn together."""
    raw = counts.raw_rates
    n_s, n_t = len(counts.sources), len(counts.targets)
    observed = line_means(raw, np.ones((1, n_s), np.int64), np.ones((1, n_t), np.int64),
                          counts.pairs)[0]
    se, sp = calibration.se_sp
    estimate = rogan_gladen(observed, se, sp)
    estimate = np.where(np.isnan(observed), np.nan, estimate)
    se_b, sp_b = calibration.draw(np.random.default_rng(seed), draws)
    drawn_raw = line_means(raw, *bootstrap_counts(n_s, n_t, draws, seed), counts.pairs)
    drawn = np.where(np.isnan(drawn_raw), np.nan,
                     rogan_gladen(drawn_raw, se_b[:, None, None], sp_b[:, None, None]))
    return bands_of(counts, estimate, drawn, labels, np.zeros(estimate.shape))


# Per key, layer and the judge's detection verdict: the scored rollouts and judged YES scores.
COUNTS_SQL = """
SELECT ss.experiment, ss.patch_layer, ss.source_word, ss.target_word, ss.detected,
       COUNT(*) AS n, SUM(ss.score) AS judged
FROM sample_scores ss
JOIN experiments e ON e.name = ss.experiment
JOIN sweeps s ON s.id = e.sweep_id AND s.name = ss.sweep
WHERE s.id = :sweep_id AND e.detection_grader = :grader AND ss.judge_config_id = :config
      AND ss.score IS NOT NULL AND ss.patch_layer <> -1
GROUP BY ss.experiment, ss.patch_layer, ss.source_word, ss.target_word, ss.detected
"""

# The same rollouts one by one where some label exists (a few hundred rows).
LABELED_SQL = """
SELECT ss.rollout_id, ss.experiment, ss.patch_layer, ss.source_word, ss.target_word,
       ss.detected, ss.score
FROM sample_scores ss
JOIN experiments e ON e.name = ss.experiment
JOIN sweeps s ON s.id = e.sweep_id AND s.name = ss.sweep
WHERE s.id = :sweep_id AND e.detection_grader = :grader AND ss.judge_config_id = :config
      AND ss.score IS NOT NULL AND ss.patch_layer <> -1
      AND ss.rollout_id IN (SELECT rollout_id FROM labels)
"""


def strata_counts(session: Session, sweep: Sweep, detection_grader: str,
                  judge_config_id: int) -> dict[str, StrataCounts]:
    """Per experiment of the grader: its scored rollouts and hand-labeled scores over (source,
    target, layer, the judge's detection verdict), words and layers in sorted order. A
    rollout's true score is its coherence label AND its detection label (both needed)."""
    params = {"sweep_id": sweep.id, "grader": detection_grader, "config": judge_config_id}
    rows = list(session.execute(text(COUNTS_SQL), params))
    truth = truths(session, sweep)
    labeled = []
    for row in session.execute(text(LABELED_SQL), params):
        coherent = truth.get((int(row.rollout_id), "coherence"))
        detected = truth.get((int(row.rollout_id), detection_grader))
        if coherent is not None and detected is not None:
            labeled.append((row, coherent and detected))
    out: dict[str, StrataCounts] = {}
    for name in sorted({r.experiment for r in rows}):
        mine = [r for r in rows if r.experiment == name]
        c = empty_counts(name, tuple(sorted({r.source_word for r in mine})),
                         tuple(sorted({r.target_word for r in mine})),
                         tuple(sorted({int(r.patch_layer) for r in mine})))
        at = _index(c)
        for r in mine:
            i = at(r) + (YES if r.detected else NO,)
            c.n[i] += int(r.n)
            c.judged[i] += int(r.judged or 0)
        for r, true in labeled:
            if r.experiment != name:
                continue
            i = at(r) + (YES if r.detected else NO,)
            c.labeled[i] += 1
            c.labeled_true[i] += true
            c.labeled_judged[i] += int(r.score)
            c.labeled_both[i] += int(r.score) and true
        out[name] = c
    return out


def _index(c: StrataCounts) -> Callable[[Any], tuple[int, int, int]]:
    s_at = {w: i for i, w in enumerate(c.sources)}
    t_at = {w: i for i, w in enumerate(c.targets)}
    l_at = {layer: i for i, layer in enumerate(c.layers)}
    return lambda r: (s_at[r.source_word], t_at[r.target_word], l_at[int(r.patch_layer)])
