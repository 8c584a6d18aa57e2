"""torch.compile for the graphed decode step: compiled decoder layers, and the cache update
moved out of compiled code so that one compiled program serves every layer of a kind."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from patchdb.generate.attention import decode_attention
from patchdb.generate.layers import LayerMap


@contextmanager
def compiled_layers(layer_map: LayerMap) -> Iterator[None]:
    """Run each decoder layer's forward through torch.compile while the block runs (hooks on
    the layer stay outside the compiled code). Identical layers share one compiled program."""
    import torch._dynamo

    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 4 * len(layer_map.layers))
    layers: list[Any] = list(layer_map.layers)
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=None)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        torch._dynamo.config.cache_size_limit = limit


def _pass_through(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return key_states, value_states


_UPDATE: list[Any] = [None]  # the real cache update while update_in_attention runs


@torch.compiler.disable
def _update_then_attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A layer's cache update, run here outside compiled code, then patchdb's decode attention."""
    keys, values = _UPDATE[0](key, value, int(getattr(module, "layer_idx", 0)))
    return decode_attention(module, query, keys, values, attention_mask, **kwargs)


DEFERRED = "patchdb_decode_update_in_attention"
AttentionInterface.register(DEFERRED, _update_then_attend)
AttentionMaskInterface.register(DEFERRED, sdpa_mask)


@contextmanager
def update_in_attention(model: Any, cache: Any) -> Iterator[None]:
    """While the block runs, a layer's call to `cache.update` hands back its inputs and the
    attention updates the cache instead (use inside decode_attention_for). The update is the one
    step that reads the layer's index, so a compiled layer that ran it was specialised to one
    layer: a recompile per decoder layer (40-60 s for a 62-layer model). Without it every layer
    of one kind runs the same compiled program. The cache's own `update` (an instance attribute
    where the decoder set one) is restored afterwards."""
    config = model.config
    current = config._attn_implementation
    previous = _UPDATE[0]
    own = vars(cache).get("update")
    _UPDATE[0] = cache.update
    cache.update = _pass_through
    config._attn_implementation = DEFERRED
    try:
        yield
    finally:
        config._attn_implementation = current
        if own is None:
            del cache.update  # the class's own method again
        else:
            cache.update = own
        _UPDATE[0] = previous
