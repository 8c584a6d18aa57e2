"""How many decode rows a batch takes and which samples go into it: the auto batch size from free
device memory, and batches planned in order (fixed batches; continuous batching takes samples
one by one)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from patchdb.generate.pages import PAGE, pages_for, steady_pages_per_row
from patchdb.generate.unit_queue import PREFILL_UNITS


@dataclass
class Piece:
    """Some samples of one pending unit (by index) that go into one batch."""

    unit_index: int
    samples: list[int]


def plan_batches(pending: Sequence[Any], batch_rows: int) -> list[list[Piece]]:
    """Group units into batches of at most `batch_rows` decode rows, in order. A unit with more
    samples than that is split over consecutive batches. Items need a `samples` list."""
    batches: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for index, unit in enumerate(pending):
        samples = list(unit.samples)
        while samples:
            if used == batch_rows:
                batches.append(current)
                current, used = [], 0
            take = samples[: batch_rows - used]
            samples = samples[len(take) :]
            current.append(Piece(index, take))
            used += len(take)
    if current:
        batches.append(current)
    return batches


def even_batch_rows(total_rows: int, most: int) -> int:
    """The fewest rows a batch needs so that `total_rows` still takes as few batches of at most
    `most` rows: the batches come out even (1,040 rows a batch over 11,264 rows: 1,024), the
    last is not a small remainder, and a captured step fits every batch."""
    if total_rows <= 0:
        return most
    batches = -(-total_rows // most)
    return -(-total_rows // batches)


CPU_BATCH_ROWS = 64
# Rows take free GPU memory up to where the estimate would fill this fraction of the card. The
# old rule, 80% of free memory, left a Gemma-3-27B shape at 90% of an H100 (389 rows) but 82%
# of an H200 (1,252 rows, a sixth fewer than fit); the estimate runs about 2% over what a row
# took in those runs (51 MiB). At 0.92, 403 rows on an H100 reserved 92.5% of it at the peak;
# at 0.91, 395 rows reserved 92.3% and 92.6% (uniform and early-ending answers), and paged KV
# (831 rows) 92.0%.
PEAK_FRACTION = 0.90
MAX_BATCH_ROWS = 4096
# Bytes a row takes per vocabulary entry at the sampler's peak: the logits (model dtype, at
# most 4) and, where a draw sorts or sums the whole vocabulary (no top-k), float32 scores,
# their softmax and sort (values and int64 indices, and their flipped copies).
VOCAB_BYTES_TOP_K = 4 + 4
VOCAB_BYTES_WHOLE = 4 + 4 + 8 + 4 + 4


def rows_that_fit(free: int, card: int, per_row: int, fixed: int = 0) -> int:
    """Rows of `per_row` bytes (plus `fixed` bytes once) that fit `free` bytes of a `card`-byte
    card without filling more than PEAK_FRACTION of it."""
    budget = free - (1 - PEAK_FRACTION) * card - fixed
    return max(1, min(MAX_BATCH_ROWS, int(budget) // max(per_row, 1)))


@dataclass
class RowCosts:
    """What decode rows take on the card: `token` bytes of KV a position, `other` bytes a row
    beside its answer's KV, `fixed` bytes once; `free` and `card` bytes of the cards."""

    token: int
    other: int
    fixed: int
    free: int
    card: int


def full_rows(costs: RowCosts, max_new_tokens: int) -> int:
    """The auto batch with room for a full answer's KV in every row: the most rows of
    row_costs' estimate that rows_that_fit allows (a CPU run takes CPU_BATCH_ROWS)."""
    return rows_that_fit(costs.free, costs.card, costs.token * max_new_tokens + costs.other,
                         costs.fixed)


def row_costs(model: PreTrainedModel, device: torch.device, prompt_len: int,
              shared_prefix: int = 0, samples: int = 0, whole_vocab: bool = True) -> RowCosts:
    """What decode rows take on a CUDA device, and its free memory. Per row: the KV cache per
    position (`token`; the prompt's, less a prefix kept once for all rows, counts in `other`),
    plus the logits and what the sampler takes over the vocabulary (`whole_vocab`: a draw
    without top-k, over float32 probabilities of every token). With `samples` (continuous
    batching with unit slots, refill.py) the prompt after the prefix is kept once per unit, in
    unit_slots_for(rows, samples) slots, not in every row."""
    config = model.config.get_text_config()
    n_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    n_heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    head_dim = int(getattr(config, "head_dim", None) or hidden // max(n_heads, 1))
    vocab = int(getattr(config, "vocab_size", 0))
    element = next(model.parameters()).element_size()
    token_bytes = 2 * n_layers * n_kv * head_dim * element
    own_prompt = prompt_len - shared_prefix
    if samples:
        # Unit slots: 4 per rows/samples units, plus 8 (unit_slots_for), and the units prefilled
        # ahead (twice the rows' samples, refill.py), whose prompts wait in their chunks. A
        # prefill takes PREFILL_UNITS units at a time, whatever the rows.
        intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
        per_row_prompt = token_bytes * own_prompt * (4 + 2) / samples
        per_row_prefill = 0
        fixed = (token_bytes * own_prompt * 12  # 8 slots, and a unit's rounding up
                 + PREFILL_UNITS * prompt_len * (4 * hidden + 3 * intermediate) * element)
    else:  # each row's prompt in its own cache, prefilled with its batch
        per_row_prompt = token_bytes * own_prompt
        per_row_prefill = hidden * element * prompt_len
        fixed = 0
    vocab_bytes = VOCAB_BYTES_WHOLE if whole_vocab else VOCAB_BYTES_TOP_K
    other = int(per_row_prompt + vocab * vocab_bytes + per_row_prefill)
    free = total = 0
    # A model spread over cards keeps each layer's cache on that layer's card.
    cards = {p.device for p in model.parameters() if p.device.type == "cuda"} or {device}
    for card in cards:
        card_free, card_total = torch.cuda.mem_get_info(card)
        # Memory this process's allocator holds but does not use is free for us too.
        free += card_free + torch.cuda.memory_reserved(card) - torch.cuda.memory_allocated(card)
        total += card_total
    return RowCosts(token_bytes, other, int(fixed), free, total)


# Paged KV (pages.py) pays where it gives at least this many more rows than a full answer's
# cache a row; the pool holds this much more than the rows take on average (answers that run
# long together).
PAGED_GAIN = 1.15
POOL_MARGIN = 1.1
# Rows hold their pages' average only once their answers are out of step. Answers of one
# length (every one at the cap, as when EOS is never drawn), of nearly one, or a large share at
# one length keep the rows that start together in step, all long at once, and rows wait for
# pages: paging needs answers whose lengths spread (coefficient of variation at least
# MIN_SPREAD) with at most MOST_AT_ONE_LENGTH of them at one length. In scripts/sim_pages.py on
# the benched H100 pool (831 rows), the benchmark's stop lengths (27% at the cap, spread 0.64)
# keep 94.5% of step-rows drawing; every answer at the cap, 36.5%; 60% ending at once and 40%
# at the cap, 31.6%.
MIN_SPREAD = 0.4
MOST_AT_ONE_LENGTH = 0.3


def _capped(lengths: dict[int, int], max_new_tokens: int) -> dict[int, int]:
    capped: dict[int, int] = {}
    for n, c in lengths.items():
        at = min(max(n, 1), max_new_tokens)
        capped[at] = capped.get(at, 0) + c
    return capped


def paged_batch_allowed(lengths: dict[int, int], max_new_tokens: int) -> bool:
    """Whether answers of these lengths (tokens drawn -> count) spread enough for paged KV
    (MIN_SPREAD, MOST_AT_ONE_LENGTH)."""
    return _spread_enough(_capped(lengths, max_new_tokens))


def _spread_enough(capped: dict[int, int]) -> bool:
    total = sum(capped.values())
    if not total or max(capped.values()) > MOST_AT_ONE_LENGTH * total:
        return False
    mean = sum(n * c for n, c in capped.items()) / total
    spread = (sum(c * (n - mean) ** 2 for n, c in capped.items()) / total) ** 0.5 / mean
    return spread >= MIN_SPREAD


def paged_batch(costs: RowCosts, max_new_tokens: int, lengths: dict[int, int]
                ) -> tuple[int, int] | None:
    """Rows and KV pages (of PAGE positions) for continuous batching with KV by need, where
    answers take these lengths (tokens drawn -> count): each row costs its share of the pool
    (the pages a row holds on average over time, times POOL_MARGIN) beside `other`; None where
    that gives fewer than PAGED_GAIN times the rows of a full cache a row, or where the
    lengths do not spread (paged_batch_allowed)."""
    capped = _capped(lengths, max_new_tokens)
    if not _spread_enough(capped):
        return None
    per_row = steady_pages_per_row(capped) * POOL_MARGIN
    page_bytes = costs.token * PAGE
    rows = rows_that_fit(costs.free, costs.card, int(per_row * page_bytes) + costs.other,
                         costs.fixed)
    if rows < PAGED_GAIN * full_rows(costs, max_new_tokens):
        return None
    budget = costs.free - (1 - PEAK_FRACTION) * costs.card - costs.fixed - rows * costs.other
    pages = min(int(budget) // page_bytes, rows * pages_for(max_new_tokens))
    return rows, max(pages, pages_for(max_new_tokens) + 1)
