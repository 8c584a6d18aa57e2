"""KV memory by need (pages.py): the pool's bookkeeping, the decode kernel reading through a page
table, and continuous batching on a paged decoder giving the eager decode's answers key by key
while rows wait for pages, free them and take them again (CPU: no graph replay, the Triton
kernel in its interpreter, or SDPA over the gathered pages)."""

from typing import Any

import pytest
import torch
from test_engine import lively_llama
from test_graphed_rows import make
from test_refill import INTERPRETED, as_lists, every_third_check_fails, work

import patchdb.generate.refill as refill_mod
from patchdb.generate import triton_decode
from patchdb.generate.pages import PAGE, PagePool, gather_pages
from patchdb.generate.refill import generate_stream
from patchdb.generate.sampling import Sampling

CPU = torch.device("cpu")


def test_the_priority_row_always_gets_its_pages_and_others_wait() -> None:
    pool = PagePool(pages=6, rows=4, per_row=4, device=CPU)
    assert pool.admissible(4) == 2  # a whole row's worth stays free while no row is named
    pool.start([0, 1])
    pool.elect([0, 1])
    assert pool.priority == 0 and pool.reserve() == 3
    assert pool.admissible(4) == 1
    # row 1 takes what lies beyond the priority row's reserve, not the priority row's last
    # pages; row 0 takes those
    assert pool.grow([(1, PAGE + 1)]) == [] and pool.capacity(1) == 2 * PAGE
    assert pool.grow([(1, 3 * PAGE)]) == [1] and len(pool.free) == 3
    assert pool.grow([(0, 4 * PAGE), (1, 3 * PAGE)]) == [1]
    assert pool.capacity(0) == 4 * PAGE and pool.capacity(1) == 2 * PAGE and not pool.free
    pool.release([0])  # its answer is filed: its pages come back, a new priority is named
    assert pool.priority is None and len(pool.free) == 4
    pool.elect([1])
    assert pool.priority == 1 and pool.grow([(1, 4 * PAGE)]) == []
    pool.sync()
    assert pool.table[0].tolist() == [0, 0, 0, 0]  # a freed row writes to scratch
    assert pool.table[1].tolist() == pool.held[1] and 0 not in pool.held[1]


def test_rows_keep_their_pages_when_they_move_to_the_front() -> None:
    pool = PagePool(pages=8, rows=4, per_row=2, device=CPU)
    pool.start([1, 3])
    pool.elect([1, 3])
    pool.grow([(3, 2 * PAGE)])
    pool.sync()
    before = {row: pool.table[row].tolist() for row in (1, 3)}
    pool.keep([3, 1])
    assert pool.table[0].tolist() == before[3] and pool.table[1].tolist() == before[1]
    assert pool.table[2:].eq(0).all() and pool.priority == 1
    with pytest.raises(ValueError, match="cannot hold"):
        PagePool(pages=2, rows=4, per_row=2, device=CPU)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.triton
@pytest.mark.skipif(triton_decode.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("units", [False, True], ids=["own-cache", "unit-prompts"])
def test_the_kernel_reads_pages_as_it_reads_a_contiguous_cache(units: bool) -> None:
    """Paged reads give exactly the values the kernel gives on the same keys laid out row by
    row (same blocks in the same order); scrambled pages and stale data in scratch must not
    count."""
    g = torch.Generator().manual_seed(3)
    rows, kv, groups, dim, per_row, n_pages = 5, 2, 4, 16, -(-80 // PAGE), 40
    pool_k = torch.randn(n_pages + 1, kv, PAGE, dim, generator=g)
    pool_v = torch.randn(n_pages + 1, kv, PAGE, dim, generator=g)
    pool_k[0] = 1e4  # scratch: never read
    order = torch.randperm(n_pages, generator=g) + 1
    table = torch.zeros(rows, per_row, dtype=torch.int32)
    lengths = torch.tensor([1, 17, 80, 33, 64], dtype=torch.int32)
    taken = 0
    for r, length in enumerate(lengths.tolist()):
        n = -(-length // PAGE)
        table[r, :n] = order[taken:taken + n].int()
        taken += n
    query = torch.randn(rows, kv, groups, dim, generator=g)
    prefix = (torch.randn(kv, 7, dim, generator=g), torch.randn(kv, 7, dim, generator=g))
    prompts = None
    if units:
        prompts = triton_decode.UnitPrompts(torch.randn(3, kv, 9, dim, generator=g),
                                            torch.randn(3, kv, 9, dim, generator=g),
                                            torch.tensor([2, 0, 2, 1, 0], dtype=torch.int32))
    moved = [t.to(DEVICE) for t in (query, pool_k, pool_v, table, lengths)]
    query, pool_k, pool_v, table, lengths = moved
    prefix = (prefix[0].to(DEVICE), prefix[1].to(DEVICE))
    if prompts is not None:
        prompts = triton_decode.UnitPrompts(prompts.keys.to(DEVICE), prompts.values.to(DEVICE),
                                            prompts.of_row.to(DEVICE))
    paged = triton_decode.decode_attention_triton(query, pool_k, pool_v, lengths, 0.3, prefix,
                                                  units=prompts, pages=table)
    flat_k, flat_v = gather_pages(pool_k, table), gather_pages(pool_v, table)
    flat = triton_decode.decode_attention_triton(query, flat_k, flat_v, lengths, 0.3, prefix,
                                                 units=prompts)
    assert torch.isfinite(paged).all()
    assert torch.equal(paged, flat)
    # and against SDPA over each row's valid positions
    for r, length in enumerate(lengths.tolist()):
        keys, values = [prefix[0]], [prefix[1]]
        if prompts is not None:
            unit = int(prompts.of_row[r])
            keys.append(prompts.keys[unit])
            values.append(prompts.values[unit])
        keys.append(flat_k[r, :, :length])
        values.append(flat_v[r, :, :length])
        ref = torch.nn.functional.scaled_dot_product_attention(
            query[r:r + 1], torch.cat(keys, 1)[None], torch.cat(values, 1)[None], scale=0.3)
        torch.testing.assert_close(paged[r:r + 1], ref, rtol=1e-5, atol=1e-5)


NEW = 40  # five pages a row


def _stops(model: Any, todo: Any, how: Any) -> list[int]:
    """Tokens called EOS so that answers end at many lengths, some past a page or two."""
    rows = [c.token_ids for u in make(model, [], use_graphs=False).generate(todo, NEW, how)
            for c in u]
    return sorted({r[3] for r in rows[:6]} | {r[17] for r in rows[8:14]}
                  | {r[30] for r in rows[15:20]})


TRITON = [pytest.mark.triton, INTERPRETED]


@pytest.mark.parametrize("how,kernel", [
    pytest.param(0.0, False, id="sdpa-gathered-greedy"),
    pytest.param(Sampling(0.7, top_k=20, top_p=0.9), False, id="sdpa-gathered-t0.7-k20-p0.9"),
    # interpreted (several seconds a step): one small run
    pytest.param(0.0, True, id="triton-pages-greedy", marks=TRITON)])
def test_paged_rows_give_the_eager_answers_while_they_wait_for_pages(
    how: Any, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = lively_llama(seed=4)
    todo = work(make(model, [], use_graphs=False))
    stop = _stops(model, todo, how)
    rows = 8
    if kernel:  # interpreted: fewer samples, fewer rows
        todo, rows = todo[:3], 4
    want = as_lists(make(model, stop, use_graphs=False).generate(todo, NEW, how))
    ends = sorted(len(ids) for unit in want for ids, _ in unit)
    assert ends[0] < PAGE < ends[-1] and (kernel or len(set(ends)) >= 4), ends
    calls: list[bool] = []
    real = triton_decode.decode_attention_triton

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(kwargs.get("pages") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_decode, "decode_attention_triton", counting)
    if not kernel:
        monkeypatch.setattr(triton_decode, "available", lambda tensor: False)
    static = make(model, stop, graph_replay=False, fast_attention=True, share_prefix=True)
    waited = 0
    # (pages, steps of headroom new samples leave): with none, new samples take every page
    # beyond the priority row's reserve, so rows run out and wait
    pools = ((10, 0),) if kernel else ((6, 0), (9, 0), (14, 4), (60, 4))
    for pages, headroom in pools:
        monkeypatch.setattr(refill_mod, "PAGE_HEADROOM_STEPS", headroom)
        got: dict[int, Any] = {}
        refill = generate_stream(static, iter(enumerate(todo)), NEW, how, rows, got.__setitem__,
                                 unit_slots=3, kv_pages=pages)
        assert as_lists([got[i] for i in range(len(todo))]) == want, pages
        pool = refill.pool
        assert pool is not None and pool.pages == pages and pool.per_row == -(-NEW // PAGE)
        assert pool.used == 0 and pool.most_used <= pages  # every page came back
        waited += refill.held_row_steps
        decoder = static._decoder
        assert decoder is not None and decoder.pool is pool
        # the model's static cache holds nothing: views of one position
        layer = list(decoder.cache.layers)[0]
        assert layer.keys.stride(0) == 0 and layer.keys.shape[0] == rows
        assert decoder.kv_pools[0][0].shape[0] == pages + 1
    assert waited > 0, "some rows must have waited for a page"
    assert (set(calls) == {True}) if kernel else not calls  # the path under test ran


def test_a_paged_decoder_needs_unit_slots() -> None:
    model = lively_llama(seed=4)
    static = make(model, [], graph_replay=False, fast_attention=True, share_prefix=True)
    with pytest.raises(ValueError, match="need unit slots"):
        generate_stream(static, iter([]), NEW, 0.0, 4, lambda *a: None, kv_pages=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_paged_refill_on_captured_graphs_gives_the_eager_answers(compiled: bool) -> None:
    """On a GPU, float32: paged rows refilled inside captured graphs (plain and compiled, the
    Triton kernel reading pages) give the eager decode's answers key by key, with rows waiting
    for pages."""
    from test_gpu import real_shape_model
    from test_gpu import units as gpu_units
    from test_graphed_rows import gpu_engines
    from test_refill import varied_stops

    build = gpu_engines(real_shape_model("cuda"))
    how = Sampling(1.0, top_k=40, top_p=0.9)
    refill_mod.PAGE_HEADROOM_STEPS, headroom = 0, refill_mod.PAGE_HEADROOM_STEPS
    with torch.inference_mode():
        free = build([], use_graphs=False)
        todo = gpu_units(free) * 3
        rows = [c.token_ids for unit in free.generate(todo, NEW, how) for c in unit]
        stop, want = varied_stops(rows, lambda eos: as_lists(
            build(eos, use_graphs=False).generate(todo, NEW, how)))
        fast = build(stop, compile_decode=compiled, share_prefix=True)
        got: dict[int, Any] = {}
        try:  # no headroom: rows wait for pages
            refill = generate_stream(fast, iter(enumerate(todo)), NEW, how, 4, got.__setitem__,
                                     unit_slots=3, kv_pages=-(-NEW // PAGE) + 3)
        finally:
            refill_mod.PAGE_HEADROOM_STEPS = headroom
    assert as_lists([got[i] for i in range(len(todo))]) == want
    assert refill.pool is not None and refill.pool.used == 0
    assert fast._decoder is not None and fast._decoder.captures >= 1
    print(f"paged on the GPU: {refill.held_row_steps} row-steps waited, "
          f"{refill.steps} steps")


def test_draws_made_again_after_a_failed_tie_check_keep_paged_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A draw whose top-k tie check fails is undone and its step run again after the next
    step's pages were given: the redraw must skip the rows that waited at that step (and only
    those), or a row draws from a scratch page or twice at once. Every third unchecked draw
    "fails" here, with rows waiting for pages: the answers must be the eager decode's."""
    failing = every_third_check_fails(refill_mod.choose_tokens)
    how = Sampling(0.9, top_k=20, top_p=0.9)
    model = lively_llama(seed=4)
    todo = work(make(model, [], use_graphs=False))
    stop = _stops(model, todo, how)
    want = as_lists(make(model, stop, use_graphs=False).generate(todo, NEW, how))
    monkeypatch.setattr(refill_mod, "choose_tokens", failing)
    monkeypatch.setattr(refill_mod, "PAGE_HEADROOM_STEPS", 0)
    monkeypatch.setattr(triton_decode, "available", lambda tensor: False)
    static = make(model, stop, graph_replay=False, fast_attention=True, share_prefix=True)
    waited = redraws = 0
    for pages in (6, 9):
        got: dict[int, Any] = {}
        refill = generate_stream(static, iter(enumerate(todo)), NEW, how, 8, got.__setitem__,
                                 unit_slots=3, kv_pages=pages)
        assert as_lists([got[i] for i in range(len(todo))]) == want, pages
        assert refill.pool is not None and refill.pool.used == 0
        waited += refill.held_row_steps
        redraws += refill.redraws
    assert waited > 0 and redraws >= 10
