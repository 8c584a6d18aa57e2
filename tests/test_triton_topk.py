"""The draw's slice kernels (triton_topk.py) against PyTorch: each slice's maximum, the picked
slices' entries, the n best scores and the tokens drawn (on the CPU in Triton's interpreter,
which conftest.py turns on for tests marked `triton`)."""

from unittest import mock

import pytest
import torch
from test_sampling_topk import tied_logits as bf16_tied_logits

from patchdb.generate import sampling, triton_topk
from patchdb.generate.sampling import Sampling, choose_tokens

pytestmark = [pytest.mark.skipif(triton_topk.triton is None, reason="Triton is not installed"),
              pytest.mark.triton]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels are off by default until a GPU has run them (sampling.SLICE_KERNELS)."""
    monkeypatch.setattr(sampling, "SLICE_KERNELS", True)


def tied_logits(rows: int, vocab: int, levels: int, seed: int,
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """test_sampling_topk's bf16 logits on a few levels, in `dtype` on DEVICE."""
    return bf16_tied_logits(rows, vocab, levels, seed).to(dtype).to(DEVICE)


def padded_maxima(scores: torch.Tensor, width: int) -> torch.Tensor:
    rows, vocab = scores.shape
    slices = -(-vocab // width)
    padded = torch.full((rows, slices * width), float("-inf"), dtype=scores.dtype,
                        device=scores.device)
    padded[:, :vocab] = scores
    return padded.view(rows, slices, width).amax(-1)


def test_the_width_is_the_power_of_two_nearest_vocab_over_slices() -> None:
    assert triton_topk.slice_width(262208, 1024) == 256  # Gemma 3: 1,025 slices, one short
    assert triton_topk.slice_width(128256, 1024) == 128  # Llama 3: 125 a slice ideally
    assert triton_topk.slice_width(49152, 1024) == 64  # SmolLM2: 48 ideally, nearer 64 than 32
    assert triton_topk.slice_width(5000, 1024) == 4
    assert triton_topk.slice_width(100, 1024) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab, width", [(4096, 16), (4100, 16), (5003, 32), (262208, 256)])
def test_slice_maxima_are_those_of_the_padded_vocabulary(dtype: torch.dtype, vocab: int,
                                                         width: int) -> None:
    # every score below zero: a short slice's missing entries must not read as 0
    scores = tied_logits(3, vocab, 4000, seed=vocab + width, dtype=dtype) - 1001
    maxima = triton_topk.slice_maxima(scores, width)
    assert maxima.dtype == dtype and maxima.shape == (3, -(-vocab // width))
    assert torch.equal(maxima, padded_maxima(scores, width))


def test_taken_slices_are_the_entries_side_by_side_with_minus_inf_past_the_vocabulary() -> None:
    scores = tied_logits(2, 1000, 4000, seed=1, dtype=torch.float32)  # 63 slices of 16, last 8
    picked = torch.tensor([[62, 0, 5], [3, 62, 62]], device=DEVICE)
    taken = triton_topk.take_slices(scores, picked, 16).view(2, 3, 16)
    for row in range(2):
        for j, which in enumerate(picked[row].tolist()):
            want = scores[row, which * 16:(which + 1) * 16]
            assert torch.equal(taken[row, j, :want.shape[0]], want)
            assert torch.isneginf(taken[row, j, want.shape[0]:]).all()


@pytest.mark.parametrize("vocab", [4096, 4100, 5000])
@pytest.mark.parametrize("levels", [40, 400, 4000])
def test_the_kernels_find_the_scores_of_one_topk(vocab: int, levels: int) -> None:
    scores = tied_logits(16, vocab, levels, seed=vocab + levels)
    one_values, _ = torch.topk(scores, 68)
    with mock.patch.object(sampling, "TOPK_SLICES", 256), \
            mock.patch.object(triton_topk, "top_by_slices",
                              wraps=triton_topk.top_by_slices) as kernels:
        values, ids = sampling._topk(scores, 68)
    assert kernels.call_count == 1
    assert torch.equal(values, one_values)
    # every id is a real token with the score given for it, and no token comes twice
    assert int(ids.max()) < vocab
    assert torch.equal(scores.gather(1, ids), values)
    assert all(len(set(row.tolist())) == 68 for row in ids.cpu())


def test_the_best_scores_in_the_short_last_slice_are_found() -> None:
    # 4,100 entries in slices of 16: the last slice holds 4 entries, and they are the best four.
    scores = torch.zeros(2, 4100)
    scores[:, -4:] = torch.tensor([9.0, 7.0, 8.0, 6.0])
    scores[:, 17] = 5.0
    scores = scores.to(torch.bfloat16).to(DEVICE)
    with mock.patch.object(sampling, "TOPK_SLICES", 256):
        values, ids = sampling._topk(scores, 5)
    assert values[0].tolist() == [9.0, 8.0, 7.0, 6.0, 5.0]
    assert ids[0].tolist() == [4096, 4098, 4097, 4099, 17]


@pytest.mark.parametrize("k, top_p", [(4, 0.9), (64, 0.95), (8, 1.0)])
def test_the_kernels_draw_the_tokens_of_one_pass(k: int, top_p: float) -> None:
    logits = tied_logits(32, 4100, 4000, seed=k)
    seeds = (torch.arange(32) * 7919).to(DEVICE)
    how = Sampling(1.0, k, top_p)
    for step in range(3):
        with mock.patch.object(sampling, "TOPK_SLICES", 0):
            one = choose_tokens(logits, seeds, step, how)
        with mock.patch.object(sampling, "TOPK_SLICES", 256):
            two = choose_tokens(logits, seeds, step, how)
        with mock.patch.object(sampling, "TOPK_SLICES", 256), \
                mock.patch.object(sampling, "SLICE_KERNELS", False):
            torch_two = choose_tokens(logits, seeds, step, how)
        assert torch.equal(one, two) and torch.equal(two, torch_two)


def test_gemmas_vocabulary_draws_as_one_pass_with_the_kernels() -> None:
    logits = (torch.randn(4, 262208, generator=torch.Generator().manual_seed(5)) * 4
              ).to(torch.bfloat16).to(DEVICE)
    seeds = (torch.arange(4) * 104729).to(DEVICE)
    how = Sampling(1.0, 64, 0.95)
    with mock.patch.object(triton_topk, "top_by_slices",
                           wraps=triton_topk.top_by_slices) as kernels:
        two = [choose_tokens(logits, seeds, step, how) for step in range(2)]
    assert kernels.call_count == 2
    with mock.patch.object(sampling, "TOPK_SLICES", 0):
        one = [choose_tokens(logits, seeds, step, how) for step in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
