"""The engine on a tiny random-init Llama: steering, patching, decoding and batch invariance."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from patchdb.generate.batching import plan_batches
from patchdb.generate.engine import Engine, TargetUnit, eos_ids
from patchdb.generate.hooks import Patch, Steering, patching, recording, steering
from patchdb.generate.layers import find_layers
from patchdb.generate.sampling import choose_tokens, rollout_seed, row_uniforms

N_LAYERS = 6
HIDDEN = 64
STEER_LAYER = 1
PROMPT = (
    "I can inject thoughts into your activations on half of the trials. Ok, let's get started."
    "\n\nTrial 1: Do you detect an injected thought? If so, what is it about?"
)


def lively_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose weights are scaled up, so greedy answers vary from token to token
    (at the default init it repeats one token forever, which would make the tests blind)."""
    model = tiny_llama(N_LAYERS, HIDDEN, seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def engine() -> Engine:
    model = lively_llama()
    tok = tiny_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    start = ids.index(tok("\n")["input_ids"][0], 10)
    return Engine(model, find_layers(model), ids, start, STEER_LAYER, eos_ids(model, tok))


def vector(seed: int, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(HIDDEN, generator=g) * scale


def tokens(completions: list[Any]) -> list[list[int]]:
    return [c.token_ids for c in completions]


def test_strength_zero_gives_exactly_the_unhooked_output(engine: Engine) -> None:
    ids = torch.tensor([engine.prompt_ids])
    with torch.inference_mode():
        plain = engine.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        expected = engine.model.generate(ids, max_new_tokens=12, do_sample=False)
    zero = TargetUnit(vector(1) * 0.0, None, None, [7])
    assert torch.equal(engine.prefill_logits([zero]), plain)
    [[answer]] = engine.generate([zero], 12, 0.0)
    assert answer.token_ids == expected[0, len(engine.prompt_ids):].tolist()
    steered = TargetUnit(vector(1), None, None, [7])
    assert not torch.equal(engine.prefill_logits([steered]), plain)


def test_patch_from_a_source_identical_to_the_target_changes_nothing(engine: Engine) -> None:
    steer = vector(2)
    source = engine.source_run(steer, [3, 4])
    unpatched = TargetUnit(steer, None, None, [1, 2])
    for layer in (3, 4):
        same = TargetUnit(steer, layer, source[layer], [1, 2])
        assert torch.equal(engine.prefill_logits([same]), engine.prefill_logits([unpatched]))
        assert tokens(engine.generate([same], 10, 1.0)[0]) == tokens(
            engine.generate([unpatched], 10, 1.0)[0]
        )
    other = engine.source_run(vector(3), [3])
    different = TargetUnit(steer, 3, other[3], [1])
    assert not torch.equal(engine.prefill_logits([different]), engine.prefill_logits([unpatched]))


def test_patch_changes_only_the_chosen_layer_at_the_chosen_positions(engine: Engine) -> None:
    layer, start = 3, engine.injection_start
    all_layers = list(range(N_LAYERS))
    steer = vector(4)
    source = engine.source_run(vector(5), [layer])[layer]
    with recording(engine.layer_map, all_layers) as plain:
        engine.prefill_logits([TargetUnit(steer, None, None, [0])])
    plain = dict(plain)
    with recording(engine.layer_map, all_layers) as patched:
        engine.prefill_logits([TargetUnit(steer, layer, source, [0])])
    for i in range(layer):
        assert torch.equal(patched[i], plain[i]), f"layer {i} before the patch changed"
    assert torch.equal(patched[layer][0, :start], plain[layer][0, :start])
    assert torch.equal(patched[layer][0, start:], source)
    assert not torch.equal(plain[layer][0, start:], source)
    assert not torch.equal(patched[layer + 1][0, start:], plain[layer + 1][0, start:])


@contextmanager
def prompt_only_steering(engine: Engine, vec: torch.Tensor) -> Iterator[None]:
    """Steering that stops at the end of the prompt: what the engine must NOT do."""
    prompt_len = engine.prompt_len

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(output.shape[1])
        mask = ((pos >= engine.injection_start) & (pos < prompt_len)).to(output.dtype)
        return output + vec[None, None, :] * mask[None, :, None]

    handle = engine.layer_map.layers[STEER_LAYER].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_generated_tokens_are_steered_but_not_patched(engine: Engine) -> None:
    layer, n_new = 3, 10
    steer = vector(6)
    source = engine.source_run(vector(7), [layer])[layer]
    [[answer]] = engine.generate([TargetUnit(steer, layer, source, [0])], n_new, 0.0)
    assert len(answer.token_ids) == n_new
    full = torch.tensor([engine.prompt_ids + answer.token_ids[:-1]])
    first = engine.prompt_len - 1

    # Teacher forcing over prompt + answer: steering at every position from the injection
    # start on, the patch over prompt positions only. It must reproduce the answer.
    patch = Patch(torch.tensor([layer]), source[None], engine.injection_start)
    with torch.inference_mode(), steering(
        engine.layer_map, STEER_LAYER, Steering(steer[None], engine.injection_start)
    ), patching(engine.layer_map, patch):
        forced = engine.model(input_ids=full).logits[0, first:].argmax(-1).tolist()
    assert forced == answer.token_ids

    # Control: had the generated tokens not been steered, the answer would differ.
    with torch.inference_mode(), prompt_only_steering(engine, steer), patching(
        engine.layer_map, patch
    ):
        unsteered = engine.model(input_ids=full).logits[0, first:].argmax(-1).tolist()
    assert unsteered != answer.token_ids


def mixed_units(engine: Engine) -> list[TargetUnit]:
    sources = {w: engine.source_run(vector(w), [2, 3, 4]) for w in (10, 11)}
    none = engine.source_run(None, [2, 3, 4])
    return [
        TargetUnit(vector(12), 2, sources[10][2], [101, 102, 103]),
        TargetUnit(vector(13), 4, sources[11][4], [201, 202]),
        TargetUnit(None, 3, sources[10][3], [301]),
        TargetUnit(vector(12), 3, none[3], [401, 402]),
    ]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_answers_do_not_depend_on_the_batch(engine: Engine, temperature: float) -> None:
    units = mixed_units(engine)
    together = engine.generate(units, 8, temperature)
    for unit, expected in zip(units, together, strict=True):
        [alone] = engine.generate([unit], 8, temperature)
        assert tokens(alone) == tokens(expected)
    shuffled = engine.generate(list(reversed(units)), 8, temperature)
    assert [tokens(c) for c in reversed(shuffled)] == [tokens(c) for c in together]
    if temperature == 0.0:
        # greedy: every sample of a unit is the same answer
        assert all(len({tuple(t) for t in tokens(c)}) == 1 for c in together)
    else:
        assert len({tuple(t) for t in tokens(together[0])}) > 1


def test_rows_stop_at_eos_and_the_rest_are_unchanged(engine: Engine) -> None:
    unit = TargetUnit(vector(20), None, None, list(range(16)))
    [free] = engine.generate([unit], 12, 1.0)
    # Call EOS a token that each of three rows emits mid-answer.
    stop_tokens = sorted({c.token_ids[5] for c in free[:3]})
    stopping = Engine(
        engine.model, engine.layer_map, engine.prompt_ids, engine.injection_start,
        STEER_LAYER, stop_tokens,
    )
    [stopped] = stopping.generate([unit], 12, 1.0)
    n_stopped = 0
    for before, after in zip(free, stopped, strict=True):
        cuts = [i for i, t in enumerate(before.token_ids) if t in stop_tokens]
        if cuts:
            n_stopped += 1
            assert after.token_ids == before.token_ids[:cuts[0]]
            assert after.finish_reason == "stop"
        else:
            assert after.token_ids == before.token_ids
            assert after.finish_reason == "length"
    assert n_stopped >= 2


def test_row_uniforms_depend_only_on_seed_and_step() -> None:
    seeds = torch.tensor([rollout_seed("s", "e", 40, "Bread", "", i) for i in range(3)])
    both = row_uniforms(seeds, 5)
    assert torch.equal(both[1:2], row_uniforms(seeds[1:2], 5))
    assert len(set(both.tolist())) == 3
    assert not torch.equal(both, row_uniforms(seeds, 6))
    assert bool(((both > 0) & (both < 1)).all())
    assert all(0 <= int(s) < 2**62 for s in seeds)


def test_sampled_token_does_not_depend_on_other_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 5000)
    seeds = torch.arange(16, dtype=torch.int64) * 104729
    together = choose_tokens(logits, seeds, 3, 1.0)
    alone = torch.cat([choose_tokens(logits[i:i + 1], seeds[i:i + 1], 3, 1.0) for i in range(16)])
    assert torch.equal(together, alone)


def test_sampling_follows_the_softmax() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 4000
    seeds = torch.arange(n, dtype=torch.int64) * 7919
    picks = choose_tokens(logits.expand(n, 4), seeds, 0, 1.0)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert torch.equal(choose_tokens(logits, seeds[:1], 0, 0.0), torch.tensor([0]))


def test_batches_split_large_units_and_never_exceed_the_size() -> None:
    class P:
        def __init__(self, n: int) -> None:
            self.samples = list(range(n))

    batches = plan_batches([P(3), P(5), P(1)], 4)
    assert [[(p.unit_index, p.samples) for p in b] for b in batches] == [
        [(0, [0, 1, 2]), (1, [0])],
        [(1, [1, 2, 3, 4])],
        [(2, [0])],
    ]


def test_compiling_is_automatic_only_on_gpus_for_long_runs() -> None:
    from patchdb.generate.stage import AUTO_COMPILE_TOKENS, auto_compile

    assert not auto_compile("cpu", 10 * AUTO_COMPILE_TOKENS)
    assert not auto_compile("cuda:0", AUTO_COMPILE_TOKENS - 1)
    assert auto_compile("cuda:1", AUTO_COMPILE_TOKENS)


# --- steering against a forward written out by hand --------------------------------------------


def start_from_offsets(tok: Any, text: str) -> int:
    """The injection start worked out here: the token holding the first character of the blank
    line right before "Trial 1", read off the tokenizer's character offsets."""
    char = text.index("\n\nTrial 1")
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    [index] = [i for i, (lo, hi) in enumerate(offsets) if lo <= char < hi]
    return index


def hand_forward(model: torch.nn.Module, ids: list[int], vec: torch.Tensor, layer: int,
                 start: int) -> torch.Tensor:
    """Logits of the whole sequence, the decoder layers called one by one (no cache, no hooks),
    `vec` added to the output of decoder layer `layer` at every position >= start."""
    inner = model.model
    x = torch.tensor([ids])
    n = x.shape[1]
    positions = torch.arange(n)[None]
    hidden = inner.embed_tokens(x)
    rotary = inner.rotary_emb(hidden, positions)
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    for i, block in enumerate(inner.layers):
        out = block(hidden, attention_mask=causal, position_ids=positions,
                    position_embeddings=rotary)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        if i == layer:
            hidden = hidden.clone()
            hidden[0, start:] += vec
    return model.lm_head(inner.norm(hidden))[0]


def hand_greedy(model: torch.nn.Module, ids: list[int], vec: torch.Tensor, layer: int,
                start: int, n_new: int) -> list[int]:
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n_new):
            out.append(int(hand_forward(model, ids + out, vec, layer, start)[-1].argmax()))
    return out


def test_steering_starts_at_the_blank_line_and_covers_every_later_token(engine: Engine) -> None:
    tok = tiny_tokenizer()
    start = start_from_offsets(tok, PROMPT)
    assert tok.decode(engine.prompt_ids[start:start + 2]) == "\n\n"  # SmolLM2 splits it in two
    steered = Engine(engine.model, engine.layer_map, engine.prompt_ids, start, STEER_LAYER,
                     engine.eos_token_ids)
    vec = vector(30)
    with torch.inference_mode():
        reference = hand_forward(engine.model, engine.prompt_ids, vec, STEER_LAYER, start)[-1]
        one_late = hand_forward(engine.model, engine.prompt_ids, vec, STEER_LAYER, start + 1)[-1]
    # the reference can tell a mask that starts one token late from the right one
    assert (reference - one_late).abs().max() > 1e-2
    got = steered.prefill_logits([TargetUnit(vec, None, None, [0])])[0].float()
    assert torch.allclose(got, reference, atol=1e-4, rtol=1e-4), (got - reference).abs().max()

    n_new = 10
    [[answer]] = steered.generate([TargetUnit(vec, None, None, [0])], n_new, 0.0)
    expected = hand_greedy(engine.model, engine.prompt_ids, vec, STEER_LAYER, start, n_new)
    assert answer.token_ids == expected
    assert len(set(expected)) > 1


def test_batches_come_out_even() -> None:
    from patchdb.generate.batching import even_batch_rows

    assert even_batch_rows(11_264, 1_040) == 1_024  # 11 batches of 1,024, not 10 x 1,040 + 864
    assert even_batch_rows(100, 64) == 50
    assert even_batch_rows(10, 64) == 10
    assert even_batch_rows(128, 64) == 64


def test_rows_fit_free_memory_and_leave_the_card_a_margin() -> None:
    from patchdb.generate.batching import PEAK_FRACTION, rows_that_fit

    gib, mib = 2**30, 2**20
    for card, free in ((79 * gib, 28 * gib), (140 * gib, 89 * gib), (79 * gib, 78 * gib)):
        # the card filled to its margin by what is already held, the rows and the fixed part
        rows = rows_that_fit(free, card, 53 * mib, fixed=200 * mib)
        used = (card - free) + rows * 53 * mib + 200 * mib
        assert used <= PEAK_FRACTION * card < used + 53 * mib, (card, free, rows)
    # at least one row, at most MAX_BATCH_ROWS
    assert rows_that_fit(6 * gib, 79 * gib, 53 * mib) == 1
    assert rows_that_fit(70 * gib, 79 * gib, 1024) == 4096


def test_paged_rows_are_sized_for_the_pages_a_row_holds_on_average() -> None:
    """Paged KV: rows take the pool's pages a row holds on average over time (answers of these
    lengths one after another, times POOL_MARGIN), the pool the rest of the budget; no paging
    where it would not give PAGED_GAIN times the rows of a full cache a row."""
    from patchdb.generate.batching import (
        PAGED_GAIN,
        PEAK_FRACTION,
        POOL_MARGIN,
        RowCosts,
        paged_batch,
        rows_that_fit,
    )
    from patchdb.generate.pages import PAGE, pages_for, steady_pages_per_row

    # a row of 2 tokens holds 1 page for both steps; one of 9 holds 1 page for 8, 2 for 1
    assert steady_pages_per_row({2: 1}) == 1.0
    assert steady_pages_per_row({PAGE + 1: 1}) == (PAGE + 2) / (PAGE + 1)
    assert steady_pages_per_row({2: 1, PAGE + 1: 1}) == (2 + PAGE + 2) / (2 + PAGE + 1)
    gib, mib = 2**30, 2**20
    costs = RowCosts(token=mib // 2, other=3 * mib, fixed=500 * mib, free=28 * gib,
                     card=79 * gib)
    short = {5: 25, 10: 25, 20: 20, 30: 20, 100: 10}
    got = paged_batch(costs, 100, short)
    assert got is not None
    rows, pages = got
    per_row = steady_pages_per_row(short) * POOL_MARGIN * PAGE * costs.token + costs.other
    assert rows == rows_that_fit(costs.free, costs.card, int(per_row), costs.fixed)
    full = rows_that_fit(costs.free, costs.card, 100 * costs.token + costs.other, costs.fixed)
    assert rows >= PAGED_GAIN * full
    used = (costs.card - costs.free) + costs.fixed + rows * costs.other + pages * PAGE * costs.token
    assert used <= PEAK_FRACTION * costs.card < used + PAGE * costs.token
    assert pages >= rows * steady_pages_per_row(short)
    # every answer at the cap, a large share at one length, or lengths that hardly spread:
    # rows would stay in step
    assert paged_batch(costs, 100, {100: 5}) is None
    assert paged_batch(costs, 100, {2: 6, 100: 4}) is None
    assert paged_batch(costs, 100, {80: 1, 90: 1, 99: 1}) is None
    assert paged_batch(costs, 100, {5: 1, 20: 1, 50: 1, 100: 1}) is not None
    # the gain: costs beside the KV that dwarf it leave paging too little to win
    heavy = RowCosts(token=1024, other=3 * gib, fixed=0, free=70 * gib, card=79 * gib)
    assert paged_batch(heavy, 100, short) is None
    # a pool never larger than every row at full length
    huge = RowCosts(token=1, other=1, fixed=0, free=70 * gib, card=79 * gib)
    rows, pages = paged_batch(huge, 100, {2: 1, 5: 1, 30: 1}) or (0, 0)
    assert pages == rows * pages_for(100)
