"""Seeds and batch-invariant sampling.

Each rollout has its own seed, derived from what it is (sweep, experiment, layer, key, sample),
so it can be regenerated alone. Sampling is Gumbel-max with noise from a counter-based hash of
(seed, step, token id), computed with integer tensor ops: a row's tokens never depend on which
other rows share its batch, and no random generator state is involved.
"""

import hashlib
from functools import lru_cache

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


@lru_cache(maxsize=8)
def _token_keys(vocab_size: int, device: torch.device) -> torch.Tensor:
    tokens = torch.arange(vocab_size, device=device, dtype=torch.int64)
    return _mix32((tokens * _WEYL) & _M32)


def gumbel_noise(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise [rows, vocab] that depends only on (seed, step, token id)."""
    device = seeds.device
    lo = seeds & _M32
    hi = (seeds >> 32) & _M32
    row_key = _mix32(lo ^ _mix32(hi ^ _mix32(torch.full_like(seeds, step & _M32))))
    token_key = _token_keys(vocab_size, device)
    h = _mix32(_mix32(row_key[:, None] ^ token_key[None, :]) ^ row_key[:, None])
    # 24 high bits give a float32-exact uniform in (0, 1).
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def choose_tokens(
    logits: torch.Tensor, seeds: torch.Tensor, step: int, temperature: float
) -> torch.Tensor:
    """The next token of each row: argmax for temperature 0, else Gumbel-max sampling."""
    scores = logits.float()
    if temperature == 0:
        return scores.argmax(dim=-1)
    noise = gumbel_noise(seeds, step, scores.shape[-1])
    return (scores / temperature + noise).argmax(dim=-1)
