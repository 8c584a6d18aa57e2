"""Top-k in two passes (sampling.TOPK_SLICES: the slices with the highest maxima, then one top-k
over their entries) against one torch.topk over the vocabulary: the same scores, the same
candidates once _top_k has cut them, and the same tokens drawn, on bf16 logits full of ties,
with a vocabulary that splits evenly into the slices and ones that leave a tail."""

from unittest import mock

import pytest
import torch

from patchdb.generate import sampling
from patchdb.generate.sampling import Sampling, choose_tokens


def tied_logits(rows: int, vocab: int, levels: int, seed: int) -> torch.Tensor:
    """bf16 logits on a few levels, so every row has long runs of equal scores."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, levels, (rows, vocab), generator=gen).float() / 4
            + torch.randn(rows, vocab, generator=gen) * 0.01 * (seed % 2)).to(torch.bfloat16)


@pytest.mark.parametrize("vocab", [4096, 4100, 5000])
@pytest.mark.parametrize("levels", [40, 400, 4000])
def test_two_passes_find_the_same_scores(vocab: int, levels: int) -> None:
    scores = tied_logits(16, vocab, levels, seed=vocab + levels)
    one_values, one_ids = torch.topk(scores, 68)
    with mock.patch.object(sampling, "TOPK_SLICES", 256), \
            mock.patch.object(sampling.torch, "topk", wraps=torch.topk) as topk:
        values, ids = sampling._topk(scores, 68)
    assert topk.call_count == 2  # the slices' maxima, then their entries
    assert torch.equal(values, one_values)
    # every id is a real token with the score given for it, and no token comes twice
    assert torch.equal(scores.gather(1, ids), values)
    assert all(len(set(row.tolist())) == 68 for row in ids)


@pytest.mark.parametrize("vocab", [4096, 4100])
@pytest.mark.parametrize("levels", [40, 4000])
@pytest.mark.parametrize("k, top_p", [(4, 0.9), (64, 0.95), (8, 1.0)])
def test_two_passes_draw_the_same_tokens(vocab: int, levels: int, k: int, top_p: float) -> None:
    logits = tied_logits(32, vocab, levels, seed=levels + k)
    seeds = torch.arange(32) * 7919
    how = Sampling(1.0, k, top_p)
    for step in range(4):
        with mock.patch.object(sampling, "TOPK_SLICES", 0):
            one = choose_tokens(logits, seeds, step, how)
            one_cut = sampling._top_k(logits, k, 1.0)
        with mock.patch.object(sampling, "TOPK_SLICES", 256):
            two = choose_tokens(logits, seeds, step, how)
            two_cut = sampling._top_k(logits, k, 1.0)
        assert torch.equal(one, two)
        assert torch.equal(one_cut[0], two_cut[0])
        kept = torch.isfinite(one_cut[0])
        assert torch.equal(one_cut[1][kept], two_cut[1][kept])


def test_too_few_slices_fall_back_to_one_pass() -> None:
    scores = tied_logits(4, 1000, 40, seed=3)
    for slices, calls in ((100, 1), (136, 2), (501, 1)):  # under 2 x 68; enough; under 2 a slice
        with mock.patch.object(sampling, "TOPK_SLICES", slices), \
                mock.patch.object(sampling.torch, "topk", wraps=torch.topk) as topk:
            values, _ = sampling._topk(scores, 68)
        assert topk.call_count == calls, slices
        assert torch.equal(values, torch.topk(scores, 68).values)


def test_the_best_scores_in_one_slice_are_all_found() -> None:
    # Every one of the 68 best scores sits in slice 3: the other slices' maxima are all lower,
    # so slice 3 ranks first and the rest of the 68 slices taken add nothing above them.
    scores = torch.zeros(2, 256 * 16)
    scores[:, 3 * 16:4 * 16] = torch.arange(16, dtype=torch.float32) + 100
    scores[:, 200 * 16:200 * 16 + 16] = torch.arange(16, dtype=torch.float32) + 50
    scores = scores.to(torch.bfloat16)
    with mock.patch.object(sampling, "TOPK_SLICES", 256):
        values, ids = sampling._topk(scores, 20)
    assert torch.equal(values, torch.topk(scores, 20).values)
    assert ids[0, :16].tolist() == list(range(3 * 16 + 15, 3 * 16 - 1, -1))


def test_the_default_split_draws_as_one_pass_at_gemmas_vocabulary() -> None:
    # The shipped setting, at Gemma 3's vocabulary (262,208: 1,024 slices of 256 and a tail of
    # 64), takes the two-pass path and draws what one pass draws. Normal logits in bf16 tie in
    # twos and threes near the top, as a model's do, but not past the tie margin.
    assert sampling.TOPK_SLICES >= 2 * (64 + sampling.TIE_MARGIN)
    logits = (torch.randn(6, 262208, generator=torch.Generator().manual_seed(5)) * 4
              ).to(torch.bfloat16)
    seeds = torch.arange(6) * 104729
    how = Sampling(1.0, 64, 0.95)
    with mock.patch.object(sampling.torch, "topk", wraps=torch.topk) as topk:
        two = [choose_tokens(logits, seeds, step, how) for step in range(3)]
    assert topk.call_count == 6  # two a draw: the slices' maxima, then their entries
    with mock.patch.object(sampling, "TOPK_SLICES", 0):
        one = [choose_tokens(logits, seeds, step, how) for step in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
