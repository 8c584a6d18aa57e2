"""Simulated sweeps with a known truth for the layer test (tests/test_layer_test.py and
scripts/sim_layer_test.py), vectorised over sweeps.

Words are drawn with their own rates (a word's unpatched logit from logit(Beta(2, 2))); a word's
curve wanders smoothly over the 21 patch layers (an AR(1) deviation on the logit scale); each
key's samples share a latent rate drawn from Beta(KAPPA q, KAPPA (1 - q)) around the key's rate
q, so the 64 samples of a key are correlated; each target condition's baseline is drawn the
same way with no patch. Where there is an effect, it moves the logit at layers 45-48 only. With
no effect the population mean difference to the baseline is 0 at every layer (the word rates
are symmetric about 0.5 and every deviation is symmetric about 0), so any flagged layer is a
false one.
"""

import numpy as np
from numpy.typing import NDArray

from patchdb.report.clusters import WordRates

LAYERS = tuple(range(40, 61))
EFFECT = (45, 46, 47, 48)
SAMPLES = 64
KAPPA = 20.0
WANDER = 0.3  # sd of a word's (or key's) logit deviation at a layer
WORD_EFFECT = (-2.0, 0.5)  # single-word experiments: each word's logit shift ~ N(mean, sd)
PAIR_EFFECT = -1.5
SOURCE_SPREAD = 0.5  # pair experiments: sd of a source word's logit effect at a layer
CONTROL_RATE = 0.15  # steered_to_unsteered: the no-injection control's rate

Ints = NDArray[np.int64]


def expit(z: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-z))


def wander(rng: np.random.Generator, shape: tuple[int, ...], sd: float,
           rho: float = 0.7) -> NDArray[np.float64]:
    """A stationary AR(1) along the last axis (the layers) with standard deviation sd."""
    noise = rng.standard_normal(shape)
    out = np.empty(shape)
    out[..., 0] = noise[..., 0]
    for i in range(1, shape[-1]):
        out[..., i] = rho * out[..., i - 1] + np.sqrt(1 - rho ** 2) * noise[..., i]
    return sd * out


def sample(rng: np.random.Generator, rate: NDArray[np.float64]) -> Ints:
    """64 correlated samples per key: a latent rate around `rate`, then binomial counts."""
    latent = rng.beta(rate * KAPPA, (1 - rate) * KAPPA)
    return rng.binomial(SAMPLES, latent).astype(np.int64)


def _at_effect() -> NDArray[np.float64]:
    return np.isin(LAYERS, EFFECT).astype(float)


def single_word(rng: np.random.Generator, sweeps: int, words: int = 8,
                effect: bool = False) -> tuple[Ints, Ints]:
    """unsteered_to_steered: successes (sweeps, 1, W, L) and baselines (sweeps, W)."""
    base = np.log(p := rng.beta(2, 2, (sweeps, words))) - np.log1p(-p)
    curve = base[..., None] + wander(rng, (sweeps, words, len(LAYERS)), WANDER)
    if effect:
        shift = rng.normal(*WORD_EFFECT, size=(sweeps, words))
        curve = curve + shift[..., None] * _at_effect()
    baseline = sample(rng, expit(base + WANDER * rng.standard_normal((sweeps, words))))
    return sample(rng, expit(curve))[:, None], baseline


def pairs(rng: np.random.Generator, sweeps: int, sources: int = 10, targets: int = 8,
          effect: bool = False) -> tuple[Ints, Ints]:
    """A pair experiment: successes (sweeps, S, T, L) and baselines (sweeps, T). A source word
    matters only through the patch: its effect wanders over the layers about 0."""
    layers = len(LAYERS)
    base = np.log(p := rng.beta(2, 2, (sweeps, targets))) - np.log1p(-p)
    curve = (base[:, None, :, None]
             + wander(rng, (sweeps, sources, 1, layers), SOURCE_SPREAD)
             + wander(rng, (sweeps, sources, targets, layers), WANDER))
    if effect:
        curve = curve + PAIR_EFFECT * _at_effect()
    return sample(rng, expit(curve)), sample(rng, expit(base))


def shared_baseline(rng: np.random.Generator, sweeps: int, words: int = 8,
                    effect: float = 0.0) -> tuple[Ints, Ints]:
    """steered_to_unsteered: successes (sweeps, W, 1, L) and the one control (sweeps, 1).
    Word rates are spread symmetrically about the control's rate, so the null holds."""
    spread = rng.uniform(-0.1, 0.1, (sweeps, words, 1)) + np.clip(
        wander(rng, (sweeps, words, len(LAYERS)), 0.05), -0.04, 0.04)
    rate = CONTROL_RATE + spread + effect * _at_effect()
    control = rng.binomial(SAMPLES, CONTROL_RATE, (sweeps, 1)).astype(np.int64)
    return sample(rng, rate)[:, :, None], control


def word_rates(successes: Ints, baseline: Ints) -> WordRates:
    """One simulated sweep (S, T, L) as the report's arrays, every key with 64 scored samples."""
    n_s, n_t, _ = successes.shape
    return WordRates(
        "simulated", tuple(f"s{i}" for i in range(n_s)) if n_s > 1 else ("",),
        tuple(f"t{i}" for i in range(n_t)) if n_t > 1 else ("",), LAYERS,
        successes, np.full(successes.shape, SAMPLES, dtype=np.int64),
        baseline, np.full(baseline.shape, SAMPLES, dtype=np.int64))
