"""Two Triton kernels for the draw's top-k over the best vocabulary slices (sampling._topk): each
slice's highest score, and the entries of the slices picked, side by side.

PyTorch does the same in three steps: `amax` over a [rows, slices, width] view of the equal
slices, a gather of the picked slices' entries, and a copy of the few entries past the equal
slices (Gemma 3's 262,208 = 1,024 x 256 + 64) onto them. On an H200 at 1,464 rows those took
about 1.2 ms of the draw's 2.2 ms a step, reading the 768 MB of logits at a fraction of the
card's bandwidth. Here the last slice may be short (its missing entries read as -inf), so no
tail is copied, and a slice's maximum is one masked load and one reduction.

The entries are the logits' own values, so the candidates (and the tokens drawn) are those of
one torch.topk over the whole vocabulary, ties at the n-th place aside as in sampling._topk.
Triton is optional; `available()` says whether these run (CUDA, or Triton's CPU interpreter).
They are off by default (sampling.SLICE_KERNELS) until a GPU has run and timed them.
"""

import os
from typing import Any

import torch

from patchdb.generate.triton_decode import on_card

try:  # pragma: no cover - depends on the torch build
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# Entries a slice-maximum program reads (slices x width), and slices a gathering program copies.
MAX_ENTRIES = 4096
TAKE_SLICES = 8


def available(scores: torch.Tensor) -> bool:
    """Whether the kernels can run on this tensor's device (CUDA, or Triton's CPU interpreter)."""
    if triton is None:
        return False
    return scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def slice_width(vocab: int, slices: int) -> int:
    """The power of two nearest vocab / slices (a slice's entries are one tl.arange): 256 for
    Gemma 3's vocabulary at 1,024 slices, 128 for Llama 3's (1,002 slices)."""
    ideal = max(vocab / slices, 1.0)
    width = 1
    while width * 2 <= ideal:
        width *= 2
    return width * 2 if ideal / width > 2 * width / ideal else width


if triton is not None:  # pragma: no cover - compiled for the GPU, or interpreted in tests

    @triton.jit
    def _slice_max_kernel(x_ptr, out_ptr, vocab, slices, s_x, s_out,
                          WIDTH: tl.constexpr, SLICES: tl.constexpr):
        row = tl.program_id(0)
        which = tl.program_id(1) * SLICES + tl.arange(0, SLICES)
        col = which[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
        x = tl.load(x_ptr + row.to(tl.int64) * s_x + col, mask=col < vocab,
                    other=float("-inf"))
        tl.store(out_ptr + row.to(tl.int64) * s_out + which, tl.max(x, 1), mask=which < slices)

    @triton.jit
    def _take_slices_kernel(x_ptr, picked_ptr, out_ptr, vocab, n, s_x, s_p, s_out,
                            WIDTH: tl.constexpr, SLICES: tl.constexpr):
        row = tl.program_id(0)
        j = tl.program_id(1) * SLICES + tl.arange(0, SLICES)
        ok = j < n
        which = tl.load(picked_ptr + row.to(tl.int64) * s_p + j, mask=ok, other=0)
        c = tl.arange(0, WIDTH)
        col = which[:, None] * WIDTH + c[None, :]
        x = tl.load(x_ptr + row.to(tl.int64) * s_x + col, mask=ok[:, None] & (col < vocab),
                    other=float("-inf"))
        tl.store(out_ptr + row.to(tl.int64) * s_out + j[:, None] * WIDTH + c[None, :], x,
                 mask=ok[:, None])


def slice_maxima(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Each row's highest score in each slice of `width` entries (the last may be short):
    [rows, cdiv(vocab, width)], in the scores' dtype. Needs a contiguous last dimension."""
    assert triton is not None and scores.stride(-1) == 1
    rows, vocab = scores.shape
    slices = -(-vocab // width)
    out = torch.empty(rows, slices, dtype=scores.dtype, device=scores.device)
    per = max(1, MAX_ENTRIES // width)
    grid: Any = (rows, triton.cdiv(slices, per))
    with on_card(scores):
        _slice_max_kernel[grid](scores, out, vocab, slices, scores.stride(0), out.stride(0),
                                WIDTH=width, SLICES=per, num_warps=4)
    return out


def take_slices(scores: torch.Tensor, picked: torch.Tensor, width: int) -> torch.Tensor:
    """The entries of each row's picked slices side by side: [rows, n x width], entry j x width
    + c being scores[row, picked[row, j] x width + c], -inf past the vocabulary."""
    assert triton is not None and scores.stride(-1) == 1
    rows, vocab = scores.shape
    n = picked.shape[1]
    picked = picked.contiguous()
    out = torch.empty(rows, n * width, dtype=scores.dtype, device=scores.device)
    grid: Any = (rows, triton.cdiv(n, TAKE_SLICES))
    with on_card(scores):
        _take_slices_kernel[grid](scores, picked, out, vocab, n, scores.stride(0),
                                  picked.stride(0), out.stride(0), WIDTH=width,
                                  SLICES=TAKE_SLICES, num_warps=4)
    return out


def top_by_slices(scores: torch.Tensor, n: int, slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's n highest scores, highest first, and their token ids, from the n slices
    (of about vocab / `slices` entries) with the highest maxima."""
    vocab = scores.shape[1]
    width = slice_width(vocab, slices)
    picked = torch.topk(slice_maxima(scores, width), n, sorted=False).indices
    values, at = torch.topk(take_slices(scores, picked, width), n)
    ids = picked.gather(1, at // width) * width + at % width
    return values, ids.clamp_(max=vocab - 1)  # a -inf entry past the vocabulary is never drawn
