"""A Triton kernel for the decode step's attention: one query token per row against a static
KV cache whose valid length is a device scalar (so a captured CUDA graph can replay it).

One program per (row, KV head) streams that head's keys and values once, in blocks, with an
online softmax over the query heads that share it (grouped-query attention, padded to the 16 rows
tl.dot needs). Every row of a decode batch is at the same step, so one length serves all rows.

Triton is optional: it ships with CUDA builds of torch. Without it (or on the CPU) `available()`
is False and attention.py uses PyTorch's SDPA instead.
"""

from contextlib import nullcontext
from typing import Any

import torch

try:  # pragma: no cover - depends on the torch build
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BLOCK = 64


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernel can run on this tensor's device (CUDA, or Triton's CPU interpreter)."""
    if triton is None:
        return False
    import os

    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:  # pragma: no cover - compiled for the GPU, or interpreted in tests

    @triton.jit
    def _attend(q, k_base, v_base, s_kl, s_vl, length, scale, best, total, acc,
                d, offs, BLOCK_L: tl.constexpr, IEEE: tl.constexpr):
        """Online softmax of q against positions 0..length-1 of one head's keys and values."""
        for start in range(0, length, BLOCK_L):
            pos = start + offs
            ok = pos < length
            k = tl.load(k_base + pos[:, None] * s_kl + d[None, :], mask=ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(ok[None, :], s * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, 1))
            alpha = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_base + pos[:, None] * s_vl + d[None, :], mask=ok[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        return best, total, acc

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, o_ptr, len_ptr, prefix_len, scale,
                       s_qb, s_qh, s_qg, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                       s_pkh, s_pkl, s_pvh, s_pvl, s_ob, s_oh, s_og,
                       GROUPS: tl.constexpr, G_PAD: tl.constexpr, DIM: tl.constexpr,
                       BLOCK_L: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        length = tl.load(len_ptr)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, DIM)
        offs = tl.arange(0, BLOCK_L)
        g_ok = g < GROUPS
        q = tl.load(q_ptr + row * s_qb + head * s_qh + g[:, None] * s_qg + d[None, :],
                    mask=g_ok[:, None], other=0.0)
        best = tl.full([G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, DIM], tl.float32)
        # The prefix every row shares (read by all rows, so mostly from L2), then the row's own.
        best, total, acc = _attend(q, pk_ptr + head * s_pkh, pv_ptr + head * s_pvh, s_pkl, s_pvl,
                                   prefix_len, scale, best, total, acc, d, offs, BLOCK_L, IEEE)
        best, total, acc = _attend(q, k_ptr + row * s_kb + head * s_kh,
                                   v_ptr + row * s_vb + head * s_vh, s_kl, s_vl,
                                   length, scale, best, total, acc, d, offs, BLOCK_L, IEEE)
        out = acc / total[:, None]
        tl.store(o_ptr + row * s_ob + head * s_oh + g[:, None] * s_og + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None])


def decode_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            length: torch.Tensor, scale: float,
                            prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """query [b, kv_heads, groups, d] (query heads packed by the KV head they share); key and
    value [b, kv_heads, max_len, d], of which the first `length` (int32 device scalar) positions
    count; `prefix`: keys and values [kv_heads, prefix_len, d] that every row attends to before
    its own. Returns [b, kv_heads, groups, d]."""
    assert triton is not None
    batch, kv_heads, groups, dim = query.shape
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("keys and values need a contiguous last dimension")
    if prefix is not None and (prefix[0].stride(-1) != 1 or prefix[1].stride(-1) != 1):
        raise ValueError("prefix keys and values need a contiguous last dimension")
    query = query.contiguous()
    out = torch.empty_like(query)
    grid: Any = (batch, kv_heads)
    guard: Any = torch.cuda.device(query.device) if query.is_cuda else nullcontext()
    with guard:
        _launch(grid, query, key, value, prefix, out, length, scale, groups, dim)
    return out


def _launch(grid: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            prefix: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor,
            length: torch.Tensor, scale: float, groups: int, dim: int) -> None:
    assert triton is not None
    p_keys, p_values = prefix if prefix is not None else (key[0], value[0])
    prefix_len = prefix[0].shape[1] if prefix is not None else 0
    _decode_kernel[grid](
        query, key, value, p_keys, p_values, out, length, prefix_len, scale,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        p_keys.stride(0), p_keys.stride(1), p_values.stride(0), p_values.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUPS=groups, G_PAD=max(16, triton.next_power_of_2(groups)), DIM=dim, BLOCK_L=BLOCK,
        IEEE=query.dtype == torch.float32, num_warps=4,
    )
