"""Attention for the graphed decode step: one query token per row against a static KV cache.

PyTorch's fused SDPA kernels are built for many queries. With one query token a row (two per KV
head after packing grouped-query heads) and a mask over the static cache, the kernel SDPA picks on
an H100 reads the cache at well under half the card's bandwidth, and attention became a third of a
27B model's decode step (scripts/probe_step.py). Here the step is two batched matmuls and a float32
softmax: the keys and values are read once, at full width, and nothing is repeated per query head.

Only the decode step uses it, and only while the step is captured into a CUDA graph; the prefill
keeps the model's own attention.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "patchdb_decode"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [b, heads, 1, d]; key and value [b, kv_heads, length, d]; a boolean mask (True:
    attend) or an additive one, broadcastable to [b, 1, 1, length]. Returns [b, 1, heads, d]."""
    batch, heads, q_len, dim = query.shape
    if q_len != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    # Query heads that share a KV head become that head's "queries": [b, kv_heads, groups, d].
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(packed, key.transpose(-1, -2)).float() * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kv_heads, groups, d]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def decode_attention_for(model: Any) -> Iterator[bool]:
    """Route the model's attention through decode_attention while the block runs, where the
    model uses SDPA (yields whether it does); restores the model's own choice afterwards."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa":
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = current
