"""The readout pass of `patchdb generate`: one prefill row per missing readout, no decoding.

`generate` writes each unit's trial readout as it prefills the unit for its rollouts; this pass
fills every readout still missing afterwards (all of them with `--readout-only`): the units'
trial readouts and, with the unrelated_questions control, one per question and unit. Units are
batched by question, since each question is its own prompt (and so its own source runs).
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from patchdb.controls import TRIAL_QUESTION
from patchdb.experiments import BASELINE_LAYER, NO_STEERING
from patchdb.faults import fault_point
from patchdb.generate.controls import RANDOM_VECTOR_LAYER, question_prompt, unit_steer
from patchdb.generate.engine import Engine, TargetUnit
from patchdb.generate.readout import FirstTokenReader
from patchdb.store import Store
from patchdb.store.models import utcnow
from patchdb.store.readouts import ReadoutUnit, ReadoutValues, insert_readouts, present_readouts

CPU_READOUT_ROWS = 64
MAX_READOUT_ROWS = 512
FREE_FRACTION = 0.8


def readout_rows(engine: Engine) -> int:
    """Prefill rows per readout batch: 64 on the CPU; on a GPU as many as free memory holds
    (per row: the KV cache of the prompt, the layer activations over it, eager attention
    scores, the logits)."""
    if engine.device.type != "cuda":
        return CPU_READOUT_ROWS
    config = engine.model.config.get_text_config()
    hidden = engine.hidden_size
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    n_layers = len(engine.layer_map.layers)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    n = engine.prompt_len + 16  # an unrelated question's prompt may be a little longer
    element = next(engine.model.parameters()).element_size()
    per_row = (n * (6 * hidden + 4 * inter + 2 * n_layers * kv_heads * head_dim) * element
               + heads * n * n * 4 + vocab * 12)
    free, _ = torch.cuda.mem_get_info(engine.device)
    free += torch.cuda.memory_reserved(engine.device) - torch.cuda.memory_allocated(engine.device)
    return max(1, min(MAX_READOUT_ROWS, int(FREE_FRACTION * free) // per_row))


class PrefillReadouts:
    """Collects the readouts of a rollout batch's prefill (Engine.generate's on_prefill)."""

    def __init__(self, reader: FirstTokenReader) -> None:
        self.reader = reader
        self.values: list[ReadoutValues] = []

    def __call__(self, logits: torch.Tensor) -> None:
        self.values.extend(self.reader.read(logits))


def _write(store: Store, values: dict[ReadoutUnit, ReadoutValues], run_id: int) -> int:
    """Insert readouts in one transaction; returns how many rows were new."""
    return store.transact(lambda s: insert_readouts(s, values, run_id, utcnow()))


@dataclass
class ReadoutContext:
    """What the pass needs from the stage: the model's trial engine and prompt settings, the
    scaled vectors, and the stage's Ctrl-C handling."""

    engine: Engine
    tokenizer: object
    intro: str
    trial: str
    scaled: dict[str, torch.Tensor]
    random_scaled: dict[str, torch.Tensor]
    reader: FirstTokenReader
    run_id: int
    stop_requested: Callable[[], bool]
    writing: Callable[[], AbstractContextManager[None]]


@dataclass
class _Question:
    engine: Engine
    sources: dict[str, dict[int, torch.Tensor]]


def _engines(ctx: ReadoutContext, question: str) -> _Question:
    if question == TRIAL_QUESTION:
        return _Question(ctx.engine, {})
    prompt = question_prompt(ctx.tokenizer, ctx.intro, ctx.trial, question)
    e = ctx.engine
    engine = Engine(e.model, e.layer_map, prompt.input_ids, prompt.injection_start,
                    e.steer_layer, e.eos_token_ids, use_graphs=False)
    return _Question(engine, {})


def _batches(pending: list[ReadoutUnit], rows: int) -> Iterator[tuple[str, list[ReadoutUnit]]]:
    """Pending readouts grouped by question (in order of first appearance), `rows` at a time."""
    by_question: dict[str, list[ReadoutUnit]] = {}
    for r in pending:
        by_question.setdefault(r.question, []).append(r)
    for question, items in by_question.items():
        for start in range(0, len(items), rows):
            yield question, items[start:start + rows]


def _target(r: ReadoutUnit, q: _Question, ctx: ReadoutContext, layers: list[int]) -> TargetUnit:
    unit = r.unit
    steer = unit_steer(unit, ctx.scaled, ctx.random_scaled)
    if unit.patch_layer in (BASELINE_LAYER, RANDOM_VECTOR_LAYER):
        return TargetUnit(steer, None, None, [])
    word = unit.source_word
    if word not in q.sources:
        source = ctx.scaled[word] if word != NO_STEERING else None
        q.sources[word] = q.engine.source_run(source, layers)
    return TargetUnit(steer, unit.patch_layer, q.sources[word][unit.patch_layer], [])


def run_readouts(
    store: Store, pending: list[ReadoutUnit], ctx: ReadoutContext, rows: int, progress: bool
) -> int:
    """Compute and write every pending readout (each batch in one transaction); returns how
    many rows were inserted. Stops after a batch when the stage was asked to stop."""
    layers = sorted({r.unit.patch_layer for r in pending} - {BASELINE_LAYER, RANDOM_VECTOR_LAYER})
    written = 0
    questions: dict[str, _Question] = {}
    bar = tqdm(total=len(pending), unit="readout", desc="readout", disable=not progress)
    try:
        for question, batch in _batches(pending, rows):
            if question not in questions:
                questions = {question: _engines(ctx, question)}  # one question's runs at a time
            q = questions[question]
            units = [_target(r, q, ctx, layers) for r in batch]
            values = ctx.reader.read(q.engine.readout_logits(units))
            found: dict[ReadoutUnit, ReadoutValues] = dict(zip(batch, values, strict=True))
            with ctx.writing():
                written += _write(store, found, ctx.run_id)
            bar.update(len(batch))
            fault_point("generate.readouts_written")
            if ctx.stop_requested():
                break
    finally:
        bar.close()
    return written


def keep_readouts(
    store: Store, prefilled: list[ReadoutUnit], read: list[ReadoutValues], run_id: int
) -> int:
    """Write the readouts a rollout batch's prefill gave, one per prefill row (a unit split over
    batches is prefilled in each: the first write wins, and the values are the same)."""
    return _write(store, dict(zip(prefilled, read, strict=True)), run_id)


def missing_readouts(
    store: Store, planned: list[ReadoutUnit], ctx: ReadoutContext, progress: bool
) -> int:
    """The readout pass over the planned readouts still missing now (a rollout pass before it
    wrote some, another process may have written others)."""
    with store.read() as session:
        have = present_readouts(session, sorted({r.unit.experiment_id for r in planned}))
    pending = [r for r in planned if r.key not in have]
    if not pending:
        return 0
    return run_readouts(store, pending, ctx, readout_rows(ctx.engine), progress)
