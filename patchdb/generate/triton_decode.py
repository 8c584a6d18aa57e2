"""A Triton kernel for the decode step's attention: one query token per row against a static
KV cache whose valid length is a device tensor (so a captured CUDA graph can replay it).

One program takes a few rows of one KV head, holding every query head of those rows that shares
the head (grouped-query attention) as one block of at least 16 query lines, the smallest tl.dot
takes. It reads the prefix every row shares (when there is one) once for all its rows, each
unit's prompt (with unit slots) once for all its rows of that unit, then streams each row's own
keys and values once, in blocks, with an online softmax; rows of different lengths take only
their own blocks (on an H100, 89 against 136 us a layer for 403 ragged rows). The first
layout, one program per row and KV head, read the shared prefix again for every row (from L2, but
more bytes than the rows' own cache): on an H200 at 1,040 rows, a 150-position prefix and 77 own
positions, 0.48 ms a layer against 0.20 ms now (docs/performance.md, scripts/probe_decode.py).
(Reading the rows' own caches side by side instead, a few positions of every row a step, ran
faster outside the model but 7% slower in it on an H100: docs/performance.md.)

Handed the step's new keys and values (kv_writes.NewKV), a program first stores those of its
rows for its head at each row's last valid position (found from the lengths and, paged, the
page table it reads anyway), then reads them with the rest: the step needs no scatter kernels
of its own (two a layer).

Lengths are one int32 scalar (every row at the same step) or one per row (ragged rows);
`window` keeps only the last `window` positions before and at the query, as a sliding-window
layer does. Triton is optional: it ships with CUDA builds of torch. Without it (or on the CPU)
`available()` is False and attention.py uses PyTorch's SDPA instead.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from patchdb.generate.kv_writes import NewKV

try:  # pragma: no cover - depends on the torch build
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

NO_WINDOW = 1 << 30


@dataclass(frozen=True)
class UnitPrompts:
    """Prompt keys and values kept once per unit ([n_units, kv_heads, unit_len, d]), the unit
    of each row (int32 or int64 [rows]) and, optionally, the order in which programs take the
    rows (a permutation of range(rows), int32): rows of one unit side by side in it share one
    read of the unit's prompt, wherever they sit in the batch (continuous batching scatters a
    unit's samples over the rows that came free)."""

    keys: torch.Tensor
    values: torch.Tensor
    of_row: torch.Tensor
    order: torch.Tensor | None = None


@dataclass(frozen=True)
class Tuning:
    """Launch shape: `lines` query lines a program holds (rows x padded query heads per KV head,
    at least 16), `block` cache positions per step, and Triton's num_warps / num_stages."""

    lines: int = 16
    block: int = 32
    warps: int = 2
    stages: int = 3


DEFAULT = Tuning()  # the fastest at 1,040 rows in two sweeps on an H200 (scripts/probe_decode.py)
# The shared prefix's loop: positions a step and pipeline stages, where not the tuning's block
# and stages (None). Every program reads the prefix (147 positions of the default prompt, from
# L2): 5 of a program's ~23 steps at 32 positions. Compiled for sm_90, 64 positions in 2 stages
# keep the default's 184 registers and 5 programs a multiprocessor; 32 unpipelined take 168 and
# 6 (scripts/compile_kernel.py).
PREFIX: tuple[int, int] | None = None


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernel can run on this tensor's device (CUDA, or Triton's CPU interpreter)."""
    if triton is None:
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:  # pragma: no cover - compiled for the GPU, or interpreted in tests

    @triton.jit
    def _update(q, k, v, seen, scale, best, total, acc, IEEE: tl.constexpr):
        """One block of the online softmax: scores of every query line against the block's
        keys, kept where `seen` ([lines, block]) holds, folded into best/total/acc."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(seen, s * scale, float("-inf"))
        # best starts finite (-1e30), so a line that sees nothing in a block keeps its state
        # exactly: alpha is exp(0) and p is 0.
        new_best = tl.maximum(best, tl.max(s, 1))
        alpha = tl.exp(best - new_best)
        p = tl.exp(s - new_best[:, None])
        total = total * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return new_best, total, acc

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, len_ptr,
                       uk_ptr, uv_ptr, unit_ptr, order_ptr, table_ptr,
                       nk_ptr, nv_ptr,
                       batch, prefix_len, unit_len, window, scale, s_len, s_unit,
                       s_qb, s_qh, s_qg, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                       s_pkh, s_pkl, s_pvh, s_pvl, s_ob, s_oh, s_og,
                       s_ukb, s_ukh, s_ukl, s_uvb, s_uvh, s_uvl, s_tb,
                       s_nkb, s_nkh, s_nvb, s_nvh,
                       GROUPS: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr,
                       LINES: tl.constexpr, DIM: tl.constexpr, BLOCK_L: tl.constexpr,
                       RAGGED: tl.constexpr, UNITS: tl.constexpr, ORDERED: tl.constexpr,
                       PAGE: tl.constexpr, WRITE: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_P: tl.constexpr, P_STAGES: tl.constexpr):
        first = tl.program_id(0) * ROWS
        head = tl.program_id(1)
        line = tl.arange(0, LINES)
        local = line // G_PAD  # which of the program's rows a query line belongs to
        g = line % G_PAD
        place = first + local  # the line's place in the order rows are taken in
        ok = (g < GROUPS) & (local < ROWS) & (place < batch)
        safe_row = tl.minimum(place, batch - 1)
        if ORDERED:  # the program's rows are order[first:first + ROWS]
            safe_row = tl.load(order_ptr + safe_row)
        d = tl.arange(0, DIM)
        offs = tl.arange(0, BLOCK_L)
        q = tl.load(q_ptr + safe_row[:, None] * s_qb + head * s_qh + g[:, None] * s_qg + d[None, :],
                    mask=ok[:, None], other=0.0)
        lead = ok & (g == 0)  # each row's first line stands for the row
        lens = tl.load(len_ptr + safe_row * s_len)  # each line's row length
        lens = tl.where(ok, lens, 0)
        if WRITE:
            # This step's key and value of each of the program's rows (for this head) go to the
            # row's last valid position (its length less one) first: in its own cache row, or,
            # with PAGE, at that position's page of the page table. No other program reads them;
            # the barrier makes them visible to this one's threads. Only a row's lead line
            # stores (the masks); other lines, and lines past the batch (length 0), store nothing.
            wpos = (lens - 1).to(tl.int64)
            if PAGE:
                wrow = tl.load(table_ptr + safe_row * s_tb + wpos // PAGE, mask=lead,
                               other=0).to(tl.int64)
                wpos = wpos % PAGE
            else:
                wrow = safe_row.to(tl.int64)
            nk = tl.load(nk_ptr + safe_row[:, None].to(tl.int64) * s_nkb + head * s_nkh
                         + d[None, :], mask=lead[:, None], other=0.0)
            nv = tl.load(nv_ptr + safe_row[:, None].to(tl.int64) * s_nvb + head * s_nvh
                         + d[None, :], mask=lead[:, None], other=0.0)
            tl.store(k_ptr + wrow[:, None] * s_kb + head * s_kh + wpos[:, None] * s_kl + d[None, :],
                     nk, mask=lead[:, None])
            tl.store(v_ptr + wrow[:, None] * s_vb + head * s_vh + wpos[:, None] * s_vl + d[None, :],
                     nv, mask=lead[:, None])
            tl.debug_barrier()
        # the first position (prefix positions count first, then the unit's prompt) a line's
        # query sees
        lowest = prefix_len + unit_len + lens - window
        best = tl.full([LINES], -1e30, tl.float32)
        total = tl.zeros([LINES], tl.float32)
        acc = tl.zeros([LINES, DIM], tl.float32)
        # The shared prefix: every line of the program against each block, read once for all.
        pk_base = pk_ptr + head * s_pkh
        pv_base = pv_ptr + head * s_pvh
        offs_p = tl.arange(0, BLOCK_P)
        for start in tl.range(0, prefix_len, BLOCK_P, num_stages=P_STAGES):
            pos = start + offs_p
            inside = pos < prefix_len
            k = tl.load(pk_base + pos[:, None] * s_pkl + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(pv_base + pos[:, None] * s_pvl + d[None, :], mask=inside[:, None], other=0.0)
            seen = ok[:, None] & inside[None, :] & (pos[None, :] >= lowest[:, None])
            best, total, acc = _update(q, k, v, seen, scale, best, total, acc, IEEE)
        if UNITS:
            # Each unit's prompt (kept once per unit), read once for all the program's rows of
            # that unit: a unit's first row here leads it, and a block of the unit's prompt
            # updates the lines of every row of the unit.
            unit_line = tl.load(unit_ptr + safe_row * s_unit, mask=ok, other=-1)
            earlier = ((unit_line[:, None] == unit_line[None, :])
                       & (local[None, :] < local[:, None]) & ok[None, :])
            leads = lead & (tl.sum(earlier.to(tl.int32), 1) == 0)
            rank = tl.cumsum(leads.to(tl.int32), 0) - 1  # a leading line's place among them
            ublocks = tl.cdiv(unit_len, BLOCK_L)
            for step in range(0, tl.sum(leads.to(tl.int32), 0) * ublocks):
                j = step // ublocks
                start = (step - j * ublocks) * BLOCK_L
                unit = tl.sum(tl.where(leads & (rank == j), unit_line, 0), 0)
                mine = ok & (unit_line == unit)
                pos = start + offs
                inside = pos < unit_len
                k = tl.load(uk_ptr + unit * s_ukb + head * s_ukh + pos[:, None] * s_ukl
                            + d[None, :], mask=inside[:, None], other=0.0)
                v = tl.load(uv_ptr + unit * s_uvb + head * s_uvh + pos[:, None] * s_uvl
                            + d[None, :], mask=inside[:, None], other=0.0)
                seen = (mine[:, None] & inside[None, :]
                        & (prefix_len + pos[None, :] >= lowest[:, None]))
                best, total, acc = _update(q, k, v, seen, scale, best, total, acc, IEEE)
        # Each row's own cache, the rows one after another in one pipelined loop: a block of
        # row r updates only r's lines. Ragged rows take only their own blocks (the loop runs
        # over the sum of the rows' block counts, not rows x the longest's).
        if RAGGED:
            row_blocks = tl.where(lead, tl.cdiv(lens, BLOCK_L), 0)
            ends = tl.cumsum(row_blocks, 0)  # blocks up to and including each line's row
            steps = tl.sum(row_blocks, 0)
        else:
            longest = tl.max(lens, 0)
            steps = ROWS * tl.cdiv(longest, BLOCK_L)
        for step in range(0, steps):
            if RAGGED:
                # the row this block is of: rows whose blocks all come before it
                r = tl.sum((lead & (ends <= step)).to(tl.int32), 0)
                at_r = lead & (local == r)
                start = (step - tl.sum(tl.where(at_r, ends - row_blocks, 0), 0)) * BLOCK_L
                length = tl.sum(tl.where(at_r, lens, 0), 0)
            else:
                blocks = tl.cdiv(longest, BLOCK_L)
                r = step // blocks
                start = (step - r * blocks) * BLOCK_L
                length = tl.where(first + r < batch, longest, 0)
            mine = ok & (local == r)
            # the batch row of the program's r-th row (its lead line's), row 0 past the batch
            this_row = tl.sum(tl.where(lead & (local == r), safe_row, 0), 0)
            pos = start + offs
            inside = pos < length
            if PAGE:  # paged: position p is at offset p % PAGE of the row's page p // PAGE
                page = tl.load(table_ptr + this_row * s_tb + pos // PAGE, mask=inside,
                               other=0).to(tl.int64)
                k_at = page[:, None] * s_kb + (pos % PAGE)[:, None] * s_kl
                v_at = page[:, None] * s_vb + (pos % PAGE)[:, None] * s_vl
            else:
                k_at = this_row.to(tl.int64) * s_kb + pos[:, None] * s_kl
                v_at = this_row.to(tl.int64) * s_vb + pos[:, None] * s_vl
            k = tl.load(k_ptr + k_at + head * s_kh + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_ptr + v_at + head * s_vh + d[None, :], mask=inside[:, None], other=0.0)
            seen = (mine[:, None] & inside[None, :]
                    & (prefix_len + unit_len + pos[None, :] >= lowest[:, None]))
            best, total, acc = _update(q, k, v, seen, scale, best, total, acc, IEEE)
        out = acc / tl.where(ok, total, 1.0)[:, None]  # lines outside the batch stay unstored
        tl.store(o_ptr + safe_row[:, None] * s_ob + head * s_oh + g[:, None] * s_og + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=ok[:, None])


def on_card(tensor: torch.Tensor) -> Any:
    """Launch on the tensor's card (Triton launches on the current one): a model spread over
    cards has layers, and logits, on others."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


@cache
def _multiprocessors(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def rows_per_program(batch: int, kv_heads: int, lines: int, g_pad: int,
                     multiprocessors: int) -> int:
    """Rows a program takes: as many as its query lines hold, fewer where that would leave
    the GPU's multiprocessors with under four programs each (none given: no such floor). A
    launch has cdiv(batch, rows) x kv_heads programs."""
    rows = max(1, lines // g_pad)
    while rows > 1 and -(-batch // rows) * kv_heads < 4 * multiprocessors:
        rows //= 2
    return rows


def _rows_per_program(query: torch.Tensor, lines: int, g_pad: int) -> int:
    batch, kv_heads = query.shape[:2]
    return rows_per_program(batch, kv_heads, lines, g_pad,
                            _multiprocessors(query.device.index or 0) if query.is_cuda else 0)


def decode_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            length: torch.Tensor, scale: float,
                            prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                            window: int | None = None, tuning: Tuning | None = None,
                            units: "UnitPrompts | None" = None,
                            pages: torch.Tensor | None = None,
                            new: "NewKV | None" = None) -> torch.Tensor:
    """query [b, kv_heads, groups, d] (query heads packed by the KV head they share); key and
    value [b, kv_heads, max_len, d], of which the first `length` positions count (an int32
    device scalar, or int32 [b], one length a row); with `pages` (int32 [b, pages a row], a
    page table, pages.py), key and value are pools of pages [n_pages, kv_heads, page, d] and
    row r's position p sits at offset p % page of pool page pages[r, p // page]; `prefix`: keys and values
    [kv_heads, prefix_len, d] that every row attends to before its own; `units`: keys and
    values [n_units, kv_heads, unit_len, d], one prompt per unit, and each row's unit, attended
    to after the prefix and before the row's own; `window`: a query sees only the last `window`
    positions up to its own (the prefix's counted first, then the unit's). `tuning`: the
    launch shape, DEFAULT (read at the call) where None.
    `new`: this step's keys and values ([b, kv_heads, 1, d]), which the kernel stores at each
    row's last valid position (its length less one; with `pages`, through the page table)
    before it reads the cache. Returns [b, kv_heads, groups, d]."""
    assert triton is not None
    tuning = DEFAULT if tuning is None else tuning
    batch, kv_heads, groups, dim = query.shape
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("keys and values need a contiguous last dimension")
    if prefix is not None and (prefix[0].stride(-1) != 1 or prefix[1].stride(-1) != 1):
        raise ValueError("prefix keys and values need a contiguous last dimension")
    if length.dim() > 1 or (length.dim() == 1 and length.shape[0] != batch):
        raise ValueError("length is one scalar or one length per row")
    query = query.contiguous()
    out = torch.empty_like(query)
    g_pad = triton.next_power_of_2(groups)
    rows = _rows_per_program(query, tuning.lines, g_pad)
    grid: Any = (triton.cdiv(batch, rows), kv_heads)
    p_keys, p_values = prefix if prefix is not None else (key[0], value[0])
    prefix_len = prefix[0].shape[1] if prefix is not None else 0
    order = None
    if units is not None:
        u_keys, u_values, of_row, order = units.keys, units.values, units.of_row, units.order
        if u_keys.stride(-1) != 1 or u_values.stride(-1) != 1 or of_row.shape[0] < batch:
            raise ValueError("unit prompts need a contiguous last dimension and a unit a row")
        if order is not None and (order.dim() != 1 or order.shape[0] < batch
                                  or order.stride(0) != 1):
            raise ValueError("the row order needs one contiguous entry a row")
    else:
        u_keys, u_values, of_row = key, value, length.reshape(-1)
    if pages is not None and (pages.dim() != 2 or pages.shape[0] < batch
                              or pages.stride(1) != 1):
        raise ValueError("a page table has one contiguous row of pages a row")
    table = pages if pages is not None else length.reshape(-1)
    if new is not None:
        n_keys, n_values = new.keys, new.values
        if (n_keys.shape[0] < batch or n_keys.shape[1] != kv_heads or n_keys.shape[-1] != dim
                or n_keys.stride(-1) != 1 or n_values.shape != n_keys.shape
                or n_values.stride(-1) != 1):
            raise ValueError("new keys and values need a row each and this cache's heads")
    else:
        n_keys, n_values = key, value
    with on_card(query):
        _decode_kernel[grid](
            query, key, value, p_keys, p_values, out, length, u_keys, u_values, of_row,
            order if order is not None else of_row, table,
            n_keys, n_values,
            batch, prefix_len, u_keys.shape[2] if units is not None else 0,
            NO_WINDOW if window is None else window, scale,
            length.stride(0) if length.dim() == 1 else 0, of_row.stride(0),
            query.stride(0), query.stride(1), query.stride(2),
            key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            p_keys.stride(0), p_keys.stride(1), p_values.stride(0), p_values.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            u_keys.stride(0), u_keys.stride(1), u_keys.stride(2),
            u_values.stride(0), u_values.stride(1), u_values.stride(2), table.stride(0),
            n_keys.stride(0), n_keys.stride(1), n_values.stride(0), n_values.stride(1),
            GROUPS=groups, G_PAD=g_pad, ROWS=rows, LINES=max(16, rows * g_pad), DIM=dim,
            BLOCK_L=tuning.block, RAGGED=length.dim() == 1, UNITS=units is not None,
            ORDERED=order is not None, PAGE=key.shape[2] if pages is not None else 0,
            WRITE=new is not None,
            IEEE=query.dtype == torch.float32,
            BLOCK_P=tuning.block if PREFIX is None else PREFIX[0],
            P_STAGES=tuning.stages if PREFIX is None else PREFIX[1],
            num_warps=tuning.warps, num_stages=tuning.stages,
        )
    return out
