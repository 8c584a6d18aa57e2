"""Seeds and batch-invariant sampling.

Each rollout has its own seed, derived from what it is (sweep, experiment, layer, key, sample),
so it can be regenerated alone. Sampling draws one uniform per row from a counter-based hash of
(seed, step), computed with integer tensor ops, and inverts the row's CDF after temperature,
top-k and top-p, in that order, as Hugging Face's sampling warpers do: a row's tokens never depend
on which other rows share its batch, and no random generator state is involved.
"""

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from patchdb.errors import ModelError
from patchdb.generate import triton_topk
from patchdb.generate.transfer import to_device

SEED_BITS = 62
_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that a 32-bit value times one stays below 2**63 in int64.
_MUL1 = 0x7FEB352D
_MUL2 = 0x2C1B3C6D
_WEYL = 0x61C88647


def rollout_seed(
    sweep: str, experiment: str, patch_layer: int, source: str, target: str, sample_index: int
) -> int:
    """The first 8 bytes of sha256 over the rollout's identity, masked to 62 bits."""
    text = "\x1f".join(
        [sweep, experiment, str(patch_layer), source, target, str(sample_index)]
    )
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    return x ^ (x >> 15)


def row_uniforms(seeds: torch.Tensor, step: "int | torch.Tensor") -> torch.Tensor:
    """One uniform in (0, 1) per row that depends only on (seed, step); `step` is one int for
    every row or one int64 per row (rows at different steps, as with continuous batching)."""
    lo = seeds & _M32
    hi = (seeds >> 32) & _M32
    if isinstance(step, torch.Tensor):
        counter = (step.to(torch.int64) * _WEYL) & _M32
    else:
        counter = torch.full_like(seeds, (step * _WEYL) & _M32)
    h = _mix32(lo ^ _mix32(hi ^ _mix32(counter)))
    # 24 high bits give a float32-exact uniform.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


# What Hugging Face generate() falls back to when neither the caller nor the model's generation
# config sets a value (GenerationConfig._get_default_generation_params in transformers 5).
HF_DEFAULT_TOP_K = 50
HF_DEFAULT_TOP_P = 1.0


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: softmax(logits / temperature) (0: greedy), cut to the
    top_k highest (0: no cut), then to the smallest head holding top_p of the mass (1.0: no cut)."""

    temperature: float
    top_k: int = 0
    top_p: float = 1.0

    @property
    def cuts(self) -> bool:
        """Whether top-k or top-p removes any token."""
        return self.top_k > 0 or self.top_p < 1.0


def as_sampling(value: "Sampling | float") -> Sampling:
    """A bare temperature means the full softmax (no top-k, no top-p)."""
    return value if isinstance(value, Sampling) else Sampling(float(value))


# Generation-config settings that would make HF generate() draw from another set of tokens or
# with other probabilities than temperature + top-k + top-p; each with the value that is inert.
_INERT: dict[str, Any] = {
    "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "min_new_tokens": None, "min_length": 0, "guidance_scale": None,
    "exponential_decay_length_penalty": None, "forced_eos_token_id": None,
}


def _inert(name: str, value: Any) -> bool:
    """Whether HF generate() adds no logits processor for this generation-config value."""
    if value is None or value == _INERT[name]:
        return True
    if name in ("epsilon_cutoff", "eta_cutoff"):  # HF applies them only inside (0, 1)
        return not 0.0 < value < 1.0
    if name == "typical_p":
        return bool(value >= 1.0)
    if name in ("min_new_tokens", "min_length", "no_repeat_ngram_size"):
        return bool(value <= 0)
    return name == "guidance_scale" and value == 1


def resolve_sampling(
    generation_config: Any, temperature: float, top_k: int | None, top_p: float | None
) -> Sampling:
    """The sweep's temperature with top_k / top_p as HF generate(temperature=...) resolves them:
    the sweep's own value, else the model's generation config, else HF's default. Any other
    setting of the generation config that would change what can be drawn is refused by name."""
    for name in _INERT:
        value = getattr(generation_config, name, None)
        if not _inert(name, value):
            raise ModelError(
                f"the model's generation config sets {name} = {value!r}, which patchdb's sampler "
                "does not apply (it applies temperature, top_k and top_p only)"
            )
    if top_k is None:
        top_k = getattr(generation_config, "top_k", None)
        top_k = HF_DEFAULT_TOP_K if top_k is None else int(top_k)
    if top_p is None:
        top_p = getattr(generation_config, "top_p", None)
        top_p = HF_DEFAULT_TOP_P if top_p is None else float(top_p)
    return Sampling(float(temperature), max(int(top_k), 0), min(float(top_p), 1.0))


# Extra candidates torch.topk returns past the k-th, so that ties at the k-th score (common in
# bf16 logits) are almost always found without a second pass over the vocabulary.
TIE_MARGIN = 64

# Top-k in two passes when at least twice the n asked for: the vocabulary is cut into this many
# equal slices and each gives its highest score; only the n slices with the highest of those can
# hold the n best scores (a slice whose highest score ranks below n has n slices above it, each
# with a higher score), so one sorted top-n runs over those slices' entries (and any tail past
# the equal slices). The scores are those of one torch.topk over the whole vocabulary; where tied
# scores straddle the n-th place the two may keep different tied tokens, and _top_k masks those
# places (ties that reach the k-th place go to its exact path). 1,024 slices: on an H100 at 381
# rows the draw took 1.83 against 2.34 ms in one pass, and in the model (3 runs, A/B/A) the
# sampler's GPU time a step fell by 0.25 ms with no rollout changed (docs/performance.md). 0
# turns it off. (Slices that each gave their own best n, an earlier form, were slower than one
# pass on an H100: 2.65-4.23 ms against 2.33.)
TOPK_SLICES = 1024
# The slices' maxima and the picked slices' entries by two Triton kernels (triton_topk.py) where
# they can run, not by PyTorch's amax, gather and cat: the same candidates. Off until a GPU has
# run them (tested in Triton's interpreter and compiled for sm_90 only; docs/performance.md).
SLICE_KERNELS = False


def _topk(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n highest scores of each row, highest first, and their token ids (TOPK_SLICES)."""
    rows, vocab = scores.shape
    slices = TOPK_SLICES
    if slices < 2 * n or vocab < 2 * slices or scores.stride(-1) != 1:
        return torch.topk(scores, n)
    if SLICE_KERNELS and triton_topk.available(scores):
        return triton_topk.top_by_slices(scores, n, slices)
    width = vocab // slices
    main = slices * width
    blocks = scores[:, :main].view(rows, slices, width)
    picked = torch.topk(blocks.amax(dim=-1), n, sorted=False).indices
    # The picked slices' entries side by side (the index is a broadcast view: no [rows, n x
    # width] tensor of token ids is built), then the last few entries beyond the equal slices.
    taken = blocks.gather(1, picked[:, :, None].expand(rows, n, width)).view(rows, n * width)
    if main < vocab:
        taken = torch.cat([taken, scores[:, main:]], 1)
    values, at = torch.topk(taken, n)
    ids = picked.gather(1, (at // width).clamp_(max=n - 1)) * width + at % width
    if main < vocab:
        ids = torch.where(at >= n * width, at - n * width + main, ids)
    return values, ids


def _top_k(scores: torch.Tensor, k: int, temperature: float,
           overflow: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's survivors of temperature then top-k, highest first, as (scaled scores, token
    ids). Like HF's warper, every token tied with the k-th highest scaled score survives; the
    rest of the returned columns are -inf. Dividing by a positive temperature keeps the order,
    so the selection runs on the raw scores and only the candidates are scaled."""
    vocab = scores.shape[-1]
    k = min(k, vocab)
    # The selection runs in the scores' own dtype (bfloat16 logits need no float32 copy of the
    # whole vocabulary): widening is exact and keeps the order, so the candidates are the same.
    values, indices = _topk(scores, min(k + TIE_MARGIN, vocab))
    if values.shape[-1] < vocab:
        beyond = (values[:, -1] >= values[:, k - 1]).any()
        if overflow is not None:
            overflow.append(beyond)  # the caller checks it later, with no sync here
        elif bool(beyond):
            # Ties reach past the margin in some row: take every token tied with its k-th score.
            widest = int((scores >= values[:, k - 1:k]).sum(dim=-1).max())
            values, indices = torch.topk(scores, widest)
    values = values.float() / temperature
    return _fixed_order(values.masked_fill(values < values[:, k - 1:k], float("-inf")), indices)


def _fixed_order(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates from the highest score down, equal scores from the highest token id down, an
    order that depends only on the row (torch.topk may order ties by its algorithm, which can
    change with the batch). A top-p cut through tied scores keeps ties in this order; HF's own
    warper keeps them in whatever order its unstable sort left them."""
    by_id = torch.argsort(indices, dim=-1, descending=True)
    values, indices = values.gather(1, by_id), indices.gather(1, by_id)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return values.gather(1, order), indices.gather(1, order)


def _top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """For probabilities sorted highest first: True where a top-p cut removes the token. As in
    HF's warper, a token goes when the ascending cumulative mass up to and including it is at
    most 1 - top_p; the most likely token always stays."""
    ascending = probs.flip(-1).cumsum(dim=-1)
    remove = ascending <= 1 - top_p
    remove[..., -1] = False
    return remove.flip(-1)


def choose_tokens(
    logits: torch.Tensor, seeds: torch.Tensor, step: "int | torch.Tensor",
    sampling: "Sampling | float", overflow: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The next token of each row: argmax for temperature 0, else inverse-CDF sampling with the
    row's own uniform from softmax(logits / temperature) cut by top-k, then top-p; `logits` in
    any float dtype (the draw is the same as from the same logits widened to float32). Every
    operation is row-wise, so a row's token does not depend on the other rows; one uniform per
    row (not per vocabulary entry) keeps sampling cheap next to a decode step on a 262k
    vocabulary. Top-k runs first (torch.topk), so top-p only sorts the k survivors.

    With `overflow` (a list), top-k does not wait for the GPU to check whether ties at the k-th
    score reach past the candidates it took: it appends that check, a bool tensor, and the
    caller must draw again without `overflow` where it holds (the draw may miss tied tokens)."""
    how = as_sampling(sampling)
    if how.temperature == 0:
        return logits.argmax(dim=-1)  # widening to float32 would change no comparison
    uniforms = row_uniforms(seeds, step)[:, None]
    scores = logits.float() if how.top_k == 0 else logits
    if not how.cuts:
        cdf = torch.softmax(scores / how.temperature, dim=-1).cumsum_(dim=-1)
        picks = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).squeeze(-1)
        return picks.clamp_(max=scores.shape[-1] - 1)
    values, indices = _candidates(scores, how, overflow)
    return _pick(values, indices, uniforms, how)


def _candidates(scores: torch.Tensor, how: Sampling,
                overflow: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens that may be drawn, highest scaled score first (-inf past the top-k
    cut), with their ids; needs a cut (how.cuts)."""
    if how.top_k > 0:
        return _top_k(scores, how.top_k, how.temperature, overflow)
    ascending = torch.sort(scores / how.temperature, dim=-1, stable=True)
    return ascending.values.flip(-1), ascending.indices.flip(-1)


def _pick(values: torch.Tensor, indices: torch.Tensor, uniforms: torch.Tensor,
          how: Sampling) -> torch.Tensor:
    """Each row's token: its uniform inverted through the CDF of its candidates after top-p."""
    probs = torch.softmax(values, dim=-1)
    if how.top_p < 1.0:
        probs = probs.masked_fill(_top_p_mask(probs, how.top_p), 0.0)
    cdf = probs.cumsum_(dim=-1)
    picks = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).clamp_(max=cdf.shape[-1] - 1)
    return indices.gather(1, picks).squeeze(-1)


def choose_first_tokens(
    logits: torch.Tensor, counts: list[int], seeds: torch.Tensor, sampling: "Sampling | float",
    overflow: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """choose_tokens at step 0 for rows that share logits: the first counts[0] seeds draw from
    logits[0], the next counts[1] from logits[1], and so on (a prefill's units and their
    samples). The same tokens as choose_tokens on the logits expanded over the rows (every step
    of the draw is row-wise), but top-k runs once per row of `logits`, not once per draw. Greedy
    and top-k draws never widen the vocabulary over the rows; other draws go one unit at a time."""
    how = as_sampling(sampling)
    if how.temperature != 0 and how.top_k == 0:  # the whole vocabulary is sorted or summed
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return torch.cat([choose_tokens(logits[i].expand(n, -1), seeds[at:at + n], 0, how)
                          for i, (at, n) in enumerate(zip(starts, counts, strict=True))])
    owner = to_device([i for i, n in enumerate(counts) for _ in range(n)], logits.device)
    if how.temperature == 0:
        return logits.argmax(dim=-1).index_select(0, owner)
    values, indices = _top_k(logits, how.top_k, how.temperature, overflow)
    uniforms = row_uniforms(seeds, 0)[:, None]
    return _pick(values.index_select(0, owner), indices.index_select(0, owner), uniforms, how)
