"""`patchdb verify`: checks that the generation machinery does what docs/science.md says, on the
user's own model, dtype and device, in a minute or two, before a sweep is paid for.

Every check runs the engine the sweep runs, greedy, on the sweep's prompt, steer layer, first
patch layer and two of its words (the first positive and the first negative):

1. steering reaches every prompt position from the injection start and every generated token,
   and no position before it (read at the steer layer during a real eager decode);
2. rows in a batch do not affect each other: a unit alone equals the same unit in a full batch;
3. patching a unit with its own condition's source activations equals the unpatched baseline;
4. the decode path the sweep uses (CUDA graphs, compiled or not; on the CPU the static-cache
   decoder) gives the eager decode's answers;
5. the first-token readout equals a plain forward's first-token probabilities.

Greedy answers in bf16 can part where two tokens' logits are within rounding of each other;
checks 2 and 4 call such a parting a near tie (and pass) only when the reference's top two
logits at that token differ by less than TIE_FRACTION of the top one.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from patchdb.generate.engine import Engine, TargetUnit, eos_ids
from patchdb.generate.layers import check_layer_range, find_layers
from patchdb.generate.loading import LoadedModel, default_device, forward_arguments, load_model
from patchdb.generate.prompt import render_prompt
from patchdb.generate.readout import FirstTokenReader
from patchdb.generate.vectors import (
    IMPORTED_RECIPE,
    RECIPE,
    baseline_words,
    last_token_outputs,
    stored_vectors,
)
from patchdb.store import Store
from patchdb.store.readouts import ReadoutValues
from patchdb.store.sweeps import get_sweep, sweep_config

TIE_FRACTION = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
READOUT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FULL_BATCH_ROWS = 32


@dataclass
class Check:
    """One check's outcome: "pass", "fail" or "skip", and what was seen."""

    name: str
    outcome: str
    detail: str
    seconds: float = 0.0


@dataclass
class VerifyOptions:
    sweep: str | None = None
    device: str | None = None
    dtype: str | None = None
    model: str | None = None
    tokens: int = 16
    compile: bool = False
    share_prefix: bool = True


@dataclass
class VerifyResult:
    sweep: str
    model_id: str
    device: str
    dtype: str
    words: tuple[str, str]
    patch_layer: int
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.outcome == "fail"]


def _vectors(store: Store, loaded: LoadedModel, layer: int, words: list[str]) -> dict[str, torch.Tensor]:
    """The sweep's concept vectors of these words: stored ones, else computed here (and not
    stored: verify writes nothing)."""
    with store.read() as session:
        found = stored_vectors(session, loaded.model_id, layer, words, (IMPORTED_RECIPE, RECIPE))
    missing = [w for w in words if w not in found]
    if missing:
        mean = torch.stack(list(last_token_outputs(loaded, layer, baseline_words()).values())).mean(0)
        found.update({w: v - mean for w, v in last_token_outputs(loaded, layer, missing).items()})
    return found


def _answer(engine: Engine, units: list[TargetUnit], n: int) -> list[list[int]]:
    """The first sample's greedy tokens of each unit."""
    return [c[0].token_ids for c in engine.generate(units, n, 0.0)]


def _same_answer(reference: list[int], got: list[int], engine: Engine, unit: TargetUnit,
                 dtype: torch.dtype) -> tuple[bool, str]:
    """Whether two greedy answers agree, or part only at a near tie of the reference."""
    if reference == got:
        return True, f"{len(got)} tokens identical"
    k = next((i for i, (a, b) in enumerate(zip(reference, got, strict=False)) if a != b),
             min(len(reference), len(got)))
    logits = engine.forced_logits(unit, reference[:k])[engine.prompt_len + k - 1]
    top = torch.topk(logits, 2).values
    margin, limit = float(top[0] - top[1]), TIE_FRACTION[dtype] * max(1.0, abs(float(top[0])))
    if margin <= limit:
        return True, f"parts at token {k + 1} on a near tie (top-2 margin {margin:.3g})"
    return False, f"parts at token {k + 1} of {len(reference)} (top-2 margin {margin:.3g})"


@contextmanager
def _steer_layer_outputs(engine: Engine) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record the steer layer's output before and after every hook, for each forward."""
    block = engine.layer_map.layers[engine.steer_layer]
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    raw: list[torch.Tensor] = []
    own = block.__dict__.get("forward")
    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        raw.append((out if isinstance(out, torch.Tensor) else out[0]).detach().float().clone())
        return out

    def after(_m: torch.nn.Module, _a: Any, out: Any) -> None:
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        calls.append((raw[-1], hidden.detach().float().clone()))

    block.forward = forward
    handle = block.register_forward_hook(after)  # after the steering hook, which goes first
    try:
        yield calls
    finally:
        handle.remove()
        if own is None:
            del block.forward
        else:
            block.forward = own


def check_steering(engine: Engine, vector: torch.Tensor, n: int, dtype: torch.dtype) -> Check:
    """Check 1 on the eager decode (hooks inside a CUDA graph run only at capture)."""
    v = vector.to(engine.device, engine.dtype).float()
    eps = torch.finfo(dtype).eps
    with _steer_layer_outputs(engine) as calls:
        [tokens] = _answer(engine, [TargetUnit(vector, None, None, [0])], n)
    start = engine.injection_start
    (raw, steered), steps = calls[0], calls[1:]
    def steered_by_v(raw_x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Per position: whether out - raw_x is v, to the dtype's rounding of the sum."""
        excess = (out - raw_x - v).abs() - 4 * eps * (raw_x.abs() + v.abs())
        return (excess <= 1e-6).all(-1)

    before = float((steered[0, :start] - raw[0, :start]).abs().max()) if start else 0.0
    prompt = int(steered_by_v(raw[0, start:], steered[0, start:]).sum())
    generated = sum(bool(steered_by_v(r[0], s[0]).all()) for r, s in steps)
    fed = len(tokens) - (len(tokens) == n)  # every token but a last one cut off by n is fed back
    n_prompt = engine.prompt_len - start
    ok = before == 0.0 and prompt == n_prompt and generated == len(steps) >= fed
    detail = (f"{prompt} of {n_prompt} prompt positions from the injection start and "
              f"{generated} of {max(fed, len(steps))} generated tokens steered, the {start} "
              f"before it {'untouched' if before == 0.0 else f'changed (by up to {before:.3g})'}")
    return Check("steering", "pass" if ok else "fail", detail)


def check_batch(engine: Engine, alone: TargetUnit, others: list[TargetUnit], n: int,
                dtype: torch.dtype) -> Check:
    """Check 2: the unit alone, then in the middle of a full batch of other units."""
    [single] = _answer(engine, [alone], n)
    half = len(others) // 2
    batch = [*others[:half], alone, *others[half:]]
    rows = sum(len(u.seeds) for u in batch)
    in_batch = _answer(engine, batch, n)[half]
    ok, detail = _same_answer(single, in_batch, engine, alone, dtype)
    return Check("batch", "pass" if ok else "fail", f"one row alone and in {rows} rows: {detail}")


def check_self_patch(engine: Engine, vector: torch.Tensor, layer: int, n: int) -> Check:
    """Check 3: patch layer `layer` with the unit's own source run, against no patch."""
    source = engine.source_run(vector, [layer])[layer]
    patched = TargetUnit(vector, layer, source, [0])
    plain = TargetUnit(vector, None, None, [0])
    diff = float((engine.prefill_logits([patched]) - engine.prefill_logits([plain])).abs().max())
    [a] = _answer(engine, [patched], n)
    [b] = _answer(engine, [plain], n)
    ok = a == b
    return Check("self-patch", "pass" if ok else "fail",
                 f"patched at layer {layer} with its own source run: {len(a)} tokens "
                 f"{'identical' if ok else 'differ'}, prefill logits differ by at most {diff:.3g}")


def check_decode_path(fast: Engine, eager: Engine, units: list[TargetUnit], n: int,
                      dtype: torch.dtype, path: str) -> Check:
    """Check 4: the sweep's decode path against the eager decode, unit by unit."""
    if not fast.decodes_static(fast.prompt_len + n):
        return Check("decode path", "skip",
                     "this model decodes eagerly here (no static-cache path to compare)")
    got, want = _answer(fast, units, n), _answer(eager, units, n)
    notes = [_same_answer(w, g, eager, u, dtype) for w, g, u in zip(want, got, units, strict=True)]
    ok = all(o for o, _ in notes)
    ties = sum("near tie" in d for _, d in notes)
    worst = next((d for o, d in notes if not o),
                 f"{len(notes) - ties} of {len(notes)} answers identical, {ties} parting at a "
                 "near tie")
    return Check("decode path", "pass" if ok else "fail", f"{path} against eager: {worst}")


def _plain_logits(engine: Engine, vector: torch.Tensor | None, split: bool) -> torch.Tensor:
    """Last-position logits of a plain forward over the prompt, the steering added by a hook of
    its own: in one forward, or (`split`) the part before the injection start first and the
    rest on its cache, as the readout pass computes it."""
    ids = torch.tensor([engine.prompt_ids], device=engine.device)
    start = engine.injection_start if split else 0
    handle = None
    if vector is not None:
        v = vector.to(engine.device, engine.dtype)

        def add(_m: torch.nn.Module, _a: Any, out: Any) -> Any:
            hidden = (out if isinstance(out, torch.Tensor) else out[0]).clone()
            hidden[:, engine.injection_start - start:] += v  # positions from the injection start
            return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    name = forward_arguments(engine.model)[0]
    cached: dict[str, Any] = {}
    with torch.inference_mode():
        if split:
            cached = {name: DynamicCache(config=engine.model.config), "use_cache": True}
            engine.model(input_ids=ids[:, :start], **cached)
        if vector is not None:
            handle = engine.layer_map.layers[engine.steer_layer].register_forward_hook(add)
        try:
            out = engine.model(input_ids=ids[:, start:], logits_to_keep=1,
                               **(cached or {"use_cache": False}))
        finally:
            if handle is not None:
                handle.remove()
    return out.logits[:, -1].to(engine.device).float()


def _difference(a: ReadoutValues, b: ReadoutValues) -> float:
    """The largest gap between two readouts: in P(yes), in P(no), in entropy relative to it."""
    return max(abs(a.p_yes - b.p_yes), abs(a.p_no - b.p_no),
               abs(a.entropy - b.entropy) / max(1.0, b.entropy))


def check_readout(engine: Engine, reader: FirstTokenReader, vector: torch.Tensor,
                  dtype: torch.dtype) -> Check:
    """Check 5: the readouts of an unsteered and a steered unit, as generate's prefill and as
    the readout pass compute them, against plain forwards computed the same way."""
    prefill = readout_pass = rounding = 0.0
    for v in (None, vector):
        unit = TargetUnit(v, None, None, [])
        [whole] = reader.read(_plain_logits(engine, v, split=False))
        [split] = reader.read(_plain_logits(engine, v, split=True))
        [got] = reader.read(engine.prefill_logits([unit]))
        prefill = max(prefill, _difference(got, whole))
        [got] = reader.read(engine.readout_logits([unit]))
        readout_pass = max(readout_pass, _difference(got, split))
        rounding = max(rounding, _difference(split, whole))
    ok = max(prefill, readout_pass) <= READOUT_TOLERANCE[dtype]
    return Check("readout", "pass" if ok else "fail",
                 f"P(yes), P(no) and entropy against plain forwards: generate's prefill "
                 f"{prefill:.2g}, the readout pass (prompt prefix cached) {readout_pass:.2g} "
                 f"(the two plain forwards differ by {rounding:.2g})")


def _timed(make: Callable[[], Check]) -> Check:
    started = time.perf_counter()
    check = make()
    check.seconds = time.perf_counter() - started
    return check


def run_verify(store: Store, options: VerifyOptions,
               load: Callable[..., LoadedModel] = load_model) -> VerifyResult:
    """Load the sweep's model and run the five checks; reads the store, writes nothing."""
    started = time.perf_counter()
    with store.read() as session:
        sweep = get_sweep(session, options.sweep)
        config = sweep_config(sweep)
    device = options.device or default_device()
    loaded = load(options.model or config.model, dtype=options.dtype or config.dtype,
                  device=device, revision=config.model_revision)
    layer_map = find_layers(loaded.model)
    layer = config.layers[0]
    check_layer_range(len(layer_map.layers), [config.steer_layer, layer], "layer")
    words = (config.positive_words[0], config.negative_words[0])
    raw = _vectors(store, loaded, config.steer_layer, list(words))
    w1, w2 = (raw[w].float() * config.strength for w in words)
    prompt = render_prompt(loaded.tokenizer, config.prompt_intro, config.prompt_trial)
    args = (loaded.model, layer_map, prompt.input_ids, prompt.injection_start,
            config.steer_layer, eos_ids(loaded.model, loaded.tokenizer))
    cuda = loaded.device.type == "cuda"
    eager = Engine(*args, use_graphs=False)
    fast = Engine(*args, compile_decode=options.compile, graph_replay=cuda,
                  share_prefix=options.share_prefix, graph_rows=FULL_BATCH_ROWS)
    path = (("CUDA graphs, compiled" if options.compile else "CUDA graphs") if cuda
            else "the static-cache decoder")
    last = config.layers[-1]
    from_w1, from_w2 = (fast.source_run(v, sorted({layer, last})) for v in (w1, w2))
    pair = TargetUnit(w1, layer, from_w2[layer], [0])  # the pair experiments' kind of unit
    others = [TargetUnit(w1, None, None, [1, 2, 3, 4]), TargetUnit(None, None, None, [5, 6]),
              TargetUnit(w2, last, from_w1[last], list(range(7, FULL_BATCH_ROWS)))]
    n, dtype = options.tokens, loaded.dtype
    result = VerifyResult(sweep.name, loaded.model_id, str(loaded.device),
                          str(dtype).removeprefix("torch."), words, layer)
    reader = FirstTokenReader(loaded.tokenizer)
    result.checks = [
        _timed(lambda: check_steering(eager, w1, n, dtype)),
        _timed(lambda: check_batch(fast, pair, others, n, dtype)),
        _timed(lambda: check_self_patch(fast, w1, layer, n)),
        _timed(lambda: check_decode_path(fast, eager, [pair, *others], n, dtype, path)),
        _timed(lambda: check_readout(fast, reader, w1, dtype)),
    ]
    result.seconds = time.perf_counter() - started
    return result
