"""Attention for the graphed decode step: one query token per row against a static KV cache.

With one query token a row (two per KV head after packing grouped-query heads) and a mask over
the static cache, the fused kernel SDPA picks on an H100 reads the cache at well under half the
card's bandwidth: attention was a third of a 27B model's decode step (scripts/probe_step.py).
While a decode step is captured, `cache_length` names the device scalar holding the cache's valid
length, and attention runs patchdb's Triton kernel (triton_decode.py), which streams each row's
KV cache once and the shared prefix once for several rows. Elsewhere (no Triton, the CPU, other
head sizes) it packs the query heads by the KV head they share and calls SDPA, as transformers
does outside torch.compile.

The function is never traced by torch.compile (a compiled decoder layer calls it eagerly), so
its Python branches are plain Python.
"""

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from patchdb.generate import kv_writes, triton_decode
from patchdb.generate.pages import gather_pages, page_table

NAME = "patchdb_decode"
_LENGTH: list[torch.Tensor | None] = [None]
Prefixes = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer index -> keys, values [kv, P, d]
_PREFIX: list[Prefixes | None] = [None]
# layer index -> keys, values [n_units, kv, U, d] (each unit's prompt after the shared prefix),
# each row's unit, and the order the kernel takes rows in (None: as they sit)
UnitTable = tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor,
                  torch.Tensor | None]
_UNITS: list[UnitTable | None] = [None]


@contextmanager
def _holding(slot: list[Any], value: Any) -> Iterator[None]:
    previous = slot[0]
    slot[0] = value
    try:
        yield
    finally:
        slot[0] = previous


def shared_prefix(prefixes: Prefixes) -> AbstractContextManager[None]:
    """While the block runs, every row's decode attention first attends to these keys and values
    (the prompt before the injection start, identical in every row), then to its own cache."""
    return _holding(_PREFIX, prefixes)


def unit_prompts(table: UnitTable) -> AbstractContextManager[None]:
    """While the block runs, every row's decode attention attends, after the shared prefix, to
    its unit's prompt (kept once per unit, not in the row's cache), then to its own cache."""
    return _holding(_UNITS, table)


def cache_length(length: torch.Tensor) -> AbstractContextManager[None]:
    """While the block runs, decode attention reads the first `length` cache positions (an int32
    device scalar the caller updates before each step) and ignores the mask."""
    return _holding(_LENGTH, length)


@torch.compiler.disable
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
    """query [b, heads, 1, d]; key and value [b, kv_heads, length, d]; a mask broadcastable to
    [b, 1, 1, length] (boolean, True to attend, or additive). Returns [b, 1, heads, d]."""
    batch, heads, q_len, dim = query.shape
    table = _PREFIX[0]
    layer = int(getattr(module, "layer_idx", -1))
    prefix = table[layer] if table is not None else None
    units = _UNITS[0]
    unit_kv = units[0][layer] if units is not None else None
    new = kv_writes.take(layer)  # this step's keys and values, where the writer deferred them
    mask_ok = attention_mask is None or attention_mask.shape[1] == 1
    if q_len != 1 or kwargs.get("softcap") is not None or not mask_ok:
        if prefix is not None or unit_kv is not None:
            raise RuntimeError("a shared prefix needs one query token and a plain mask")
        if new is not None:
            new.write()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    pages = page_table()  # key and value are pools of pages (pages.py)
    if pages is not None:
        pages = pages[:batch]
    scale = scaling if scaling is not None else dim**-0.5
    # Query heads that share a KV head become that head's "queries": [b, kv_heads, groups, d].
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    length = _LENGTH[0]
    if length is not None and triton_decode.available(query) and dim & (dim - 1) == 0:
        # a sliding-window layer's window (positions counted from the shared prefix's first);
        # the mask says the same on the SDPA path
        window = kwargs.get("sliding_window")
        order = units[2][:batch] if units is not None and units[2] is not None else None
        prompts = (triton_decode.UnitPrompts(unit_kv[0], unit_kv[1], units[1][:batch], order)
                   if unit_kv is not None and units is not None else None)
        out = triton_decode.decode_attention_triton(packed, key, value, length, scale, prefix,
                                                    window=window, units=prompts, pages=pages,
                                                    new=new)
    else:
        if new is not None:
            new.write()
        if pages is not None:  # each row's pages, in order, as one cache (the mask's width)
            key, value = gather_pages(key, pages), gather_pages(value, pages)
        if unit_kv is not None and units is not None:  # each row's unit prompt joins its keys
            of_row = units[1][:batch].long()
            key, value, attention_mask = _join_prefix(
                (unit_kv[0].index_select(0, of_row), unit_kv[1].index_select(0, of_row)),
                key, value, attention_mask, per_row=True)
        if prefix is not None:  # without the kernel the prefix joins every row's keys
            key, value, attention_mask = _join_prefix(prefix, key, value, attention_mask)
        out = torch.nn.functional.scaled_dot_product_attention(
            packed, key, value, attn_mask=attention_mask, scale=scale)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def _join_prefix(
    prefix: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor, value: torch.Tensor,
    mask: torch.Tensor | None, per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys and values every row attends to first ([kv, P, d], or one [b, kv, P, d] per row),
    put before the rows' own, with the mask widened to match."""
    batch, length = key.shape[0], prefix[0].shape[-2]
    keys, values = prefix if per_row else (p.expand(batch, -1, -1, -1) for p in prefix)
    key = torch.cat([keys, key], dim=2)
    value = torch.cat([values, value], dim=2)
    if mask is not None:
        seen = (torch.ones if mask.dtype == torch.bool else torch.zeros)(
            mask.shape[0], 1, 1, length, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([seen, mask], dim=-1)
    return key, value, mask


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def uses_sdpa(model: Any) -> bool:
    """Whether the model's attention is SDPA: the one decode_attention_for replaces, and the
    one whose boolean masks mean "attend"."""
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


def routes_decode_attention(model: Any) -> bool:
    """Whether decode_attention_for will send this model's decode steps through decode_attention
    with a shared prefix honoured: the model uses SDPA and no attention logit softcapping."""
    text = model.config.get_text_config(decoder=True)
    return uses_sdpa(model) and getattr(text, "attn_logit_softcapping", None) is None


@contextmanager
def decode_attention_for(model: Any) -> Iterator[bool]:
    """Route the model's attention through decode_attention while the block runs, where the
    model uses SDPA (yields whether it does); restores the model's own choice afterwards."""
    config = model.config
    if not uses_sdpa(model):
        yield False
        return
    current = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = current
