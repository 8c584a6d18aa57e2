"""The Triton decode-attention kernel against SDPA on the valid part of the cache (on the CPU it
runs in Triton's interpreter, which conftest.py turns on)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patchdb.generate import triton_decode
from patchdb.generate.attention import cache_length, decode_attention

pytestmark = [pytest.mark.skipif(triton_decode.triton is None, reason="Triton is not installed"),
              pytest.mark.triton]


class Heads(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


# On a GPU the tests run the compiled kernel; elsewhere Triton's interpreter, where bfloat16 is
# mishandled (float16 stands in).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,groups,dim,length", [
    (2, 1, 16, 1), (2, 2, 32, 64), (1, 4, 16, 65), (3, 8, 64, 100), (2, 16, 16, 128),
])
def test_kernel_matches_sdpa_over_the_valid_positions(
    dtype: torch.dtype, kv_heads: int, groups: int, dim: int, length: int
) -> None:
    g = torch.Generator().manual_seed(length * 7 + groups)
    batch, max_len = 3, 130
    query = torch.randn(batch, kv_heads, groups, dim, generator=g).to(DEVICE, dtype)
    key = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE, dtype)
    value = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE, dtype)
    key[:, :, length:] = 1e4  # stale cache beyond the valid length must not count
    out = triton_decode.decode_attention_triton(
        query, key, value, torch.tensor(length, dtype=torch.int32, device=DEVICE), 0.2)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key[:, :, :length].float(), value[:, :, :length].float(), scale=0.2)
    assert out.shape == query.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_decode_attention_uses_the_kernel_while_a_length_is_set() -> None:
    g = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, max_len, dim = 2, 4, 2, 40, 16
    query = torch.randn(batch, heads, 1, dim, generator=g).to(DEVICE)
    key = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE)
    value = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE)
    mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=DEVICE)
    mask[..., :30] = True
    module = Heads(heads // kv_heads)
    by_mask, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    with cache_length(torch.tensor(30, dtype=torch.int32, device=DEVICE)):
        by_kernel, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(by_kernel, by_mask, rtol=1e-5, atol=1e-5)
    # the kernel follows the length it is given, not the mask
    with cache_length(torch.tensor(12, dtype=torch.int32, device=DEVICE)):
        shorter, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    mask[..., 12:] = False
    expected, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(shorter, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shorter, by_mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix_len,length", [(1, 1), (64, 30), (100, 65)])
def test_kernel_attends_to_a_shared_prefix_then_each_rows_own(
    dtype: torch.dtype, prefix_len: int, length: int
) -> None:
    g = torch.Generator().manual_seed(prefix_len + length)
    batch, kv_heads, groups, dim, max_len = 3, 2, 4, 32, 80
    query = torch.randn(batch, kv_heads, groups, dim, generator=g).to(DEVICE, dtype)
    key = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE, dtype)
    value = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE, dtype)
    p_key = torch.randn(kv_heads, prefix_len, dim, generator=g).to(DEVICE, dtype)
    p_value = torch.randn(kv_heads, prefix_len, dim, generator=g).to(DEVICE, dtype)
    out = triton_decode.decode_attention_triton(
        query, key, value, torch.tensor(length, dtype=torch.int32, device=DEVICE), 0.2,
        (p_key, p_value))
    full_k = torch.cat([p_key.expand(batch, -1, -1, -1), key[:, :, :length]], dim=2)
    full_v = torch.cat([p_value.expand(batch, -1, -1, -1), value[:, :, :length]], dim=2)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query.float(), full_k.float(), full_v.float(), scale=0.2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def masked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                lengths: list[int], scale: float,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                window: int | None = None) -> torch.Tensor:
    """SDPA in float64 on the CPU over [prefix, own cache] with a per-row mask built from positions: row i
    sees the prefix and its first lengths[i] own positions, and, with a window, only positions
    after its query's position minus the window (the query sits at the last seen position)."""
    batch = query.shape[0]
    p_len = prefix[0].shape[1] if prefix is not None else 0
    keys, values = key.cpu().double(), value.cpu().double()
    if prefix is not None:
        keys = torch.cat([prefix[0].cpu().double().expand(batch, -1, -1, -1), keys], dim=2)
        values = torch.cat([prefix[1].cpu().double().expand(batch, -1, -1, -1), values], dim=2)
    at = torch.arange(keys.shape[2])
    mask = torch.stack([at < p_len + n for n in lengths])
    if window is not None:
        query_at = torch.tensor([p_len + n - 1 for n in lengths])
        mask &= at[None, :] > query_at[:, None] - window
    return torch.nn.functional.scaled_dot_product_attention(
        query.cpu().double(), keys, values, attn_mask=mask[:, None, None, :], scale=scale
    ).to(query.device, torch.float32)


def gemma_like(batch: int, groups: int, max_len: int, prefix_len: int, dtype: torch.dtype,
               seed: int) -> tuple[torch.Tensor, ...]:
    """Query, keys, values (and prefix keys and values) of a small grouped-query layer, with
    stale cache entries large enough to show if a masked position is ever read."""
    g = torch.Generator().manual_seed(seed)
    kv_heads, dim = 2, 32
    query = torch.randn(batch, kv_heads, groups, dim, generator=g).to(DEVICE, dtype)
    key = (torch.randn(batch, kv_heads, max_len, dim, generator=g) * 3).to(DEVICE, dtype)
    value = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE, dtype)
    p_key = (torch.randn(kv_heads, prefix_len, dim, generator=g) * 3).to(DEVICE, dtype)
    p_value = torch.randn(kv_heads, prefix_len, dim, generator=g).to(DEVICE, dtype)
    return query, key, value, p_key, p_value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups,prefix_len", [(2, 0), (2, 37), (4, 20), (1, 5)])
def test_rows_of_different_lengths_each_see_only_their_own(
    dtype: torch.dtype, groups: int, prefix_len: int
) -> None:
    # 11 rows: more than one program's worth (8 rows of 2 query heads) and not a multiple of it
    batch, max_len = 11, 70
    query, key, value, p_key, p_value = gemma_like(batch, groups, max_len, prefix_len, dtype, 3)
    lengths = [1, 70, 33, 2, 64, 65, 17, 40, 9, 31, 70]
    for i, n in enumerate(lengths):
        key[i, :, n:] = 1e4  # a row's stale positions must not count
    prefix = (p_key, p_value) if prefix_len else None
    out = triton_decode.decode_attention_triton(
        query, key, value, torch.tensor(lengths, dtype=torch.int32, device=DEVICE), 0.2, prefix)
    ref = masked_sdpa(query, key, value, lengths, 0.2, prefix)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,ragged", [(1, False), (30, False), (50, True), (90, True)])
def test_a_window_keeps_only_the_last_positions_prefix_included(
    dtype: torch.dtype, window: int, ragged: bool
) -> None:
    batch, max_len, prefix_len = 5, 60, 40
    query, key, value, p_key, p_value = gemma_like(batch, 2, max_len, prefix_len, dtype, window)
    lengths = [12, 60, 1, 35, 47] if ragged else [45] * batch
    length = torch.tensor(lengths if ragged else 45, dtype=torch.int32, device=DEVICE)
    out = triton_decode.decode_attention_triton(
        query, key, value, length, 0.2, (p_key, p_value), window=window)
    ref = masked_sdpa(query, key, value, lengths, 0.2, (p_key, p_value), window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    # the window changed the answer: without it every row sees its whole cache
    assert not torch.allclose(out.float(), masked_sdpa(query, key, value, lengths, 0.2,
                                                       (p_key, p_value)), atol=1e-3)


@pytest.mark.parametrize("tuning", [
    triton_decode.Tuning(16, 16, 4, 2), triton_decode.Tuning(32, 32, 4, 3),
    triton_decode.Tuning(64, 64, 8, 2), triton_decode.Tuning(16, 128, 2, 1),
])
def test_every_launch_shape_gives_the_same_attention(tuning: triton_decode.Tuning) -> None:
    # 19 rows of 2 query heads: 1 to 3 programs, the last partly empty, whatever the shape
    batch, max_len, prefix_len = 19, 50, 30
    query, key, value, p_key, p_value = gemma_like(batch, 2, max_len, prefix_len, torch.float32, 8)
    lengths = [(7 * i) % 50 + 1 for i in range(batch)]
    out = triton_decode.decode_attention_triton(
        query, key, value, torch.tensor(lengths, dtype=torch.int32, device=DEVICE), 0.2, (p_key, p_value),
        tuning=tuning)
    ref = masked_sdpa(query, key, value, lengths, 0.2, (p_key, p_value))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", [(16, 1), (32, 1), (64, 2), (128, 1)])
@pytest.mark.parametrize("prefix_len,window", [(147, None), (30, None), (100, 40)])
def test_the_prefix_loop_gives_the_same_attention_at_any_block(
    monkeypatch: pytest.MonkeyPatch, prefix: tuple[int, int], prefix_len: int,
    window: int | None
) -> None:
    # The prefix's own block and stages (triton_decode.PREFIX), with the prefix ending inside a
    # block or not, ragged rows, and a window that starts inside the prefix.
    monkeypatch.setattr(triton_decode, "PREFIX", prefix)
    batch, max_len = 9, 40
    query, key, value, p_key, p_value = gemma_like(batch, 2, max_len, prefix_len, torch.float32, 6)
    lengths = [(11 * i) % 40 + 1 for i in range(batch)]
    out = triton_decode.decode_attention_triton(
        query, key, value, torch.tensor(lengths, dtype=torch.int32, device=DEVICE), 0.2,
        (p_key, p_value), window=window)
    ref = masked_sdpa(query, key, value, lengths, 0.2, (p_key, p_value), window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_lengths_must_be_one_or_one_a_row() -> None:
    query, key, value, _, _ = gemma_like(3, 2, 8, 0, torch.float32, 1)
    with pytest.raises(ValueError, match="one length per row"):
        triton_decode.decode_attention_triton(
            query, key, value, torch.tensor([4, 4], dtype=torch.int32, device=DEVICE), 0.2)


def test_decode_attention_gives_the_kernel_a_sliding_layers_window() -> None:
    g = torch.Generator().manual_seed(9)
    batch, heads, kv_heads, max_len, dim, window = 2, 4, 2, 40, 16, 8
    query = torch.randn(batch, heads, 1, dim, generator=g).to(DEVICE)
    key = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE)
    value = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(DEVICE)
    # the mask a sliding layer gets for a query at position 29: positions 22..29
    mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=DEVICE)
    mask[..., 30 - window:30] = True
    module = Heads(heads // kv_heads)
    by_mask, _ = decode_attention(module, query, key, value, mask, scaling=0.25,
                                  sliding_window=window)
    with cache_length(torch.tensor(30, dtype=torch.int32, device=DEVICE)):
        by_kernel, _ = decode_attention(module, query, key, value, mask, scaling=0.25,
                                        sliding_window=window)
    torch.testing.assert_close(by_kernel, by_mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("of_row,ragged", [
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], False),  # one unit: each program reads its prompt once
    ([2, 2, 0, 1, 2, 1, 1, 0, 3, 3, 2], True),  # a unit again after another, rows of 2 programs
    ([3, 1, 0, 2, 4, 1, 3, 3, 0, 0, 4], True),
])
def test_rows_read_their_own_units_prompt_between_prefix_and_own_cache(
    dtype: torch.dtype, of_row: list[int], ragged: bool
) -> None:
    batch, max_len, prefix_len, unit_len, n_units = 11, 70, 21, 37, 5
    query, key, value, p_key, p_value = gemma_like(batch, 2, max_len, prefix_len, dtype, 4)
    g = torch.Generator().manual_seed(6)
    u_key = (torch.randn(n_units, 2, unit_len, 32, generator=g) * 3).to(DEVICE, dtype)
    u_value = torch.randn(n_units, 2, unit_len, 32, generator=g).to(DEVICE, dtype)
    lengths = [1, 70, 33, 2, 64, 65, 17, 40, 9, 31, 70] if ragged else [45] * batch
    for i, n in enumerate(lengths):
        key[i, :, n:] = 1e4
    units = triton_decode.UnitPrompts(u_key, u_value,
                                      torch.tensor(of_row, dtype=torch.int32, device=DEVICE))
    length = torch.tensor(lengths if ragged else 45, dtype=torch.int32, device=DEVICE)
    out = triton_decode.decode_attention_triton(query, key, value, length, 0.2,
                                                (p_key, p_value), units=units)
    # the reference: each row's unit prompt joined to its own cache, after the prefix
    joined_k = torch.cat([u_key[of_row], key], dim=2)
    joined_v = torch.cat([u_value[of_row], value], dim=2)
    ref = masked_sdpa(query, joined_k, joined_v, [unit_len + n for n in lengths], 0.2,
                      (p_key, p_value))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ragged", [False, True])
def test_the_order_rows_are_taken_in_changes_no_row(dtype: torch.dtype, ragged: bool) -> None:
    """Programs take rows in a given order (rows of one unit together share a read of its
    prompt): every row's output is what it is in batch order, exactly on a GPU, for any
    permutation."""
    batch, max_len, prefix_len, unit_len, n_units = 11, 70, 21, 37, 4
    query, key, value, p_key, p_value = gemma_like(batch, 2, max_len, prefix_len, dtype, 4)
    g = torch.Generator().manual_seed(8)
    u_key = (torch.randn(n_units, 2, unit_len, 32, generator=g) * 3).to(DEVICE, dtype)
    u_value = torch.randn(n_units, 2, unit_len, 32, generator=g).to(DEVICE, dtype)
    of_row = torch.tensor([2, 0, 3, 1, 2, 0, 1, 3, 2, 0, 1], dtype=torch.int32, device=DEVICE)
    lengths = [1, 70, 33, 2, 64, 65, 17, 40, 9, 31, 70] if ragged else [45] * batch
    for i, n in enumerate(lengths):
        key[i, :, n:] = 1e4  # stale entries: read by mistake, they would show
    length = torch.tensor(lengths if ragged else 45, dtype=torch.int32, device=DEVICE)

    def attend(order: list[int] | None) -> torch.Tensor:
        ordered = None if order is None else torch.tensor(order, dtype=torch.int32,
                                                           device=DEVICE)
        units = triton_decode.UnitPrompts(u_key, u_value, of_row, ordered)
        return triton_decode.decode_attention_triton(query, key, value, length, 0.2,
                                                     (p_key, p_value), units=units)

    plain = attend(None)
    by_unit = sorted(range(batch), key=lambda r: (int(of_row[r]), r))
    shuffled = torch.randperm(batch, generator=torch.Generator().manual_seed(3)).tolist()
    assert by_unit != list(range(batch)) and shuffled != list(range(batch))
    for order in (by_unit, shuffled, list(range(batch))[::-1]):
        if DEVICE == "cuda":
            assert torch.equal(attend(order), plain), order
        else:
            # Triton's interpreter runs tl.dot through numpy's BLAS, whose kernels on some CPUs
            # (AVX2 ones, not the generic) round a line by its place in the block: a few ulps.
            # A row read against another row's cache or unit would be off by far more.
            torch.testing.assert_close(attend(order), plain, atol=1e-5,
                                       rtol=1e-5 if dtype == torch.float32 else 1e-3,
                                       msg=lambda m, order=order: f"{order}: {m}")
    # and batch order is right to begin with
    ref = masked_sdpa(query, torch.cat([u_key[of_row.long()], key], dim=2),
                      torch.cat([u_value[of_row.long()], value], dim=2),
                      [unit_len + n for n in lengths], 0.2, (p_key, p_value))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(plain.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("ragged", [False, True])
def test_a_row_past_two_to_the_31_elements_is_read_where_it_is(ragged: bool) -> None:
    """A cache whose row stride fits in 32 bits while a row's offset does not (three rows of
    2**30 + 128 elements: the third starts past 2**31). Its offset must be computed in 64 bits;
    in 32 it wraps to a negative address (the interpreter faults, a GPU reads another row).
    Only the few positions written are touched: the rest of the two 6 GiB tensors stays
    unallocated on the CPU."""
    batch, max_len, dim, n = 3, (1 << 23) + 1, 128, 5
    key = torch.empty(batch, 1, max_len, dim, dtype=torch.float16, device=DEVICE)
    value = torch.empty_like(key)
    assert key.stride(0) < 1 << 31 <= 2 * key.stride(0)
    g = torch.Generator().manual_seed(31)
    key[:, :, :n] = torch.randn(batch, 1, n, dim, generator=g).to(DEVICE, key.dtype)
    value[:, :, :n] = torch.randn(batch, 1, n, dim, generator=g).to(DEVICE, key.dtype)
    query = torch.randn(batch, 1, 2, dim, generator=g).to(DEVICE, key.dtype)
    lengths = [n, 2, n] if ragged else n
    length = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out = triton_decode.decode_attention_triton(query, key, value, length, 0.1)
    ref = masked_sdpa(query, key[:, :, :n].contiguous(), value[:, :, :n].contiguous(),
                      lengths if ragged else [n] * batch, 0.1)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_a_row_order_needs_an_entry_a_row() -> None:
    query, key, value, p_key, p_value = gemma_like(5, 2, 16, 4, torch.float32, 2)
    u = torch.zeros(1, 2, 3, 32, device=DEVICE)
    of_row = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    short = triton_decode.UnitPrompts(u, u, of_row, torch.arange(4, dtype=torch.int32,
                                                                 device=DEVICE))
    with pytest.raises(ValueError, match="one contiguous entry a row"):
        triton_decode.decode_attention_triton(query, key, value,
                                              torch.tensor(8, dtype=torch.int32, device=DEVICE),
                                              0.2, (p_key, p_value), units=short)


def no_write() -> None:
    raise AssertionError("the kernel stores the new keys itself")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ordered", [False, True])
def test_the_kernel_stores_the_steps_keys_before_it_reads_them(dtype: torch.dtype,
                                                               ordered: bool) -> None:
    """Handed this step's keys and values (kv_writes.NewKV), the kernel stores each row's at its
    last valid position (its length less one), and reads them there: the cache ends as a
    scatter leaves it and the output is exactly the kernel's on that cache, rows taken in any
    order."""
    from patchdb.generate.kv_writes import NewKV

    batch, max_len, unit_len, n_units = 11, 70, 9, 3
    query, key, value, p_key, p_value = gemma_like(batch, 2, max_len, 13, dtype, 6)
    g = torch.Generator().manual_seed(9)
    new_k = (torch.randn(batch, 2, 1, 32, generator=g) * 3).to(DEVICE, dtype)
    new_v = torch.randn(batch, 2, 1, 32, generator=g).to(DEVICE, dtype)
    lengths = [1, 70, 33, 2, 64, 65, 17, 40, 9, 31, 70]
    slots = torch.tensor(lengths, device=DEVICE) - 1
    of_row = torch.tensor([2, 0, 1, 1, 2, 0, 1, 0, 2, 0, 1], dtype=torch.int32, device=DEVICE)
    order = (torch.randperm(batch, generator=torch.Generator().manual_seed(4)).int().to(DEVICE)
             if ordered else None)
    units = triton_decode.UnitPrompts(
        (torch.randn(n_units, 2, unit_len, 32, generator=g) * 3).to(DEVICE, dtype),
        torch.randn(n_units, 2, unit_len, 32, generator=g).to(DEVICE, dtype), of_row, order)
    length = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    want_k, want_v = key.clone(), value.clone()
    rows = torch.arange(batch, device=DEVICE)
    want_k[rows, :, slots] = new_k[:, :, 0]
    want_v[rows, :, slots] = new_v[:, :, 0]
    want = triton_decode.decode_attention_triton(query, want_k, want_v, length, 0.2,
                                                 (p_key, p_value), units=units)
    assert not torch.equal(key, want_k)  # the slots held something else before
    got = triton_decode.decode_attention_triton(
        query, key, value, length, 0.2, (p_key, p_value), units=units,
        new=NewKV(0, new_k, new_v, no_write))
    assert torch.equal(key, want_k) and torch.equal(value, want_v)
    assert torch.equal(got, want)


def test_rows_at_one_length_store_the_steps_keys_at_that_position() -> None:
    """With one length for every row (a scalar), each row's new key goes to that position less
    one of its own cache."""
    from patchdb.generate.kv_writes import NewKV

    batch, max_len = 5, 40
    query, key, value, p_key, p_value = gemma_like(batch, 2, max_len, 7, torch.float32, 3)
    g = torch.Generator().manual_seed(2)
    new_k = torch.randn(batch, 2, 1, 32, generator=g).to(DEVICE)
    new_v = torch.randn(batch, 2, 1, 32, generator=g).to(DEVICE)
    length = torch.tensor(23, dtype=torch.int32, device=DEVICE)
    want_k, want_v = key.clone(), value.clone()
    want_k[:, :, 22] = new_k[:, :, 0]
    want_v[:, :, 22] = new_v[:, :, 0]
    want = triton_decode.decode_attention_triton(query, want_k, want_v, length, 0.2,
                                                 (p_key, p_value))
    got = triton_decode.decode_attention_triton(query, key, value, length, 0.2, (p_key, p_value),
                                                new=NewKV(0, new_k, new_v, no_write))
    assert torch.equal(key, want_k) and torch.equal(value, want_v)
    assert torch.equal(got, want)


def test_the_kernel_stores_a_paged_steps_keys_in_each_rows_page() -> None:
    """With pages, row r's new key goes to its last valid position through the page table: pool
    page table[r, (length - 1) // PAGE] at offset (length - 1) % PAGE; the rows read them back
    through the table."""
    from patchdb.generate.kv_writes import NewKV
    from patchdb.generate.pages import PAGE, gather_pages

    g = torch.Generator().manual_seed(5)
    rows, kv, groups, dim, n_pages = 4, 2, 2, 16, 20
    pool_k = torch.randn(n_pages + 1, kv, PAGE, dim, generator=g).to(DEVICE)
    pool_v = torch.randn(n_pages + 1, kv, PAGE, dim, generator=g).to(DEVICE)
    lengths = torch.tensor([3, 9, 16, 30], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[5, 0, 0, 0], [2, 7, 0, 0], [11, 3, 0, 0], [4, 9, 1, 6]],
                         dtype=torch.int32, device=DEVICE)
    pos = (lengths - 1).long()
    page = table.gather(1, (pos // PAGE).view(-1, 1)).view(-1).long()
    offset = pos % PAGE
    query = torch.randn(rows, kv, groups, dim, generator=g).to(DEVICE)
    new_k = torch.randn(rows, kv, 1, dim, generator=g).to(DEVICE)
    new_v = torch.randn(rows, kv, 1, dim, generator=g).to(DEVICE)
    want_k, want_v = pool_k.clone(), pool_v.clone()
    want_k[page, :, offset] = new_k[:, :, 0]
    want_v[page, :, offset] = new_v[:, :, 0]
    got = triton_decode.decode_attention_triton(query, pool_k, pool_v, lengths, 0.3,
                                                pages=table,
                                                new=NewKV(0, new_k, new_v, no_write))
    assert torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)
    flat = triton_decode.decode_attention_triton(query, gather_pages(want_k, table),
                                                 gather_pages(want_v, table), lengths, 0.3)
    assert torch.equal(got, flat)
    with pytest.raises(ValueError, match="a row each and this cache's heads"):
        triton_decode.decode_attention_triton(query, pool_k, pool_v, lengths, 0.3, pages=table,
                                              new=NewKV(0, new_k[:, :1], new_v[:, :1], no_write))


def test_the_kernel_compiles_for_an_h100_or_h200(tmp_path: Path) -> None:
    """Triton's compiler and NVIDIA's ptxas take the variants a decode step launches, for sm_90
    (scripts/compile_kernel.py, in a fresh compile cache): the interpreter above runs the
    kernel's arithmetic, but not what the compiler would reject."""
    nvidia = pytest.importorskip("triton.backends.nvidia")
    if not (Path(nvidia.__file__).parent / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernel.py"
    done = subprocess.run([sys.executable, str(script), "--arch", "90"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 variants compiled for sm_90" in done.stdout
    assert any(tmp_path.iterdir())  # compiled here, not taken from an earlier cache
    # compiled as the launcher specialises the arguments, the step's loads are pipelined
    step = next(line for line in done.stdout.splitlines()
                if line.startswith("sm_90 bf16 RAGGED UNITS ORDERED WRITE:"))
    assert "loads pipelined" in step, step
    if (Path(nvidia.__file__).parent / "bin" / "cuobjdump").exists():
        assert re.search(r"\d+ registers \(\d+ B spill stack\), \d+ programs a multiprocessor",
                         step), step
