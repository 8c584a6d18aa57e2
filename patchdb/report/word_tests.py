"""Per-word claims: at each patch layer, does this word's rate differ from its own unpatched
baseline? One test per (word, layer) cell over that word's samples, and Benjamini-Hochberg
adjusted p-values across the whole table, so a reader may pick cells out of it.

A claim about one word holds that word fixed, so its samples are the replication: given the
word, the samples of a key are independent draws. The test is Fisher's exact test (two-sided:
every table at most as likely as the observed one) of the word's scored samples at the layer
against its baseline's. In the pair experiments a row is a target word and its samples are
pooled over the source words (the claim is about those sources; with equal samples per key the
pooled rate is the row's mean rate); in steered_to_unsteered every word is compared with the
one no-injection control. Benjamini-Hochberg (1995) keeps the expected share of false claims
among the cells called different at or below the level; the cells of a row share a baseline,
so their tests are positively dependent, the case Benjamini & Yekutieli (2001) show it holds in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from patchdb.report.clusters import WordRates

Floats = NDArray[np.float64]
RELATIVE_TIE = 1e-7  # tables this close in probability to the observed one count as as likely


@dataclass(frozen=True)
class WordPValues:
    """Per row (word) and patch layer: Fisher's exact p and the BH-adjusted p (NaN: no test)."""

    words: tuple[str, ...]
    layers: tuple[int, ...]
    p: Floats  # (W, L)
    adjusted: Floats  # (W, L)


def _log_factorials(n: int) -> Floats:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=float)))])


def fisher_exact(k1: int, n1: int, k0: int, n0: int) -> float:
    """Two-sided Fisher exact p of k1 of n1 against k0 of n0 (NaN when either n is 0)."""
    if n1 <= 0 or n0 <= 0:
        return float("nan")
    lf = _log_factorials(n1 + n0)
    total = k1 + k0
    x = np.arange(max(0, total - n0), min(total, n1) + 1)
    log_p = (lf[n1] - lf[x] - lf[n1 - x] + lf[n0] - lf[total - x] - lf[n0 - total + x]
             - lf[n1 + n0] + lf[total] + lf[n1 + n0 - total])
    observed = log_p[k1 - x[0]]
    return float(min(1.0, np.exp(log_p[log_p <= observed + RELATIVE_TIE]).sum()))


def benjamini_hochberg(p: Floats) -> Floats:
    """BH-adjusted p-values of every finite entry of p (any shape); NaN stays NaN."""
    flat = np.asarray(p, dtype=float).ravel()
    out = np.full(flat.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(flat))
    m = len(tested)
    if m:
        order = tested[np.argsort(flat[tested], kind="stable")]
        scaled = flat[order] * m / np.arange(1, m + 1)
        out[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return out.reshape(np.shape(p))


def word_p_values(words: WordRates) -> WordPValues:
    """The per-word table's p-values: rows are the target words (pooled over sources), or the
    source words where the target is unsteered."""
    if words.targets != ("",):
        names, k, n = words.targets, words.successes.sum(0), words.n_scored.sum(0)
        base_k, base_n = words.baseline_successes, words.baseline_n
    else:
        names, k, n = words.sources, words.successes[:, 0], words.n_scored[:, 0]
        base_k = np.repeat(words.baseline_successes[:1], len(names))
        base_n = np.repeat(words.baseline_n[:1], len(names))
    p = np.array([[fisher_exact(int(k[w, i]), int(n[w, i]), int(base_k[w]), int(base_n[w]))
                   for i in range(len(words.layers))] for w in range(len(names))],
                 dtype=float).reshape(len(names), len(words.layers))
    return WordPValues(tuple(names), tuple(words.layers), p, benjamini_hochberg(p))
