"""The generation engine: source runs and batched, steered and patched target generation.

One prompt is shared by every row, so no padding is needed. A batch holds rows from any keys and
patch layers: each *unit* (a key at a layer) is one prefill row carrying its own steering vector,
patch layer and source values; after the prefill its KV cache row is copied to each of its
samples, which then decode with their own seeds. Rows that reach EOS are dropped from the batch.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from patchdb.faults import fault_point
from patchdb.generate.attention import routes_decode_attention
from patchdb.generate.graphed import GraphedDecoder, graph_supported
from patchdb.generate.hooks import Patch, Steering, patching, recording, steering
from patchdb.generate.layers import LayerMap
from patchdb.generate.loading import forward_arguments
from patchdb.generate.sampling import Sampling, as_sampling, choose_tokens
from patchdb.generate.transfer import to_device

# Compact the batch once at least this fraction of its rows has finished.
COMPACT_FRACTION = 0.125


@dataclass
class TargetUnit:
    """One prefill row: steering (scaled vector or None), patch layer and values, sample seeds."""

    steer: torch.Tensor | None
    patch_layer: int | None
    patch_values: torch.Tensor | None  # [prompt_len - injection_start, hidden]
    seeds: list[int]


@dataclass
class Completion:
    """One generated answer: token ids without EOS, and why it stopped ("stop" or "length")."""

    token_ids: list[int]
    finish_reason: str


def parse_row(ids: list[int], eos: set[int]) -> Completion:
    """A row's drawn tokens (-1 after the last) as a completion, EOS left out."""
    out: list[int] = []
    for tok in ids:
        if tok < 0:
            break
        if tok in eos:
            return Completion(out, "stop")
        out.append(tok)
    return Completion(out, "length")


def eos_ids(model: torch.nn.Module, tokenizer: object) -> list[int]:
    """Every token id that ends an answer: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    raw = getattr(config, "eos_token_id", None)
    if isinstance(raw, int):
        ids.add(raw)
    elif raw is not None:
        ids.update(int(x) for x in raw)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    return sorted(ids)


def repeated(cache: DynamicCache, rows: int) -> DynamicCache:
    """A cache of `rows` rows, each the one row of `cache`, which stays as it was: its layers
    copied shallowly, each holding a broadcast view of the row's keys and values. A forward
    then writes the rows once (transformers' dynamic layers replace their keys and values with
    the concatenation, never writing into them), where a deep copy and repeat_interleave wrote
    them twice, in about 1,200 more operations a prefill of 62 layers (a prefill's host time is
    mostly per operation). Other cache layouts take the deep copy."""
    layers = getattr(cache, "layers", None)
    shallow = layers is not None and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
        and isinstance(getattr(layer, "keys", None), torch.Tensor)
        and isinstance(getattr(layer, "values", None), torch.Tensor)
        for layer in layers)
    if not shallow:
        out = copy.deepcopy(cache)
        out.batch_repeat_interleave(rows)
        return out
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        view: Any = copy.copy(layer)
        view.keys = view.keys.expand(rows, -1, -1, -1)
        view.values = view.values.expand(rows, -1, -1, -1)
        out.layers.append(view)
    return out


class Engine:
    """Runs one model on one prompt with steering at `steer_layer`."""

    def __init__(
        self,
        model: PreTrainedModel,
        layer_map: LayerMap,
        prompt_ids: list[int],
        injection_start: int,
        steer_layer: int,
        eos_token_ids: list[int],
        use_graphs: bool = True,
        graph_rows: int = 0,
        fast_attention: bool = True,
        compile_decode: bool = False,
        graph_replay: bool = True,
        share_prefix: bool = False,
        shrink_rows: bool = True,
    ) -> None:
        """`use_graphs`: decode through a CUDA graph on a static cache where it applies (GPUs);
        `graph_rows`: size the graph for at least this many rows, so later batches reuse it;
        `fast_attention`, `compile_decode`, `graph_replay`: how the graphed step is built
        (GraphedDecoder; with graph_replay off the static-cache path also runs on the CPU);
        `share_prefix`: the static decoder keeps the prompt before the injection start once for
        all rows (it needs fast_attention); `shrink_rows`: the static decoder moves the rows still
        decoding into a smaller captured row count as others finish (GraphedDecoder)."""
        if not 0 <= injection_start < len(prompt_ids):
            raise ValueError(f"injection start {injection_start} is outside the prompt")
        self.model = model
        self.layer_map = layer_map
        self.prompt_ids = list(prompt_ids)
        self.injection_start = injection_start
        self.steer_layer = steer_layer
        self.eos_token_ids = list(eos_token_ids)
        param = next(model.parameters())
        self.device = param.device  # where inputs, logits and sampling live (the first card)
        self.dtype = param.dtype
        # A model spread over several cards (device_map="auto") decodes eagerly: one CUDA graph
        # cannot span cards, and cache rows are picked with CPU indexes that any card accepts.
        self.spans_devices = len({p.device for p in model.parameters()}) > 1
        embeddings = model.get_input_embeddings()
        assert isinstance(embeddings.weight, torch.Tensor)
        self.hidden_size = int(embeddings.weight.shape[1])
        self._cache_kw, self._keep_kw = forward_arguments(model)
        self.use_graphs = use_graphs
        self.graph_rows = graph_rows
        self.fast_attention = fast_attention
        self.compile_decode = compile_decode
        self.graph_replay = graph_replay
        self.share_prefix = share_prefix and fast_attention
        self.shrink_rows = shrink_rows
        self._decoder: GraphedDecoder | None = None
        self._prefix_cache: DynamicCache | None = None  # readout_logits' shared prompt prefix
        self._suffix_ids: torch.Tensor | None = None  # the prompt from the injection start on
        self._graph_ok: dict[int, bool] = {}  # graph_supported, by cache length

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def _steer_rows(self, steers: list[torch.Tensor | None]) -> torch.Tensor:
        rows = torch.zeros(len(steers), self.hidden_size, device=self.device, dtype=self.dtype)
        for i, vec in enumerate(steers):
            if vec is not None:
                rows[i] = vec.to(device=self.device, dtype=self.dtype)
        return rows

    def _forward(
        self, input_ids: torch.Tensor, cache: DynamicCache | None, last_only: bool
    ) -> torch.Tensor:
        kwargs: dict[str, object] = ({self._cache_kw: cache, "use_cache": True}
                                     if cache is not None else {"use_cache": False})
        if last_only and self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        out = self.model(input_ids=input_ids, **kwargs)
        return out.logits[:, -1].to(self.device).float()

    @torch.inference_mode()
    def source_run(self, steer: torch.Tensor | None, layers: list[int]) -> dict[int, torch.Tensor]:
        """One forward of one row over the prompt; each layer's MLP output at positions
        injection_start.. as [positions, hidden]."""
        ids = torch.tensor([self.prompt_ids], device=self.device)
        steer_state = Steering(self._steer_rows([steer]), self.injection_start)
        with steering(self.layer_map, self.steer_layer, steer_state), recording(
            self.layer_map, layers, self.injection_start
        ) as records:
            self._forward(ids, DynamicCache(config=self.model.config), last_only=True)
        return {layer: records[layer][0] for layer in layers}

    @torch.inference_mode()
    def prefill_logits(self, units: list[TargetUnit]) -> torch.Tensor:
        """Last-position logits of the prefill alone, no KV cache kept (the first-token
        readout, `generate --readout-only`): [units, vocab] in float32."""
        steer_state = Steering(self._steer_rows([u.steer for u in units]), self.injection_start)
        with steering(self.layer_map, self.steer_layer, steer_state):
            logits, _ = self._prefill(units, keep_cache=False)
        return logits

    @torch.inference_mode()
    def forced_logits(self, unit: TargetUnit, tokens: list[int]) -> torch.Tensor:
        """Logits at every position of the prompt followed by `tokens`, in one forward with no
        cache: steered from the injection start on (generated tokens too) and patched over the
        prompt as the unit's own run would be. `patchdb verify` reads margins off it."""
        ids = torch.tensor([self.prompt_ids + list(tokens)], device=self.device)
        n_patch = self.prompt_len - self.injection_start
        values = torch.zeros(1, n_patch, self.hidden_size, device=self.device, dtype=self.dtype)
        if unit.patch_layer is not None and unit.patch_values is not None:
            values[0] = unit.patch_values.to(device=self.device, dtype=self.dtype)
        layer = unit.patch_layer if unit.patch_layer is not None else -1
        patch = Patch(torch.tensor([layer], device=self.device), values, self.injection_start,
                      [layer])
        steer_state = Steering(self._steer_rows([unit.steer]), self.injection_start)
        with steering(self.layer_map, self.steer_layer, steer_state), patching(self.layer_map, patch):
            out = self.model(input_ids=ids, use_cache=False)
        return out.logits[0].to(self.device).float()

    @torch.inference_mode()
    def readout_logits(self, units: list[TargetUnit]) -> torch.Tensor:
        """What prefill_logits gives (to float rounding), for the readout pass: the prompt
        before the injection start, which no steering or patch reaches, is run once and its KV
        cache shared, so each row computes only the positions from the injection start on."""
        if self.injection_start == 0 or self.spans_devices:
            return self.prefill_logits(units)
        return self.prefill_from_prefix(units)[0]

    @torch.inference_mode()
    def prefill_from_prefix(self, units: list[TargetUnit]) -> tuple[torch.Tensor, DynamicCache]:
        """The prefill of `units` (last-position logits [units, vocab] in float32, and the KV
        cache over the whole prompt) with the prompt before the injection start run once for
        all units and copied: each row computes only the positions from the injection start
        on. The same as the full prefill, to float rounding."""
        if self.injection_start == 0 or self.spans_devices:
            steer_state = Steering(self._steer_rows([u.steer for u in units]), self.injection_start)
            with steering(self.layer_map, self.steer_layer, steer_state):
                logits, full = self._prefill(units)
            assert full is not None
            return logits, full
        if self._prefix_cache is None:
            ids = torch.tensor([self.prompt_ids[: self.injection_start]], device=self.device)
            self._prefix_cache = DynamicCache(config=self.model.config)
            self._forward(ids, self._prefix_cache, last_only=True)
        if self._suffix_ids is None:
            self._suffix_ids = torch.tensor([self.prompt_ids[self.injection_start:]],
                                            device=self.device)
        ids = self._suffix_ids
        cache = repeated(self._prefix_cache, len(units))
        steer_state = Steering(self._steer_rows([u.steer for u in units]), self.injection_start)
        steer_state.offset = self.injection_start
        layers, values, wanted = self._patch_rows(units)
        with steering(self.layer_map, self.steer_layer, steer_state), patching(
            self.layer_map, Patch(layers, values, 0, wanted)  # positions counted from the suffix
        ):
            return self._forward(ids.expand(len(units), -1), cache, last_only=True), cache

    def _patch_rows(self, units: list[TargetUnit]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Each row's patch layer (-1: none) and source values over injection_start..end, and
        the row's layers as a list. Nothing here waits for the GPU (the refill loop prefills
        while a decode step runs)."""
        n_patch = self.prompt_len - self.injection_start
        wanted = [u.patch_layer if u.patch_layer is not None else -1 for u in units]
        layers = to_device(wanted, self.device)
        values = torch.zeros(len(units), n_patch, self.hidden_size, device=self.device,
                             dtype=self.dtype)
        for i, u in enumerate(units):
            if u.patch_layer is not None:
                if u.patch_values is None or u.patch_values.shape[0] != n_patch:
                    raise ValueError(f"unit {i} needs patch values over {n_patch} positions")
                values[i] = u.patch_values.to(device=self.device, dtype=self.dtype)
        return layers, values, wanted

    def _prefill(
        self, units: list[TargetUnit], keep_cache: bool = True
    ) -> tuple[torch.Tensor, DynamicCache | None]:
        """One row per unit over the prompt, patched; the caller holds the steering hook."""
        ids = torch.tensor([self.prompt_ids], device=self.device).expand(len(units), -1)
        layers, values, wanted = self._patch_rows(units)
        cache = DynamicCache(config=self.model.config) if keep_cache else None
        with patching(self.layer_map, Patch(layers, values, self.injection_start, wanted)):
            logits = self._forward(ids, cache, last_only=True)
        return logits, cache

    @torch.inference_mode()
    def generate(
        self, units: list[TargetUnit], max_new_tokens: int, sampling: Sampling | float,
        on_prefill: Callable[[torch.Tensor], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[list[Completion]]:
        """Generate every sample of every unit; returns completions per unit, in seed order.
        A bare float for `sampling` is a temperature over the full softmax. `on_prefill` gets
        the prefill's last-position logits, one row per unit (the first-token readout);
        `on_step`, after each decode step, how many rows drew a token in it (progress)."""
        how = as_sampling(sampling)
        counts = [len(u.seeds) for u in units]
        if not units or sum(counts) == 0:
            return [[] for _ in units]
        steer_state = Steering(self._steer_rows([u.steer for u in units]), self.injection_start)
        # Broadcast each unit's prefill row to its samples.
        expand = torch.repeat_interleave(
            torch.arange(len(units), device=self.device),
            torch.tensor(counts, device=self.device),
        )
        seeds = torch.tensor([s for u in units for s in u.seeds], device=self.device)
        decoder = self._graphed_decoder(len(seeds), self.prompt_len + max_new_tokens)
        with steering(self.layer_map, self.steer_layer, steer_state):
            logits, cache = self._prefill(units)
            assert cache is not None
            if on_prefill is not None:
                on_prefill(logits)
            if decoder is None:
                cache.batch_select_indices(self._cache_index(expand))
                steer_state.vectors = steer_state.vectors[expand]
                tokens = self._decode(logits[expand], cache, steer_state, seeds, max_new_tokens,
                                      how, on_step)
        if decoder is not None:
            decoder.load(cache, expand, steer_state.vectors[expand], self.prompt_len)
            del cache
            tokens = self._decode_graphed(decoder, logits[expand], seeds, max_new_tokens, how,
                                          on_step)
        return self._completions(tokens.cpu(), counts)

    def _cache_index(self, index: torch.Tensor) -> torch.Tensor:
        return index.cpu() if self.spans_devices else index

    def _static_decode(self, max_len: int) -> bool:
        """Whether sequences of max_len decode through the static-cache decoder (CUDA graphs),
        not eagerly (CPU, long sliding windows, a model over several cards, use_graphs off)."""
        if not self.use_graphs or self.spans_devices:
            return False
        if max_len not in self._graph_ok:
            self._graph_ok[max_len] = graph_supported(self.model, self.device, max_len,
                                                      require_cuda=self.graph_replay)
        return self._graph_ok[max_len]

    def decodes_static(self, max_len: int) -> bool:
        """Whether sequences of max_len decode through the static-cache decoder here."""
        return self._static_decode(max_len)

    def shared_prefix_len(self, max_len: int) -> int:
        """Prompt positions kept once for all rows when sequences of max_len decode: the
        injection start where share_prefix applies (static decode through patchdb's attention),
        else 0. Batch sizing counts only the rest of the prompt per row."""
        if (self.share_prefix and self._static_decode(max_len)
                and routes_decode_attention(self.model)):
            return self.injection_start
        return 0

    def _graphed_decoder(self, rows: int, max_len: int, unit_slots: int = 0,
                         pages: int = 0) -> GraphedDecoder | None:
        """The CUDA-graph decoder for this many rows (reused while it is big enough, with the
        same unit slots), or None where graphs do not apply (see _static_decode). With
        `unit_slots` (continuous batching, patchdb's decode attention only) each unit's prompt
        is kept once in one of that many slots instead of in every row; `pages` (with unit
        slots): the rows' own KV in a pool of that many pages, handed out by need."""
        if not self._static_decode(max_len):
            return None
        if not self.fast_attention:
            unit_slots = 0
        if not unit_slots:
            pages = 0
        current = self._decoder
        if (current is not None and current.max_len == max_len and rows <= current.rows
                and current.unit_slots == unit_slots
                and (current.pool.pages if current.pool is not None else 0) == pages):
            return current
        self._decoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._decoder = GraphedDecoder(self.model, self.layer_map, self.steer_layer,
                                       self.injection_start, max(rows, self.graph_rows),
                                       max_len, self._cache_kw, self.fast_attention,
                                       self.compile_decode, self.graph_replay,
                                       self.shared_prefix_len(max_len), self.shrink_rows,
                                       unit_slots,
                                       self.prompt_len - self.shared_prefix_len(max_len),
                                       pages)
        return self._decoder

    def _decode_graphed(self, decoder: GraphedDecoder, logits: torch.Tensor, seeds: torch.Tensor,
                        max_new_tokens: int, sampling: Sampling,
                        on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """The decode loop on a static cache: the loop ends when every row has reached EOS, and
        once the rows still decoding fit a smaller captured row count they move there."""
        n_rows = len(seeds)
        tokens = torch.full((n_rows, max_new_tokens), -1, dtype=torch.int64, device=self.device)
        eos = torch.tensor(self.eos_token_ids or [-1], device=self.device)
        active = torch.arange(n_rows, device=self.device)  # original row of each current row
        done = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        live = n_rows  # rows not done at the start of the step
        for step in range(max_new_tokens):
            next_tokens = choose_tokens(logits, seeds, step, sampling)
            tokens[active, step] = torch.where(done, -1, next_tokens)
            if on_step is not None:
                on_step(live)
            done = done | torch.isin(next_tokens, eos)
            if step == max_new_tokens - 1:
                break
            live = len(done) - int(done.sum())
            if live == 0:
                break
            if decoder.shrinks_to(live):
                keep = (~done).nonzero().squeeze(1)
                decoder.keep_rows(keep)
                active, seeds, next_tokens = active[keep], seeds[keep], next_tokens[keep]
                done = done[keep]
            if step:
                decoder.advance()
            logits = decoder.step(next_tokens)
        return tokens

    def _decode(
        self,
        logits: torch.Tensor,
        cache: DynamicCache,
        steer_state: Steering,
        seeds: torch.Tensor,
        max_new_tokens: int,
        sampling: Sampling,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """The decode loop: [rows, max_new_tokens] token ids, -1 after a row's EOS."""
        n_rows = len(seeds)
        tokens = torch.full((n_rows, max_new_tokens), -1, dtype=torch.int64, device=self.device)
        eos = torch.tensor(self.eos_token_ids or [-1], device=self.device)
        active = torch.arange(n_rows, device=self.device)  # original row of each current row
        done = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        live = n_rows  # rows not done at the start of the step
        for step in range(max_new_tokens):
            fault_point("generate.decode_step")
            next_tokens = choose_tokens(logits, seeds, step, sampling)
            tokens[active, step] = torch.where(done, -1, next_tokens)
            if on_step is not None:
                on_step(live)
            done = done | torch.isin(next_tokens, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            n_done = int(done.sum())
            live = len(done) - n_done
            if n_done and n_done >= COMPACT_FRACTION * len(done):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(self._cache_index(keep))
                active, seeds, next_tokens = active[keep], seeds[keep], next_tokens[keep]
                steer_state.vectors = steer_state.vectors[keep]
                done = done[keep]
            steer_state.offset = self.prompt_len + step
            logits = self._forward(next_tokens[:, None], cache, last_only=False)
        return tokens

    def _completions(self, tokens: torch.Tensor, counts: list[int]) -> list[list[Completion]]:
        eos = set(self.eos_token_ids)
        rows = [parse_row(row, eos) for row in tokens.tolist()]
        out: list[list[Completion]] = []
        start = 0
        for c in counts:
            out.append(rows[start : start + c])
            start += c
        return out
