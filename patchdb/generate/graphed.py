"""A CUDA-graphed decode step over a static KV cache: the engine's fast path on GPUs.

Eager decoding with Hugging Face models is bound by Python and kernel-launch overhead (about
125 ms a step for a 62-layer model, whatever the batch), not by memory. Here the KV cache is
allocated once for `rows` rows and prompt + new tokens, the decode step (one token per row, with
the steering hook active) is captured once in a CUDA graph, and each step is a replay.

Nothing inside the graph depends on Python state that changes between steps: token ids,
positions and the attention mask live in static tensors updated in place before each replay,
the steering vectors are a static buffer, and the cache's own length counter is a tensor. Patching
never runs here: it touches the prefill only.
"""

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from patchdb.generate.attention import (
    Prefixes,
    cache_length,
    decode_attention_for,
    shared_prefix,
    uses_sdpa,
)
from patchdb.generate.hooks import Steering, steering
from patchdb.generate.layers import LayerMap

log = logging.getLogger(__name__)


def graph_supported(model: Any, device: torch.device, max_len: int, require_cuda: bool = True) -> bool:
    """CUDA only (unless `require_cuda` is off, for the eager static decoder), SDPA attention
    (the decoder's boolean mask means "attend" there; eager attention would add it to the
    scores), a cache API with tensor length counters, and no sliding window shorter than the
    sequence (a full sliding layer rolls its cache, which a graph cannot follow)."""
    if require_cuda and device.type != "cuda":
        return False
    if not uses_sdpa(model):
        return False
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    if window is not None and window < max_len:
        return False
    try:
        probe = StaticCache(config=model.config, max_cache_len=max_len)
    except (KeyError, TypeError, ValueError, NotImplementedError) as exc:
        # transformers has no static cache for this layout (e.g. a layer type it does not map)
        log.warning("patchdb: no static KV cache for this model (%s: %s); decoding without "
                    "CUDA graphs, several times slower", type(exc).__name__, exc)
        return False
    layers: list[Any] = list(probe.layers)
    return all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in layers)


@contextmanager
def compiled_layers(layer_map: LayerMap) -> Iterator[None]:
    """Run each decoder layer's forward through torch.compile while the block runs (hooks on
    the layer stay outside the compiled code). Identical layers share one compiled program."""
    import torch._dynamo

    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 4 * len(layer_map.layers))
    layers: list[Any] = list(layer_map.layers)
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        torch._dynamo.config.cache_size_limit = limit


class GraphedDecoder:
    """Decode steps for a fixed number of rows, replayed from one captured CUDA graph."""

    def __init__(self, model: Any, layer_map: LayerMap, steer_layer: int,
                 injection_start: int, rows: int, max_len: int, cache_kw: str,
                 fast_attention: bool = True, compile_layers: bool = False,
                 replay: bool = True, prefix_len: int = 0) -> None:
        """`fast_attention`: capture with patchdb's decode attention (attention.py);
        `compile_layers`: capture torch.compile'd decoder layers (fuses the small kernels);
        `replay` off: run each step eagerly, same cache and attention, no graph (works on the
        CPU, so tests can check the static path against the engine's eager decode);
        `prefix_len` > 0 (needs fast_attention): the first prefix_len prompt positions, the same
        in every row, are kept once and shared; the rows' cache holds only what follows."""
        if prefix_len and not fast_attention:
            raise ValueError("a shared prefix needs patchdb's decode attention")
        self.replay = replay
        self.prefix_len = prefix_len
        self.prefixes: Prefixes = {}
        self.model = model
        self.fast_attention = fast_attention
        self.compile_layers = compile_layers
        self.layer_map = layer_map
        self.steer_layer = steer_layer
        self.rows = rows
        self.max_len = max_len
        self.cache_kw = cache_kw
        param = next(model.parameters())
        self.device = param.device
        hidden = int(model.get_input_embeddings().weight.shape[1])
        self.steer = Steering(torch.zeros(rows, hidden, device=self.device, dtype=param.dtype),
                              injection_start)
        own = max_len - prefix_len  # cache slots a row needs for itself
        self.cache = StaticCache(config=model.config, max_cache_len=own)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(rows, 1, 1, own, dtype=torch.bool, device=self.device)
        self.length = torch.zeros((), dtype=torch.int32, device=self.device)  # valid cache length
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.prompt_len = 0

    @property
    def prompt_slots(self) -> int:
        """Cache slots each row's prompt fills: the prompt less the shared prefix."""
        return self.prompt_len - self.prefix_len

    def _forward(self) -> Any:
        return self.model(input_ids=self.tokens, position_ids=self.positions,
                          attention_mask=self.mask, use_cache=True, **{self.cache_kw: self.cache})

    def _set_length(self, length: int) -> None:
        layers: list[Any] = list(self.cache.layers)  # transformers' cache layers, untyped here
        for layer in layers:
            layer.cumulative_length.fill_(length)
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = length

    def load(self, prefill: DynamicCache, expand: torch.Tensor, vectors: torch.Tensor,
             prompt_len: int) -> None:
        """Copy each unit's prefill KV to its sample rows (row r takes unit expand[r]) and set
        the rows' steering vectors. Rows beyond len(expand) repeat the last one and are ignored."""
        n = expand.shape[0]
        if n < self.rows:
            expand = torch.cat([expand, expand[-1:].expand(self.rows - n)])
            vectors = torch.cat([vectors, vectors[-1:].expand(self.rows - n, -1)])
        self.prompt_len = prompt_len
        shared, own = self.prefix_len, self.prompt_slots
        pairs: list[tuple[Any, Any]] = list(zip(self.cache.layers, prefill.layers, strict=True))
        for index, (static_layer, dyn_layer) in enumerate(pairs):
            keys = dyn_layer.keys[:, :, shared:prompt_len].index_select(0, expand)
            values = dyn_layer.values[:, :, shared:prompt_len].index_select(0, expand)
            if not static_layer.is_initialized:
                static_layer.lazy_initialization(keys, values)
            static_layer.keys[:, :, :own].copy_(keys)
            static_layer.values[:, :, :own].copy_(values)
            if shared and index not in self.prefixes:
                # Every unit of every batch has this prefix (one prompt, nothing steered or
                # patched before the injection start): keep the first unit's, once.
                self.prefixes[index] = (dyn_layer.keys[0, :, :shared].clone(),
                                        dyn_layer.values[0, :, :shared].clone())
        self._set_length(own)
        self.steer.vectors.copy_(vectors)
        self.mask.zero_()
        self.mask[..., :own] = True

    @contextmanager
    def _step_context(self) -> Iterator[None]:
        """Steering, and the decode attention and compiled layers where asked for."""
        self.steer.offset = self.prompt_len
        with ExitStack() as stack:
            stack.enter_context(steering(self.layer_map, self.steer_layer, self.steer))
            if self.fast_attention:
                stack.enter_context(decode_attention_for(self.model))
                stack.enter_context(cache_length(self.length))
            if self.prefix_len:
                stack.enter_context(shared_prefix(self.prefixes))
            if self.compile_layers:
                stack.enter_context(compiled_layers(self.layer_map))
            yield

    def _capture(self) -> None:
        with self._step_context():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._set_length(self.prompt_slots)
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self._set_length(self.prompt_slots)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward()
        self.logits = out.logits
        self.graph = graph
        self._set_length(self.prompt_slots)

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed one token per row (decode step `step`, 0-based); returns float logits [n, vocab]."""
        n = tokens.shape[0]
        position = self.prompt_len + step
        self.tokens[:n, 0].copy_(tokens)
        slot = position - self.prefix_len  # where the step's KV goes in the rows' own cache
        self.positions.fill_(position)
        self.mask[..., slot] = True
        self.length.fill_(slot + 1)
        if not self.replay:
            with self._step_context():
                return self._forward().logits[:n, -1].float()
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits[:n, -1].float()
