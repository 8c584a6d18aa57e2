"""Continuous batching (refill.py): rows that finish take the next sample, each row at its own
step, and every answer stays the eager decode's, key by key. On the CPU the static decoder runs
its steps without graph replay; a float32 tiny model, greedy and seeded sampling."""

from typing import Any

import pytest
import torch
from test_engine import lively_llama, vector
from test_graphed_rows import gpu_engines, make
from tiny_models import tiny_tokenizer

from patchdb.generate import triton_decode
from patchdb.generate.engine import Completion, Engine, TargetUnit, parse_row
from patchdb.generate.refill import generate_stream
from patchdb.generate.sampling import Sampling

N_NEW = 12

# Tests of the kernel on a CPU model: they need Triton's interpreter, which conftest.py turns on
# only where there is no GPU. On a GPU the gpu tests run the compiled kernel on these paths.
INTERPRETED = pytest.mark.skipif(
    not triton_decode.available(torch.zeros(1)),
    reason="the kernel on CPU tensors needs Triton's interpreter (off where there is a GPU)")


def work(engine: Engine) -> list[TargetUnit]:
    """Patched, steered-only and plain units of different sizes (one larger than the rows)."""
    source = engine.source_run(vector(11), [2, 3])
    return [TargetUnit(vector(12), 3, source[3], list(range(9))),
            TargetUnit(None, None, None, list(range(20, 26))),
            TargetUnit(vector(13), None, None, list(range(40, 44))),
            TargetUnit(vector(14), 2, source[2], list(range(60, 67))),
            TargetUnit(vector(15), 3, source[3], [80])]


def as_lists(units: list[list[Completion]]) -> list[list[tuple[list[int], str]]]:
    return [[(c.token_ids, c.finish_reason) for c in unit] for unit in units]


def eager(model: Any, eos: list[int], todo: list[TargetUnit], how: Any) -> list[Any]:
    return as_lists(make(model, eos, use_graphs=False).generate(todo, N_NEW, how))


def streamed(engine: Engine, todo: list[TargetUnit], how: Any, rows: int,
             max_new: int = N_NEW, unit_slots: int = 0) -> tuple[list[Any], Any, list[int]]:
    got: dict[int, list[Completion]] = {}
    order: list[int] = []

    def on_unit(key: int, completions: list[Completion]) -> None:
        assert key not in got, f"unit {key} handed over twice"
        got[key] = completions
        order.append(key)

    refill = generate_stream(engine, iter(enumerate(todo)), max_new, how, rows, on_unit,
                             unit_slots=unit_slots)
    assert sorted(got) == list(range(len(todo)))
    return as_lists([got[i] for i in range(len(todo))]), refill, order


def stop_tokens(model: Any, todo: list[TargetUnit], how: Any) -> list[int]:
    """Tokens that many rows emit early, called EOS so that rows end at many different steps."""
    rows = [ids for unit in eager(model, [], todo, how) for ids, _ in unit]
    return sorted({row[2] for row in rows[:8]} | {row[5] for row in rows[9:20]})


SAMPLINGS = [0.0, 1.0, Sampling(0.7, top_k=20, top_p=0.9)]


@pytest.mark.parametrize("how", SAMPLINGS, ids=["greedy", "t1", "t0.7-k20-p0.9"])
@pytest.mark.parametrize("fast_attention", [False, True], ids=["hf-attention", "decode-attention"])
def test_refilled_rows_give_the_eager_answers_key_by_key(how: Any, fast_attention: bool) -> None:
    model = lively_llama(seed=4)
    todo = work(make(model, [], use_graphs=False))
    stop = stop_tokens(model, todo, how)
    want = eager(model, stop, todo, how)
    ends = [len(ids) for unit in want for ids, reason in unit if reason == "stop"]
    assert len(ends) >= 10 and min(ends) < max(ends), "rows must end at different steps"
    static = make(model, stop, graph_replay=False, fast_attention=fast_attention,
                  share_prefix=fast_attention)
    got, refill, _ = streamed(static, todo, how, rows=5)
    assert got == want
    # 27 samples through 5 rows: rows were refilled many times, each row at its own step
    assert refill.refills >= 5
    assert static._decoder is not None and static._decoder.rows == 5
    if fast_attention:
        # Each unit's prompt kept once, in 2 unit slots (a third unit waits for a free one),
        # not in each row: the rows' own cache holds only the tokens they draw.
        got, refill, _ = streamed(static, todo, how, rows=8, unit_slots=2)
        assert got == want
        decoder = static._decoder
        assert decoder.unit_slots == 2 and decoder.prompt_slots == 0
        assert decoder.mask.shape[-1] == N_NEW  # a row's cache: its drawn tokens only
        # a wait means both slots held different units' prompts at once; all came back
        assert refill.slot_waits > 0 and sorted(refill.queue.free_slots) == [0, 1]


def test_units_are_handed_over_as_they_finish_not_at_the_end() -> None:
    """A unit goes to on_unit once its last sample ends, while others still decode: the first
    unit handed over is not the last one fed, and a small unit fed late can finish early."""
    model = lively_llama(seed=4)
    todo = work(make(model, [], use_graphs=False))
    stop = stop_tokens(model, todo, 1.0)
    static = make(model, stop, graph_replay=False)
    seen_steps: list[int] = []
    handed: list[tuple[int, int]] = []  # (unit, steps drawn before it was handed over)

    def on_unit(key: int, completions: list[Completion]) -> None:
        handed.append((key, len(seen_steps)))

    generate_stream(static, iter(enumerate(todo)), N_NEW, 1.0, 5, on_unit,
                    on_step=seen_steps.append)
    assert sorted(k for k, _ in handed) == [0, 1, 2, 3, 4]
    assert handed[0][1] < len(seen_steps), "the first unit waited for the whole run"
    # progress counts every drawn token: the answers' tokens plus their EOS
    want = eager(model, stop, todo, 1.0)
    assert sum(seen_steps) == sum(len(ids) + (r == "stop") for u in want for ids, r in u)


def test_a_stop_starts_no_new_unit_and_finishes_those_started() -> None:
    """Once stop() is true (Ctrl-C in the stage) no unit that has not started gets a row; the
    units started finish whole, with the eager answers, and are handed over."""
    model = lively_llama(seed=4)
    todo = work(make(model, [], use_graphs=False))
    stop = stop_tokens(model, todo, 1.0)
    want = eager(model, stop, todo, 1.0)
    static = make(model, stop, graph_replay=False)
    got: dict[int, list[Completion]] = {}
    feeds: list[int] = []

    def feed() -> Any:
        for key, unit in enumerate(todo):
            feeds.append(key)
            yield key, unit

    refill = generate_stream(static, feed(), N_NEW, 1.0, 5, got.__setitem__,
                             stop=lambda: bool(got))
    assert got, "the first unit finished"
    assert len(got) < len(todo), "units that had not started ran anyway"
    for key, completions in got.items():
        assert as_lists([completions]) == [want[key]]
    # the units fed but never started (prefilled ahead) were dropped, not decoded
    assert refill.queue.fed_all and not refill.queue.chunks


def test_one_token_answers_and_answers_that_end_at_once() -> None:
    """max_new_tokens 1, and an EOS that every row draws first: samples end on admission and
    their rows are refilled before any step."""
    model = lively_llama(seed=4)
    base = make(model, [], use_graphs=False)
    todo = work(base)
    first = eager(model, [], todo, 0.0)
    firsts = sorted({unit[0][0][0] for unit in first})
    static = make(model, [], graph_replay=False)
    got, _, _ = streamed(static, todo, 0.0, rows=4, max_new=1)
    assert got == as_lists(make(model, [], use_graphs=False).generate(todo, 1, 0.0))
    at_once = make(model, firsts, graph_replay=False)
    got, _, _ = streamed(at_once, todo, 0.0, rows=4)
    assert got == [[([], "stop")] * len(u.seeds) for u in todo]


def test_parse_row_stops_at_eos_or_the_first_gap() -> None:
    assert parse_row([5, 6, 2, 7], {2}) == Completion([5, 6], "stop")
    assert parse_row([5, 6, -1, -1], {2}) == Completion([5, 6], "length")
    assert parse_row([5, 6, 7], set()) == Completion([5, 6, 7], "length")


@pytest.mark.triton
@INTERPRETED
def test_refill_through_the_decode_kernel_with_ragged_lengths() -> None:
    """The Triton decode kernel (interpreted on the CPU) reads each row's own length: rows at
    different steps give the eager answers."""
    model = lively_llama(seed=4)
    todo = work(make(model, [], use_graphs=False))[:3]
    stop = stop_tokens(model, todo, 1.0)
    want = eager(model, stop, todo, 1.0)
    static = make(model, stop, graph_replay=False, share_prefix=True)
    calls: list[tuple[int, bool]] = []
    orders: list[tuple[list[int], list[int]]] = []  # (order, each row's unit slot)
    real = triton_decode.decode_attention_triton

    def counting(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 length: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        units = kwargs.get("units")
        calls.append((length.dim(), units is not None))
        if units is not None and units.order is not None:
            orders.append((units.order.tolist(), units.of_row.tolist()))
        return real(query, key, value, length, *args, **kwargs)

    triton_decode.decode_attention_triton = counting
    try:  # (the kernel is interpreted here, so one run covers ragged rows and unit prompts)
        got, refill, _ = streamed(static, todo, 1.0, rows=5, unit_slots=3)
    finally:
        triton_decode.decode_attention_triton = real
    assert got == want
    assert calls and set(calls) == {(1, True)}, "the kernel must run, with a length a row and " \
        "the unit prompts"
    assert refill.refills >= 2
    # Every step gave the kernel a row order, a permutation of its rows; refills scattered
    # units over the rows, and the order put them back together (at most one run of rows per
    # unit slot among the rows that hold a sample: free rows go last).
    assert len(orders) == len(calls)
    assert all(sorted(order) == list(range(len(order))) for order, _ in orders)
    assert any(order != sorted(order) for order, _ in orders)
    for order, slot_of in orders:
        slots = [slot_of[r] for r in order]
        runs = [s for i, s in enumerate(slots) if i == 0 or slots[i - 1] != s]
        assert len(runs) <= 3 + 1, (order, slots)  # three slots, and the free rows' stale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("how", [0.0, Sampling(1.0, top_k=40, top_p=0.9)], ids=["greedy", "sampled"])
def test_refill_on_captured_graphs_gives_the_eager_answers(compiled: bool, how: Any) -> None:
    """On a GPU, float32: rows refilled inside captured graphs (plain and compiled, Triton
    decode attention, shared prefix) give the eager decode's answers key by key."""
    from test_gpu import real_shape_model
    from test_gpu import units as gpu_units

    build = gpu_engines(real_shape_model("cuda"))
    with torch.inference_mode():
        free = build([], use_graphs=False)
        todo = gpu_units(free) * 3  # 18 samples through 4 rows
        rows = [c.token_ids for unit in free.generate(todo, 16, how) for c in unit]
        stop, want = varied_stops(rows, lambda eos: as_lists(
            build(eos, use_graphs=False).generate(todo, 16, how)))
        fast = build(stop, compile_decode=compiled, share_prefix=True)
        got, refill, _ = streamed(fast, todo, how, rows=4, max_new=16)
        assert got == want
        assert refill.refills >= 3
        got, refill, _ = streamed(fast, todo, how, rows=4, max_new=16, unit_slots=3)
    assert got == want
    assert fast._decoder is not None and fast._decoder.captures >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefills_and_admissions_never_wait_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop prefills and admits rows while a decode step runs; a sync there (a plain copy
    from the host, a read of a GPU value) leaves the GPU idle while the host works. With
    torch's sync debug mode raising inside every prefill (after the first, which builds the
    shared prefix once) and every admission, the loop still gives the eager answers."""
    from test_gpu import real_shape_model
    from test_gpu import units as gpu_units

    import patchdb.generate.refill as refill_mod
    import patchdb.generate.unit_queue as queue_mod
    from patchdb.generate.readout import FirstTokenReader

    build = gpu_engines(real_shape_model("cuda"))
    tok = tiny_tokenizer()
    how = Sampling(1.0, top_k=40, top_p=0.9)
    guarded: list[str] = []

    def no_sync(name: str, real: Any, skip: int) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            guarded.append(name)
            if guarded.count(name) <= skip:
                return real(*args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return call

    with torch.inference_mode():
        free = build([], use_graphs=False)
        todo = gpu_units(free) * 3
        want = as_lists(free.generate(todo, 12, how))
        fast = build([], share_prefix=True)
        reader = FirstTokenReader(tok)
        readouts: list[Any] = []
        got: dict[int, list[Completion]] = {}
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError):
                torch.tensor([1], device="cuda")  # the mode is on: a plain copy raises
        finally:
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.setattr(queue_mod, "PREFILL_UNITS", 2)
        monkeypatch.setattr(queue_mod.UnitQueue, "prefill",
                            no_sync("prefill", queue_mod.UnitQueue.prefill, 1))
        monkeypatch.setattr(refill_mod.Refill, "_admit",
                            no_sync("admit", refill_mod.Refill._admit, 1))
        generate_stream(fast, iter(enumerate(todo)), 12, how, 4, got.__setitem__,
                        on_prefill=lambda keys, logits: readouts.append(
                            reader.start(logits)), unit_slots=3)
    assert guarded.count("prefill") >= 4 and guarded.count("admit") >= 4
    assert as_lists([got[i] for i in range(len(todo))]) == want
    assert sum(len(r.values()) for r in readouts) == len(todo)


def varied_stops(rows: list[list[int]], answers: Any) -> tuple[list[int], list[Any]]:
    """EOS tokens, taken from the free-running answers, that end at least five rows at more
    than one step (a random-init model repeats tokens, so a fixed pick can end every row at
    once); returns them and the eager answers under them. Where no pick does (greedy rows of a
    random-init model can all be one answer), the pick that ends the most rows: refilling is
    still exercised, every row ending at once or at the cap."""
    stop: list[int] = []
    best: tuple[int, list[int], list[Any]] = (-1, [], [])
    for position in (3, 5, 2, 7, 4, 9):
        for row in rows:
            if row[position] in stop:
                continue
            want = answers(sorted([*stop, row[position]]))
            ends = [len(t) for unit in want for t, reason in unit if reason == "stop"]
            if len(ends) > best[0]:
                best = (len(ends), sorted([*stop, row[position]]), want)
            if len(set(ends)) > 1:
                stop.append(row[position])
                if len(ends) >= 5:
                    return sorted(stop), want
    return best[1], best[2]


def test_units_that_end_together_are_handed_over_one_a_step() -> None:
    # Rows in step (no EOS): the three one-row units all end at the same step. Writing them all
    # while one step runs would leave the GPU waiting on the host: one goes per step.
    model = lively_llama(seed=4)
    static = make(model, [], graph_replay=False)
    todo = [TargetUnit(vector(20 + i), None, None, [i]) for i in range(3)]
    steps = [0]
    at: list[int] = []

    def on_step(n: int) -> None:
        steps[0] += 1

    def on_unit(key: int, completions: list[Completion]) -> None:
        at.append(steps[0])

    generate_stream(static, iter(enumerate(todo + [TargetUnit(vector(30), None, None,
                                                              list(range(3, 6)))])),
                    N_NEW, 0.0, 3, on_unit, on_step=on_step)
    assert len(at) == 4
    assert at[0] < at[1] < at[2], "the units that ended together went in one step"


def every_third_check_fails(real: Any) -> Any:
    """choose_tokens, but every third draw that defers its top-k tie check "fails" it and
    returns wrong tokens (what a draw that missed tied tokens might give)."""
    calls = [0]

    def failing(logits: Any, seeds: Any, step: Any, how: Any, overflow: Any = None) -> Any:
        picked = real(logits, seeds, step, how, overflow)
        if overflow is None or not overflow:
            return picked
        calls[0] += 1
        if calls[0] % 3:
            return picked
        overflow[0] = torch.tensor(True)
        return torch.zeros_like(picked)

    return failing


@pytest.mark.parametrize("fast_attention", [False, True], ids=["hf-attention", "decode-attention"])
def test_a_draw_whose_tie_check_fails_is_made_again_exactly(monkeypatch: pytest.MonkeyPatch,
                                                             fast_attention: bool) -> None:
    # The loop's draw does not wait for top-k's tie check, and the next step is launched from
    # its tokens before the host reads the check; where it fails, the draw is undone, its step
    # run again and the draw made exactly. Here every third unchecked draw "fails" and returns
    # wrong tokens: the answers must still be the eager decode's.
    import patchdb.generate.refill as refill_mod

    failing = every_third_check_fails(refill_mod.choose_tokens)
    how = Sampling(0.9, top_k=20, top_p=0.9)
    model = lively_llama(seed=4)
    todo = work(make(model, [], use_graphs=False))
    stop = stop_tokens(model, todo, how)
    want = eager(model, stop, todo, how)
    monkeypatch.setattr(refill_mod, "choose_tokens", failing)
    got, refill, _ = streamed(make(model, stop, graph_replay=False, fast_attention=fast_attention,
                                   share_prefix=fast_attention), todo, how, rows=5)
    assert refill.redraws >= 5
    assert got == want


def test_first_tokens_whose_tie_check_fails_are_drawn_again_exactly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A prefill draws its samples' first tokens without waiting for top-k's tie check; the
    # check is read before the chunk's first rows are admitted. Here every check "fails" and
    # the unchecked draw returns wrong tokens: each chunk must be drawn again exactly, and the
    # answers must be the eager decode's.
    import patchdb.generate.unit_queue as queue_mod

    real = queue_mod.choose_first_tokens
    checks = [0]

    def failing(logits: Any, counts: Any, seeds: Any, how: Any, overflow: Any = None) -> Any:
        picked = real(logits, counts, seeds, how, overflow)
        if overflow is None:
            return picked
        checks[0] += 1
        overflow[:] = [torch.tensor(True)]
        return torch.zeros_like(picked)

    how = Sampling(0.9, top_k=20, top_p=0.9)
    model = lively_llama(seed=4)
    todo = work(make(model, [], use_graphs=False))
    stop = stop_tokens(model, todo, how)
    want = eager(model, stop, todo, how)
    monkeypatch.setattr(queue_mod, "choose_first_tokens", failing)
    got, refill, _ = streamed(make(model, stop, graph_replay=False), todo, how, rows=5)
    assert checks[0] >= 1 and refill.redraws == checks[0]
    assert got == want


def test_a_row_order_is_a_permutation_of_the_current_rows() -> None:
    engine = make(lively_llama(seed=4), [], graph_replay=False, share_prefix=True)
    decoder = engine._graphed_decoder(6, engine.prompt_len + N_NEW, 2)
    assert decoder is not None
    assert decoder.row_order.tolist() == list(range(6))
    decoder.order_rows([5, 0, 4, 1, 3, 2])
    assert decoder.row_order.tolist() == [5, 0, 4, 1, 3, 2]
    for bad in ([0, 0, 1, 2, 3, 4], [0, 1, 2], [0, 1, 2, 3, 4, 6]):
        with pytest.raises(ValueError, match="permutation of the current rows"):
            decoder.order_rows(bad)
    assert decoder.row_order.tolist() == [5, 0, 4, 1, 3, 2]


@pytest.mark.parametrize("unit_slots", [0, 8])
def test_an_empty_feed_decodes_nothing_and_returns(unit_slots: int) -> None:
    engine = make(lively_llama(seed=4), [], graph_replay=False)
    handed: list[Any] = []
    refill = generate_stream(engine, iter([]), N_NEW, 0.0, 4, lambda *a: handed.append(a),
                             unit_slots=unit_slots)
    assert handed == [] and refill.steps == 0 and refill.drawn == 0


@pytest.mark.parametrize("burst", [False, True], ids=["spread", "all-at-once"])
def test_prefills_ahead_are_spread_one_call_a_step(monkeypatch: pytest.MonkeyPatch,
                                                   burst: bool) -> None:
    # One unit a prefill call and rows that all end together (no EOS): each refill takes every
    # row's worth of waiting samples at once, and the queue is topped up again while steps run.
    # A step makes one prefill call at most; topping up all at once (as before) makes several.
    import patchdb.generate.refill as refill_mod
    import patchdb.generate.unit_queue as queue_mod
    from patchdb.generate.graphed import GraphedDecoder

    monkeypatch.setattr(queue_mod, "PREFILL_UNITS", 1)
    if burst:
        monkeypatch.setattr(refill_mod, "PREFILLS_PER_STEP", None)
        monkeypatch.setattr(refill_mod, "TOP_UP_BELOW", 1)
    model = lively_llama(seed=4)
    static = make(model, [], graph_replay=False)
    todo = [TargetUnit(vector(40 + i), None, None, list(range(10 * i, 10 * i + 2)))
            for i in range(12)]
    steps = [0]
    in_admit = [False]
    calls: list[int] = []  # the step of each prefill call made outside an admission
    real_prefill, real_admit, real_step = (queue_mod.UnitQueue.prefill, refill_mod.Refill._admit,
                                           GraphedDecoder.step)

    def prefill(self: Any, *args: Any) -> Any:
        if not in_admit[0]:
            calls.append(steps[0])
        return real_prefill(self, *args)

    def admit(self: Any, *args: Any) -> Any:
        in_admit[0] = True
        try:
            return real_admit(self, *args)
        finally:
            in_admit[0] = False

    def step(self: Any, *args: Any) -> Any:
        steps[0] += 1
        return real_step(self, *args)

    monkeypatch.setattr(queue_mod.UnitQueue, "prefill", prefill)
    monkeypatch.setattr(refill_mod.Refill, "_admit", admit)
    monkeypatch.setattr(GraphedDecoder, "step", step)
    got, _, _ = streamed(static, todo, 0.0, rows=4)
    assert got == eager(model, [], todo, 0.0)
    most = max(calls.count(s) for s in set(calls))
    assert len(calls) >= 4
    assert (most > 1) if burst else (most == 1)
