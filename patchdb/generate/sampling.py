"""Seeds and batch-invariant sampling.

Each rollout has its own seed, derived from what it is (sweep, experiment, layer, key, sample),
so it can be regenerated alone. Sampling draws one uniform per row from a counter-based hash of
(seed, step), computed with integer tensor ops, and inverts the row's softmax CDF: a row's tokens
never depend on which other rows share its batch, and no random generator state is involved.
"""

import hashlib

import torch

SEED_BITS = 62
_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that a 32-bit value times one stays below 2**63 in int64.
_MUL1 = 0x7FEB352D
_MUL2 = 0x2C1B3C6D
_WEYL = 0x61C88647


def rollout_seed(
    sweep: str, experiment: str, patch_layer: int, source: str, target: str, sample_index: int
) -> int:
    """The first 8 bytes of sha256 over the rollout's identity, masked to 62 bits."""
    text = "\x1f".join(
        [sweep, experiment, str(patch_layer), source, target, str(sample_index)]
    )
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    return x ^ (x >> 15)


def row_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in (0, 1) per row that depends only on (seed, step)."""
    lo = seeds & _M32
    hi = (seeds >> 32) & _M32
    h = _mix32(lo ^ _mix32(hi ^ _mix32(torch.full_like(seeds, (step * _WEYL) & _M32))))
    # 24 high bits give a float32-exact uniform.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def choose_tokens(
    logits: torch.Tensor, seeds: torch.Tensor, step: int, temperature: float
) -> torch.Tensor:
    """The next token of each row: argmax for temperature 0, else inverse-CDF sampling from
    softmax(logits / temperature) with the row's own uniform. Every operation is row-wise, so a
    row's token does not depend on the other rows; one uniform per row (not per vocabulary entry)
    keeps sampling cheap next to a decode step on a 262k vocabulary."""
    scores = logits.float()
    if temperature == 0:
        return scores.argmax(dim=-1)
    cdf = torch.softmax(scores / temperature, dim=-1).cumsum_(dim=-1)
    target = row_uniforms(seeds, step)[:, None] * cdf[:, -1:]
    picks = torch.searchsorted(cdf, target).squeeze(-1)
    return picks.clamp_(max=scores.shape[-1] - 1)
