"""The benchmarks' early-stop model: where each answer ends, drawn from its seed alone (random-init
models never stop by themselves, so the full-layer bench forces EOS at these lengths)."""

import math
from typing import Any

import torch

STOP_TOKEN = 1  # the EOS the early-stop mode forces (a random-init model almost never draws it)
# Answer lengths of the early-stop mode: a quarter of the answers run to the cap, the rest end
# after a log-normal number of tokens (median 30, sigma 0.6: about 12 to 75 tokens for the
# middle 90%), i.e. one to four sentences. An assumption, not a measurement (random-init models
# never stop): an instruction-tuned model asked "do you detect an injected thought?" mostly
# answers in a few sentences, and a verbose share explains itself until the 100-token cap.
STOP_CAPPED = 0.25
STOP_MEDIAN = 30.0
STOP_SIGMA = 0.6


def answer_lengths(max_new_tokens: int) -> Any:
    """seeds -> the step at which each row emits EOS (-1: never; it runs to the cap). Depends
    only on the seed, as a row's tokens do, so batching and finished-row moves change nothing."""
    from patchdb.generate.sampling import row_uniforms

    def lengths(seeds: torch.Tensor) -> torch.Tensor:
        capped = row_uniforms(seeds, 1_000_001) < STOP_CAPPED
        u = row_uniforms(seeds, 1_000_002).double()
        normal = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
        drawn = torch.round(STOP_MEDIAN * torch.exp(STOP_SIGMA * normal)).long()
        drawn = drawn.clamp(4, max_new_tokens - 1)
        return torch.where(capped, -1, drawn)

    return lengths


def length_counts(max_new_tokens: int, n: int = 100_000) -> dict[int, int]:
    """Tokens drawn (EOS included) -> answers under the early-stop mode, over n seeds: what
    the store holds after earlier layers of the sweep, and what sizes paged KV (stop-paged)."""
    stops = answer_lengths(max_new_tokens)(torch.arange(1, n + 1, dtype=torch.int64))
    drawn = torch.where(stops < 0, max_new_tokens, stops + 1)
    values, counts = torch.unique(drawn, return_counts=True)
    return {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}
