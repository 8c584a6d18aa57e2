"""The sampler's small rules, each pinned where a plausible slip would change what is drawn:
top-p's boundary (a token goes when the ascending mass is *at most* 1 - top_p), the temperature
with and without a top-k / top-p cut, and the documented order of equal scores (the highest
token id first). Expected values come from Hugging Face's own warpers (via test_sampling's
oracle) or from hand computations written out below."""

import math

import pytest
import torch
from test_sampling import CHI2_999, draws, hf_warped

from patchdb.generate.sampling import Sampling, choose_tokens, row_uniforms

# (seed, step) pairs and their uniforms, pinned by test_sampling's known values.
KNOWN = [(1, 0, 0.3288569152355194), (12345, 0, 0.5635566711425781),
         ((1 << 62) - 1, 0, 0.6939284801483154), (1, 7, 0.7649095058441162),
         (12345, 7, 0.09817954897880554)]
FAR_BELOW = -1e4  # exp(-1e4) is exactly 0 in float32: such a token has probability 0


def picks_for_known(logits: torch.Tensor, how: Sampling) -> list[int]:
    """The token drawn for each KNOWN (seed, step), one row at a time."""
    out = []
    for seed, step, u in KNOWN:
        assert float(row_uniforms(torch.tensor([seed]), step)[0]) == u
        out.append(int(choose_tokens(logits, torch.tensor([seed]), step, how)[0]))
    return out


def hf_support_size(logits: torch.Tensor, how: Sampling) -> int:
    return int(torch.isfinite(hf_warped(logits.clone(), how)).sum())


# --- top-p: the boundary is "at most" 1 - top_p ---------------------------------------------


@pytest.mark.parametrize("with_top_k", [False, True], ids=["sorted", "top_k"])
@pytest.mark.parametrize(("tied", "top_p", "kept"), [
    (2, 0.5, 1),        # ascending mass .5 <= .5: the lower token goes, one is left
    (4, 0.5, 2),        # .25, .5 <= .5: two go
    (4, 0.75, 3),       # .25 <= .25: one goes
    (8, 0.625, 5),      # 1/8, 2/8, 3/8 <= 3/8: three go
    (16, 0.8125, 13),   # 1/16 .. 3/16 <= 3/16: three go
])
def test_top_p_removes_a_token_whose_ascending_mass_is_exactly_one_minus_top_p(
    tied: int, top_p: float, kept: int, with_top_k: bool
) -> None:
    """`tied` equal scores have probability exactly 1/tied each (a power of two), and
    1 - top_p is a multiple of it, so the cumulative mass lands exactly on the boundary. HF
    removes a token whose ascending mass is at most 1 - top_p: `kept` tokens stay. Which of the
    tied tokens stay is patchdb's documented order: the highest ids."""
    vocab = tied + 6
    logits = torch.full((1, vocab), FAR_BELOW)
    logits[0, 3:3 + tied] = 0.0  # tokens 3 .. tied + 2
    how = Sampling(1.0, tied if with_top_k else 0, top_p)  # top_k = tied: that path, no cut
    assert hf_support_size(logits, how) == kept
    drawn = draws(logits[0], how, n=4000)
    assert set(drawn.tolist()) == set(range(3 + tied - kept, 3 + tied))
    counts = torch.bincount(drawn, minlength=vocab)[3 + tied - kept:3 + tied]
    assert int(counts.min()) > 4000 / kept / 2  # each survivor has probability 1/kept


def test_the_hand_worked_boundary_on_the_sampler_alone() -> None:
    """Four equal scores, top_p 0.5: the candidate CDF is (.5, 1) over tokens 3 and 2, so
    u = .329 gives token 3 and u = .564, .694, .765 give token 2, .098 token 3. Were the
    boundary token kept, the CDF would be (1/3, 2/3, 1) over 3, 2, 1 and u = .694 and .765
    would give token 1."""
    logits = torch.zeros(1, 4)
    assert picks_for_known(logits, Sampling(1.0, 0, 0.5)) == [3, 2, 2, 2, 3]
    assert picks_for_known(logits, Sampling(1.0, 4, 0.5)) == [3, 2, 2, 2, 3]


# --- the temperature, with and without a cut ------------------------------------------------

# Two tokens with logits (0, d), d = 0.7 ln(7/3): at temperature 0.7 the probabilities are
# exactly (0.3, 0.7); at temperature 1 they would be (0.356, 0.644).
TWO = torch.tensor([[0.0, 0.7 * math.log(7 / 3)]])


def test_hand_probabilities_agree_with_hf_temperature_warper() -> None:
    probs = torch.softmax(hf_warped(TWO.clone(), Sampling(0.7))[0].double(), -1)
    assert torch.allclose(probs, torch.tensor([0.3, 0.7], dtype=torch.float64), atol=1e-6)


def test_temperature_applies_without_any_cut() -> None:
    """No cut: the CDF runs in vocabulary order, (0.3, 1). u = .329 > .3 gives token 1 (at
    temperature 1, .329 < .356 would give token 0); u = .098 gives token 0."""
    how = Sampling(0.7, 0, 1.0)
    assert not how.cuts
    assert picks_for_known(TWO, how) == [1, 1, 1, 1, 0]


def test_temperature_applies_with_a_cut() -> None:
    """top_k 2 keeps both but takes the cut path: the CDF runs from the most likely, (0.7, 1)
    over tokens 1, 0. u = .694 < .7 gives token 1 (at temperature 1, .694 > .644 would give
    token 0); u = .765 gives token 0."""
    how = Sampling(0.7, 2, 1.0)
    assert how.cuts
    assert picks_for_known(TWO, how) == [1, 1, 1, 0, 1]


def hf_pick(warped: torch.Tensor, how: Sampling, u: float) -> int | None:
    """The token inverse-CDF sampling with uniform u takes from HF's warped logits, in the
    order docs/sampling.md gives (vocabulary order without a cut; else highest score first,
    equal scores highest id first); None where u is too close to a CDF step to call."""
    probs = torch.softmax(warped.double(), -1)
    if how.cuts:
        order = sorted(range(len(probs)), key=lambda t: (-float(warped[t]), -t))
    else:
        order = list(range(len(probs)))
    cdf = probs[order].cumsum(0).tolist()
    if any(abs(c - u) < 1e-5 for c in cdf):
        return None
    return order[next(i for i, c in enumerate(cdf) if c > u)]


WARPED_SETTINGS = [Sampling(0.7, 0, 1.0), Sampling(1.6, 0, 1.0), Sampling(1.0, 0, 1.0),
                   Sampling(0.7, 6, 1.0), Sampling(0.7, 0, 0.9), Sampling(0.5, 8, 0.8),
                   Sampling(1.3, 0, 0.7), Sampling(2.0, 5, 0.95)]


@pytest.mark.parametrize("how", WARPED_SETTINGS, ids=str)
def test_each_seed_draws_the_token_hf_warped_probabilities_give(how: Sampling) -> None:
    """Per seed, not in distribution: the token drawn is the one the row's uniform selects
    from HF's warped probabilities."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 12, generator=generator)
    warped = hf_warped(logits.clone(), how)[0]
    seeds = torch.arange(3000, dtype=torch.int64) * 104729 + 5
    got = choose_tokens(logits.expand(len(seeds), -1), seeds, 3, how).tolist()
    uniforms = row_uniforms(seeds, 3).tolist()
    checked = 0
    for token, u in zip(got, uniforms, strict=True):
        want = hf_pick(warped, how, u)
        if want is not None:
            assert token == want, (u, token, want)
            checked += 1
    assert checked > 2900
    assert len(set(got)) > 3  # the draws are not all alike


@pytest.mark.parametrize("how", [Sampling(0.7, 0, 1.0), Sampling(1.6, 0, 1.0),
                                 Sampling(0.7, 3, 1.0), Sampling(0.6, 0, 0.9)], ids=str)
def test_frequencies_at_other_temperatures_match_hf(how: Sampling) -> None:
    """Pearson's chi-square of 20,000 draws over 8 tokens against HF's warped distribution."""
    logits = torch.tensor([[0.3, -0.4, 1.1, 0.0, -0.9, 0.7, 0.2, -0.2]])
    probs = torch.softmax(hf_warped(logits.clone(), how)[0].double(), -1)
    support = probs.nonzero().flatten().tolist()
    n = 20_000
    counts = torch.bincount(draws(logits[0], how, n=n), minlength=8).double()
    assert int(counts[support].sum()) == n
    assert float(probs[support].min()) * n > 50
    stat = sum(float((counts[t] - n * probs[t]) ** 2 / (n * probs[t])) for t in support)
    assert stat < CHI2_999[len(support) - 1], (stat, len(support))


# --- equal scores: the highest token id first (docs/sampling.md) ----------------------------


@pytest.mark.parametrize("how", [Sampling(1.0, 4, 1.0), Sampling(1.0, 2, 1.0),
                                 Sampling(1.0, 0, 0.99), Sampling(0.7, 3, 0.99)], ids=str)
def test_equal_scores_are_ordered_from_the_highest_token_id(how: Sampling) -> None:
    """Four equal scores, nothing cut (a tie at the k-th keeps them all; .25 > 1 - .99):
    the candidate CDF (.25, .5, .75, 1) runs over tokens 3, 2, 1, 0, so the known uniforms
    .329, .564, .694, .765, .098 give 2, 1, 1, 0, 3."""
    assert picks_for_known(torch.zeros(1, 4), how) == [2, 1, 1, 0, 3]


def test_without_a_cut_equal_scores_stay_in_vocabulary_order() -> None:
    """No cut: the CDF runs over tokens 0, 1, 2, 3 (the order older rollouts were drawn in)."""
    assert picks_for_known(torch.zeros(1, 4), Sampling(1.0)) == [1, 2, 2, 3, 0]


@pytest.mark.parametrize("top_k", [0, 4])
def test_a_top_p_cut_through_equal_scores_keeps_the_highest_ids(top_k: int) -> None:
    """Tokens 1, 4, 6 and 9 share the top score; top-p 0.5 keeps two of them (HF keeps two
    as well, whichever its sort left last): by the documented order, 9 and 6."""
    logits = torch.full((1, 10), FAR_BELOW)
    logits[0, [1, 4, 6, 9]] = 2.0
    how = Sampling(1.0, top_k, 0.5)
    assert hf_support_size(logits, how) == 2
    assert set(draws(logits[0], how, n=2000).tolist()) == {6, 9}
