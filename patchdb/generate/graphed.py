"""A CUDA-graphed decode step over a static KV cache: the engine's fast path on GPUs.

Eager decoding with Hugging Face models is bound by Python and kernel-launch overhead (about
125 ms a step for a 62-layer model, whatever the batch), not by memory. Here the KV cache is
allocated once for `rows` rows and prompt + new tokens, the decode step (one token per row, with
the steering hook active) is captured once in a CUDA graph, and each step is a replay.

Nothing inside the graph depends on Python state that changes between steps: token ids,
positions and the attention mask live in static tensors updated in place before each replay,
the steering vectors are a static buffer, and the cache's own length counter is a tensor. Patching
never runs here: it touches the prefill only.

Rows that finish stop costing work: once the rows still decoding fit a smaller row count (half,
a quarter, an eighth), they are copied to the front of the buffers and the step replays a graph
captured at that count. A row's tokens do not depend on the rows beside it, so this changes no
answer.
"""

import copy
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from patchdb.generate.attention import (
    Prefixes,
    cache_length,
    decode_attention,
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
        layer.forward = torch.compile(layer.forward, dynamic=None)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        torch._dynamo.config.cache_size_limit = limit




def row_buckets(rows: int) -> list[int]:
    """The row counts a decoder shrinks to as its rows finish, largest first: all of them,
    then halves down to an eighth (each its own graph, captured the first time it is needed)."""
    return sorted({-(-rows // d) for d in (1, 2, 4, 8)}, reverse=True)


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
    of one kind runs the same compiled program."""
    config = model.config
    current = config._attn_implementation
    previous = _UPDATE[0]
    _UPDATE[0] = cache.update
    cache.update = _pass_through
    config._attn_implementation = DEFERRED
    try:
        yield
    finally:
        config._attn_implementation = current
        del cache.update  # the class's own method again
        _UPDATE[0] = previous


class _Rows:
    """The decoder's buffers cut to their first `rows` rows (views of the full-size ones), and
    the CUDA graph of a step at that row count, captured on first use."""

    def __init__(self, rows: int, cache: Any, tokens: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, steer: Steering) -> None:
        self.rows = rows
        self.cache = cache
        self.tokens = tokens[:rows]
        self.positions = positions[:rows]
        self.mask = mask[:rows]
        self.steer = Steering(steer.vectors[:rows], steer.start)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class GraphedDecoder:
    """Decode steps for a fixed number of rows, replayed from captured CUDA graphs."""

    def __init__(self, model: Any, layer_map: LayerMap, steer_layer: int,
                 injection_start: int, rows: int, max_len: int, cache_kw: str,
                 fast_attention: bool = True, compile_layers: bool = False,
                 replay: bool = True, prefix_len: int = 0, shrink: bool = True) -> None:
        """`fast_attention`: capture with patchdb's decode attention (attention.py);
        `compile_layers`: capture torch.compile'd decoder layers (fuses the small kernels);
        `replay` off: run each step eagerly, same cache and attention, no graph (works on the
        CPU, so tests can check the static path against the engine's eager decode);
        `prefix_len` > 0 (needs fast_attention): the first prefix_len prompt positions, the same
        in every row, are kept once and shared; the rows' cache holds only what follows;
        `shrink`: move the rows still decoding into a smaller row count (row_buckets) as
        others finish."""
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
        self.sizes = row_buckets(rows) if shrink else [rows]
        self._by_rows: dict[int, _Rows] = {}
        self.current = self._rows(rows)
        self.captures = 0  # graphs captured so far (one per row count used)
        self.prompt_len = 0

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The graph of a step at the full row count (None before the first step)."""
        return self._by_rows[self.rows].graph

    @property
    def logits(self) -> torch.Tensor | None:
        return self._by_rows[self.rows].logits

    @property
    def prompt_slots(self) -> int:
        """Cache slots each row's prompt fills: the prompt less the shared prefix."""
        return self.prompt_len - self.prefix_len

    def _rows(self, rows: int) -> _Rows:
        """The buffers for the first `rows` rows; a cut cache shares the full one's storage and
        length counters (its layers are copies whose tensors are views)."""
        if rows not in self._by_rows:
            cache = self.cache
            if rows != self.rows:
                cache = copy.copy(self.cache)
                layers: list[Any] = []
                full_layers: list[Any] = list(self.cache.layers)  # transformers' layers, untyped
                for full in full_layers:
                    layer = copy.copy(full)
                    if full.is_initialized:
                        layer.keys, layer.values = full.keys[:rows], full.values[:rows]
                        layer.batch_size = rows
                    layers.append(layer)
                cache.layers = layers
            self._by_rows[rows] = _Rows(rows, cache, self.tokens, self.positions, self.mask,
                                        self.steer)
        return self._by_rows[rows]

    def _forward(self, rows: _Rows) -> Any:
        return self.model(input_ids=rows.tokens, position_ids=rows.positions,
                          attention_mask=rows.mask, use_cache=True, **{self.cache_kw: rows.cache})

    def _set_length(self, length: int) -> None:
        for rows in self._by_rows.values():
            layers: list[Any] = list(rows.cache.layers)  # transformers' cache layers, untyped
            for layer in layers:
                layer.cumulative_length.fill_(length)
                if hasattr(layer, "cumulative_length_int"):
                    layer.cumulative_length_int = length

    def _smallest_fitting(self, n: int) -> int:
        return min(size for size in self.sizes if size >= n)

    def load(self, prefill: DynamicCache, expand: torch.Tensor, vectors: torch.Tensor,
             prompt_len: int) -> None:
        """Copy each unit's prefill KV to its sample rows (row r takes unit expand[r]) and set
        the rows' steering vectors; the step then runs at the fewest rows that hold them."""
        n = expand.shape[0]
        if n > self.rows:
            raise ValueError(f"{n} rows do not fit a decoder of {self.rows}")
        self.prompt_len = prompt_len
        shared, own = self.prefix_len, self.prompt_slots
        pairs: list[tuple[Any, Any]] = list(zip(self.cache.layers, prefill.layers, strict=True))
        for index, (static_layer, dyn_layer) in enumerate(pairs):
            keys = dyn_layer.keys[:, :, shared:prompt_len].index_select(0, expand)
            values = dyn_layer.values[:, :, shared:prompt_len].index_select(0, expand)
            if not static_layer.is_initialized:  # sized from these, for all rows
                static_layer.lazy_initialization(keys[:1].expand(self.rows, -1, -1, -1),
                                                 values[:1].expand(self.rows, -1, -1, -1))
            static_layer.keys[:n, :, :own].copy_(keys)
            static_layer.values[:n, :, :own].copy_(values)
            if shared and index not in self.prefixes:
                # Every unit of every batch has this prefix (one prompt, nothing steered or
                # patched before the injection start): keep the first unit's, once.
                self.prefixes[index] = (dyn_layer.keys[0, :, :shared].clone(),
                                        dyn_layer.values[0, :, :shared].clone())
        self.current = self._rows(self._smallest_fitting(n))
        self._set_length(own)
        self.steer.vectors[:n].copy_(vectors)
        self.mask.zero_()
        self.mask[..., :own] = True

    def shrinks_to(self, live: int) -> bool:
        """Whether `live` rows fit a smaller row count than the step runs at now."""
        return self._smallest_fitting(live) < self.current.rows

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (indexes of the current rows, ascending), moved to the front,
        and run the next steps at the fewest rows that hold them."""
        n = keep.shape[0]
        layers: list[Any] = list(self.cache.layers)
        for layer in layers:
            layer.keys[:n] = layer.keys.index_select(0, keep)
            layer.values[:n] = layer.values.index_select(0, keep)
        self.steer.vectors[:n] = self.steer.vectors.index_select(0, keep)
        self.current = self._rows(self._smallest_fitting(n))

    @contextmanager
    def _step_context(self, rows: _Rows) -> Iterator[None]:
        """Steering, and the decode attention and compiled layers where asked for."""
        rows.steer.offset = self.prompt_len
        with ExitStack() as stack:
            stack.enter_context(steering(self.layer_map, self.steer_layer, rows.steer))
            if self.fast_attention:
                routed = stack.enter_context(decode_attention_for(self.model))
                stack.enter_context(cache_length(self.length))
                if routed and self.compile_layers:
                    stack.enter_context(update_in_attention(self.model, rows.cache))
            if self.prefix_len:
                stack.enter_context(shared_prefix(self.prefixes))
            if self.compile_layers:
                stack.enter_context(compiled_layers(self.layer_map))
            yield

    def _capture(self, rows: _Rows, slot: int) -> None:
        """Capture a step at this row count. The warm-up runs compute the real step (same
        inputs), so the KV they write at `slot` is the one the replay writes there again."""
        with self._step_context(rows):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._set_length(slot)
                    self._forward(rows)
            torch.cuda.current_stream().wait_stream(side)
            self._set_length(slot)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward(rows)
        rows.logits = out.logits
        rows.graph = graph
        self.captures += 1
        self._set_length(slot)

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed one token per row (decode step `step`, 0-based); returns float logits [n, vocab]."""
        n = tokens.shape[0]
        rows = self.current
        position = self.prompt_len + step
        rows.tokens[:n, 0].copy_(tokens)
        slot = position - self.prefix_len  # where the step's KV goes in the rows' own cache
        self.positions.fill_(position)
        self.mask[..., slot] = True
        self.length.fill_(slot + 1)
        if not self.replay:
            self._set_length(slot)
            with self._step_context(rows):
                return self._forward(rows).logits[:n, -1].float()
        if rows.graph is None:
            self._capture(rows, slot)
        assert rows.graph is not None and rows.logits is not None
        rows.graph.replay()
        return rows.logits[:n, -1].float()
