"""Simulated single-word sweeps with a known truth, judged and labeled as patchdb does it.

Each of W words has its own coherence probability (Beta(8, 2), mean 0.8) and, at each layer, its
own detection probability (Beta with the layer's mean and concentration 6), so the samples of a
word are correlated through the word. The true score is coherent AND detected; the truth a band
must cover is the mean over the word population, 0.8 x the layer's mean detection probability.
A simulated judge grades coherence and detection with error rates that may change with the layer;
labels are drawn as the plan draws them: a fixed number per (layer, detection verdict) stratum,
uniformly within it, both graders labeled.
"""

from dataclasses import dataclass

import numpy as np

from patchdb.report.corrected import ScoreCalibration, Stratum
from patchdb.report.ppi import StrataCounts, empty_counts

COHERENCE_MEAN = 0.8


@dataclass(frozen=True)
class Judge:
    """Sensitivity and specificity of each grader, per layer."""

    coherence_se: float
    coherence_sp: float
    detection_se: tuple[float, ...]
    detection_sp: tuple[float, ...]


@dataclass(frozen=True)
class Sweep:
    counts: StrataCounts
    calibration: ScoreCalibration  # Rogan-Gladen's, pooled over every layer
    truth: np.ndarray  # (L,) the word population's mean true score rate


def simulate(rng: np.random.Generator, detection_means: tuple[float, ...], judge: Judge, *,
             words: int = 8, samples: int = 64, labels_per_stratum: int = 15,
             concentration: float = 6.0, name: str = "sim") -> Sweep:
    """One sweep of a single-word experiment (the words on the source axis)."""
    layers = len(detection_means)
    means = np.asarray(detection_means)
    coherence_p = rng.beta(8, 2, words)
    detection_p = rng.beta(concentration * means, concentration * (1 - means), (words, layers))
    shape = (words, layers, samples)
    coherent = rng.random(shape) < coherence_p[:, None, None]
    detected = rng.random(shape) < detection_p[:, :, None]
    c_noise, d_noise = rng.random(shape), rng.random(shape)
    judged_c = np.where(coherent, c_noise < judge.coherence_se, c_noise >= judge.coherence_sp)
    se = np.asarray(judge.detection_se)[None, :, None]
    sp = np.asarray(judge.detection_sp)[None, :, None]
    judged_d = np.where(detected, d_noise < se, d_noise >= sp)
    true = coherent & detected
    judged = judged_c & judged_d
    labeled = np.zeros(shape, dtype=bool)
    for layer in range(layers):
        for verdict in (False, True):
            pool = np.flatnonzero(judged_d[:, layer, :] == verdict)
            pick = rng.choice(pool, min(labels_per_stratum, len(pool)), replace=False)
            labeled[:, layer, :].flat[pick] = True
    c = empty_counts(name, tuple(f"w{i}" for i in range(words)), ("",), tuple(range(layers)))
    for h, verdict in enumerate((False, True)):
        in_h = judged_d == verdict
        c.n[:, 0, :, h] = in_h.sum(-1)
        c.judged[:, 0, :, h] = (in_h & judged).sum(-1)
        lab = in_h & labeled
        c.labeled[:, 0, :, h] = lab.sum(-1)
        c.labeled_true[:, 0, :, h] = (lab & true).sum(-1)
        c.labeled_judged[:, 0, :, h] = (lab & judged).sum(-1)
        c.labeled_both[:, 0, :, h] = (lab & judged & true).sum(-1)
    strata = []
    for vc in (True, False):
        for vd in (True, False):
            in_s = (judged_c == vc) & (judged_d == vd)
            strata.append(Stratum(vc and vd, float(in_s.mean()), int((in_s & labeled).sum()),
                                  int((in_s & labeled & true).sum())))
    return Sweep(c, ScoreCalibration(tuple(strata)), COHERENCE_MEAN * means)
