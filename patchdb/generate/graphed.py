"""A CUDA-graphed decode step over a static KV cache: the engine's fast path on GPUs.

Eager decoding with Hugging Face models is bound by Python and kernel-launch overhead (about
125 ms a step for a 62-layer model, whatever the batch), not by memory. Here the KV cache is
allocated once for `rows` rows and prompt + new tokens, the decode step (one token per row, with
the steering hook active) is captured once in a CUDA graph, and each step is a replay.

Nothing inside the graph depends on Python state that changes between steps: token ids,
positions, each row's cache slot and length and the attention mask live in static tensors
updated in place before each replay, and the steering vectors are a static buffer. Patching
never runs here: it touches the prefill only.

Every row keeps its own count of tokens drawn, so rows need not be at the same step: a row
that finishes can take a new sample (`admit`, continuous batching: refill.py) while the others
go on. Row r's new key and value go to its own slot (its prompt's slots, then one per token
drawn), and attention reads each row's own length. Rows that finish with nothing left to take
stop costing work: once the rows still decoding fit a smaller row count (half, a quarter, an
eighth), they are copied to the front of the buffers and the step replays a graph captured at
that count. A row's tokens do not depend on the rows beside it, so none of this changes an
answer.
"""

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from patchdb.generate import kv_writes
from patchdb.generate.attention import (
    Prefixes,
    cache_length,
    decode_attention_for,
    shared_prefix,
    unit_prompts,
    uses_sdpa,
)
from patchdb.generate.compiled import compiled_layers, update_in_attention
from patchdb.generate.hooks import Steering, steering
from patchdb.generate.kv_writes import NewKV
from patchdb.generate.layers import LayerMap
from patchdb.generate.pages import PAGE, PagedWrites, PagePool, paged_cache, pages_for
from patchdb.generate.transfer import to_device

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


def row_buckets(rows: int) -> list[int]:
    """The row counts a decoder shrinks to as its rows finish, largest first: all of them,
    then halves down to an eighth (each its own graph, captured the first time it is needed)."""
    return sorted({-(-rows // d) for d in (1, 2, 4, 8)}, reverse=True)


class _RowWrites:
    """`cache.update` for a step whose rows sit at different lengths: row r's new key and value
    (one token) go to its own slot, slots[r], of every layer's static cache."""

    def __init__(self, cache: Any, slots: torch.Tensor) -> None:
        self.cache = cache
        self.slots = slots

    def __call__(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                 *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.cache.layers[layer_idx]

        def write() -> None:
            at = self.slots.view(-1, 1, 1, 1)
            layer.keys.scatter_(2, at.expand(-1, key_states.shape[1], 1, key_states.shape[3]),
                                key_states)
            layer.values.scatter_(2, at.expand(-1, value_states.shape[1], 1,
                                               value_states.shape[3]), value_states)

        if not kv_writes.offer(NewKV(layer_idx, key_states, value_states, write)):
            write()
        return layer.keys, layer.values


class _Rows:
    """The decoder's buffers cut to their first `rows` rows (views of the full-size ones), and
    the CUDA graph of a step at that row count, captured on first use."""

    def __init__(self, rows: int, cache: Any, owner: "GraphedDecoder") -> None:
        self.rows = rows
        self.cache = cache
        self.tokens = owner.tokens[:rows]
        self.positions = owner.positions[:rows]
        self.mask = owner.mask[:rows]
        self.lengths = owner.lengths[:rows]
        self.slots = owner.slots[:rows]
        self.drawn = owner.drawn[:rows]
        self.unit_of_row = owner.unit_of_row[:rows]
        self.order = owner.row_order[:rows]
        self.steer = Steering(owner.steer.vectors[:rows], owner.steer.start)
        self.table: torch.Tensor | None = None
        if owner.pool is not None:
            self.table = owner.pool.table[:rows]
            self.page = owner.page_ix[:rows]
            self.offset = owner.page_offset[:rows]
            cache.update = PagedWrites(owner.kv_pools, self.page, self.offset)
        else:
            cache.update = _RowWrites(cache, self.slots)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class GraphedDecoder:
    """Decode steps for a fixed number of rows, replayed from captured CUDA graphs."""

    def __init__(self, model: Any, layer_map: LayerMap, steer_layer: int,
                 injection_start: int, rows: int, max_len: int, cache_kw: str,
                 fast_attention: bool = True, compile_layers: bool = False,
                 replay: bool = True, prefix_len: int = 0, shrink: bool = True,
                 unit_slots: int = 0, unit_prompt_len: int = 0, pages: int = 0) -> None:
        """`fast_attention`: capture with patchdb's decode attention (attention.py);
        `compile_layers`: capture torch.compile'd decoder layers (fuses the small kernels);
        `replay` off: run each step eagerly, same cache and attention, no graph (works on the
        CPU, so tests can check the static path against the engine's eager decode);
        `prefix_len` > 0 (needs fast_attention): the first prefix_len prompt positions, the same
        in every row, are kept once and shared; the rows' cache holds only what follows;
        `shrink`: move the rows still decoding into a smaller row count (row_buckets) as
        others finish; `unit_slots` > 0 (needs fast_attention): the prompt after the shared
        prefix (`unit_prompt_len` positions) is kept once per unit in that many unit slots
        (store_units), not in every row, so rows hold only the tokens they draw; `pages` > 0
        (needs unit slots): the rows' own keys and values live in a pool of that many pages,
        handed out by need (pages.py: the caller gives rows their pages through `pool`)."""
        if (prefix_len or unit_slots) and not fast_attention:
            raise ValueError("a shared prefix or unit prompts need patchdb's decode attention")
        if pages and not unit_slots:
            raise ValueError("KV pages need unit slots (a row's cache holds only its answer)")
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
        self.unit_slots = unit_slots
        self.unit_prompt_len = unit_prompt_len if unit_slots else 0
        self.unit_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> [U, kv, P, d]
        own = max_len - prefix_len - self.unit_prompt_len  # cache slots a row needs for itself
        self.pool: PagePool | None = None
        self.kv_pools: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> pages
        if pages:
            own = pages_for(own) * PAGE
            self.pool = PagePool(pages, rows, own // PAGE, self.device)
        # where each row's next key and value go, with pages: pool page and offset
        self.page_ix = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.page_offset = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.cache = StaticCache(config=model.config, max_cache_len=own)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(rows, 1, 1, own, dtype=torch.bool, device=self.device)
        # Per row: tokens drawn so far (the one fed to the next step included), the cache slot
        # that step writes, and the cache length attention reads (always at least 1).
        self.drawn = torch.ones(rows, dtype=torch.long, device=self.device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.lengths = torch.ones(rows, dtype=torch.int32, device=self.device)
        self.unit_of_row = torch.zeros(rows, dtype=torch.int32, device=self.device)
        # The order decode attention takes the rows in (with unit slots): rows of one unit side
        # by side read its prompt once (order_rows); a permutation of the current rows.
        self.row_order = torch.arange(rows, dtype=torch.int32, device=self.device)
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
        """Cache slots each row's prompt fills: the prompt less the shared prefix, or none
        where the unit keeps it."""
        return 0 if self.unit_slots else self.prompt_len - self.prefix_len

    def _rows(self, rows: int) -> _Rows:
        """The buffers for the first `rows` rows; a cut cache shares the full one's storage
        (its layers are copies whose tensors are views)."""
        if rows not in self._by_rows:
            cache = self.cache
            if rows != self.rows:
                cache = copy.copy(self.cache)
                vars(cache).pop("update", None)  # the full cache's row writes: not ours
                layers: list[Any] = []
                full_layers: list[Any] = list(self.cache.layers)  # transformers' layers, untyped
                for full in full_layers:
                    layer = copy.copy(full)
                    if full.is_initialized:
                        layer.keys, layer.values = full.keys[:rows], full.values[:rows]
                        layer.batch_size = rows
                    layers.append(layer)
                cache.layers = layers
            self._by_rows[rows] = _Rows(rows, cache, self)
        return self._by_rows[rows]

    def _forward(self, rows: _Rows) -> Any:
        return self.model(input_ids=rows.tokens, position_ids=rows.positions,
                          attention_mask=rows.mask, use_cache=True, **{self.cache_kw: rows.cache})

    def _smallest_fitting(self, n: int) -> int:
        return min(size for size in self.sizes if size >= n)

    def store_units(self, slots: torch.Tensor,
                    prompt_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    units: torch.Tensor) -> None:
        """Keep unit units[i]'s prompt KV (per layer, over the prompt after the shared prefix)
        in unit slot slots[i] (needs unit_slots)."""
        for index, (keys, values) in enumerate(prompt_kv):
            if keys.shape[2] != self.unit_prompt_len:
                raise ValueError(f"unit prompt over {keys.shape[2]} positions, expected "
                                 f"{self.unit_prompt_len}")
            if index not in self.unit_kv:
                self.unit_kv[index] = (keys.new_zeros(self.unit_slots, *keys.shape[1:]),
                                       values.new_zeros(self.unit_slots, *values.shape[1:]))
            held_keys, held_values = self.unit_kv[index]
            held_keys.index_copy_(0, slots, keys.index_select(0, units))
            held_values.index_copy_(0, slots, values.index_select(0, units))

    def admit(self, rows: torch.Tensor, prompt_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
              units: torch.Tensor, vectors: torch.Tensor, prompt_len: int,
              slots: torch.Tensor | None = None) -> None:
        """Start new samples in rows `rows` (indexes into the full buffers): row rows[i] takes
        unit units[i]'s prompt KV (`prompt_kv`: per layer, keys and values over the prompt
        positions after the shared prefix, one row per unit; with unit slots, the unit's
        prompt is read from slot slots[i] instead, stored there by store_units) and steering
        vector vectors[i], with one token drawn (from the prefill's logits, by the caller) and
        none fed yet."""
        self.prompt_len = prompt_len
        own = self.prompt_slots
        if self.unit_slots:
            if slots is None:
                raise ValueError("a decoder with unit slots needs each row's slot")
            self.unit_of_row.index_copy_(0, rows, slots.to(torch.int32))
        layers: list[Any] = list(self.cache.layers)  # transformers' layers, untyped
        for index, (static_layer, (keys, values)) in enumerate(zip(layers, prompt_kv,
                                                                  strict=True)):
            if keys.shape[2] != prompt_len - self.prefix_len:
                raise ValueError(f"prompt KV over {keys.shape[2]} positions, expected "
                                 f"{prompt_len - self.prefix_len}")
            if self.unit_slots:
                keys, values = keys[:, :, :0], values[:, :, :0]
            if self.pool is not None and index not in self.kv_pools:
                self._paged_layer(static_layer, index, keys, values)
            elif not static_layer.is_initialized:  # sized from these, for all rows
                # (cut caches are made after this: their layers are views of these tensors)
                assert list(self._by_rows) == [self.rows]
                static_layer.lazy_initialization(keys[:1].expand(self.rows, -1, -1, -1),
                                                 values[:1].expand(self.rows, -1, -1, -1))
            if own:
                static_layer.keys[:, :, :own].index_copy_(0, rows, keys.index_select(0, units))
                static_layer.values[:, :, :own].index_copy_(0, rows,
                                                            values.index_select(0, units))
        self.steer.vectors.index_copy_(0, rows, vectors)
        self.mask.index_fill_(0, rows, False)
        self.mask[..., :own].index_fill_(0, rows, True)
        self.drawn.index_fill_(0, rows, 1)

    def _paged_layer(self, layer: Any, index: int, keys: torch.Tensor,
                     values: torch.Tensor) -> None:
        """A paged decoder's layer: its pool of pages, and a static layer whose keys and values
        are views of one zero position (the model's cache object wants them; nothing reads or
        writes them: writes go to the pool)."""
        assert self.pool is not None
        shape = (self.pool.pages + 1, keys.shape[1], PAGE, keys.shape[3])
        self.kv_pools[index] = (keys.new_zeros(shape), values.new_zeros(shape))
        if not layer.is_initialized:
            length = layer.max_cache_len
            layer.max_cache_len = 1
            layer.lazy_initialization(keys[:1, :, :1], values[:1, :, :1])
            layer.max_cache_len = length
            layer.keys = layer.keys.expand(self.rows, -1, length, -1)
            layer.values = layer.values.expand(self.rows, -1, length, -1)
            layer.batch_size = self.rows

    def set_prefix(self, prefill: DynamicCache) -> None:
        """Keep the shared prefix's keys and values once (from any unit's prefill: every unit
        has this prefix, for nothing is steered or patched before the injection start)."""
        shared = self.prefix_len
        if not shared or self.prefixes:
            return
        layers: list[Any] = list(prefill.layers)
        for index, dyn_layer in enumerate(layers):
            self.prefixes[index] = (dyn_layer.keys[0, :, :shared].clone(),
                                    dyn_layer.values[0, :, :shared].clone())

    def prompt_kv(self, prefill: DynamicCache,
                  prompt_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, a prefill's keys and values over the prompt after the shared prefix."""
        layers: list[Any] = list(prefill.layers)
        return [(layer.keys[:, :, self.prefix_len:prompt_len],
                 layer.values[:, :, self.prefix_len:prompt_len]) for layer in layers]

    def load(self, prefill: DynamicCache, expand: torch.Tensor, vectors: torch.Tensor,
             prompt_len: int) -> None:
        """Copy each unit's prefill KV to its sample rows (row r takes unit expand[r]) and set
        the rows' steering vectors; the step then runs at the fewest rows that hold them."""
        n = expand.shape[0]
        if n > self.rows:
            raise ValueError(f"{n} rows do not fit a decoder of {self.rows}")
        if self.unit_slots:
            raise ValueError("fixed batches load each row's prompt; this decoder has unit slots")
        self.set_prefix(prefill)
        rows = torch.arange(n, device=self.device)
        self.admit(rows, self.prompt_kv(prefill, prompt_len), expand, vectors, prompt_len)
        self.current = self._rows(self._smallest_fitting(n))

    def advance(self, live: torch.Tensor | None = None) -> None:
        """Count one more token drawn in every current row, or in the rows where `live` (one
        bool per current row) holds."""
        drawn = self.current.drawn
        if live is None:
            drawn += 1
        else:
            drawn += live

    def unmark_step(self) -> None:
        """Take back what the last step added to the attention mask (the slot each row wrote),
        before a step from an earlier state runs again: the slot's key and value are rewritten
        when the rows reach it again, and nothing reads it before."""
        rows = self.current
        rows.mask.scatter_(3, rows.slots.view(-1, 1, 1, 1), False)

    def shrinks_to(self, live: int) -> bool:
        """Whether `live` rows fit a smaller row count than the step runs at now."""
        return self._smallest_fitting(live) < self.current.rows

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (indexes of the current rows, ascending), moved to the front,
        and run the next steps at the fewest rows that hold them."""
        n = keep.shape[0]
        if self.pool is not None:  # the rows' pages move with them: their table rows do
            self.pool.keep(keep.tolist())
        else:
            layers: list[Any] = list(self.cache.layers)
            for layer in layers:
                layer.keys[:n] = layer.keys.index_select(0, keep)
                layer.values[:n] = layer.values.index_select(0, keep)
        for buffer in (self.steer.vectors, self.mask, self.drawn, self.unit_of_row):
            buffer[:n] = buffer.index_select(0, keep)
        self.current = self._rows(self._smallest_fitting(n))
        size = self.current.rows
        torch.arange(size, dtype=torch.int32, device=self.device, out=self.row_order[:size])

    def restart(self) -> None:
        """Back to the full row count, rows in batch order and every page free (a new stream
        on a decoder an earlier one left, perhaps shrunk, for continuous batching)."""
        self.current = self._rows(self.rows)
        torch.arange(self.rows, dtype=torch.int32, device=self.device, out=self.row_order)
        if self.pool is not None:
            self.pool.release([r for r, held in enumerate(self.pool.held) if held])
            self.pool.sync()

    def order_rows(self, order: Sequence[int]) -> None:
        """Have decode attention take the current rows in this order (a permutation of
        range(current rows)): each program reads the prompt of every unit among its rows once,
        so rows of one unit belong together. Answers do not change; copied without a sync."""
        if sorted(order) != list(range(self.current.rows)):
            raise ValueError("a row order is a permutation of the current rows")
        self.row_order[:len(order)].copy_(to_device(list(order), self.device))

    @contextmanager
    def _step_context(self, rows: _Rows) -> Iterator[None]:
        """Steering, and the decode attention and compiled layers where asked for."""
        rows.steer.offset = self.prompt_len
        with ExitStack() as stack:
            stack.enter_context(steering(self.layer_map, self.steer_layer, rows.steer))
            if self.fast_attention:
                routed = stack.enter_context(decode_attention_for(self.model))
                stack.enter_context(cache_length(rows.lengths))
                if routed:  # decode attention stores each layer's new keys and values
                    stack.enter_context(kv_writes.deferred())
                if routed and self.compile_layers:
                    stack.enter_context(update_in_attention(self.model, rows.cache))
            if self.prefix_len:
                stack.enter_context(shared_prefix(self.prefixes))
            if self.unit_slots:
                stack.enter_context(unit_prompts((self.unit_kv, rows.unit_of_row, rows.order)))
            if rows.table is not None:
                stack.enter_context(paged_cache(rows.table))
            if self.compile_layers:
                stack.enter_context(compiled_layers(self.layer_map))
            yield

    def _capture(self, rows: _Rows) -> None:
        """Capture a step at this row count. The warm-up runs compute the real step (same
        inputs), so the KV they write at each row's slot is the one the replay writes there
        again."""
        with self._step_context(rows):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(rows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward(rows)
        rows.logits = out.logits
        rows.graph = graph
        self.captures += 1

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (each row's last token drawn, at the position its count of
        tokens drawn gives); returns logits [n, vocab] in the model's dtype: with a graph, a view of
        its output, overwritten by the next step."""
        n = tokens.shape[0]
        rows = self.current
        rows.tokens[:n, 0].copy_(tokens)
        torch.add(rows.drawn, self.prompt_len - 1, out=rows.positions[:, 0])
        torch.add(rows.drawn, self.prompt_slots - 1, out=rows.slots)
        rows.slots.clamp_(max=self.mask.shape[-1] - 1)  # a row past its last step writes nothing read
        rows.lengths.copy_(rows.slots + 1)
        if self.pool is not None and rows.table is not None:
            self.pool.sync()  # pages given since the last step
            column = torch.div(rows.slots, PAGE, rounding_mode="floor")
            rows.page.copy_(rows.table.gather(1, column.view(-1, 1)).view(-1))
            torch.remainder(rows.slots, PAGE, out=rows.offset)
        rows.mask.scatter_(3, rows.slots.view(-1, 1, 1, 1), True)
        if not self.replay:
            with self._step_context(rows):
                return self._forward(rows).logits[:n, -1]
        if rows.graph is None:
            self._capture(rows)
        assert rows.graph is not None and rows.logits is not None
        rows.graph.replay()
        return rows.logits[:n, -1]
