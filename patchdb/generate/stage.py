"""The generate stage: fill every missing rollout of a sweep, one committed unit at a time.

What is missing is a query (expected units minus rollouts present), so resuming after a crash,
a kill or Ctrl-C is just running again. A unit is one key at one patch layer with all its
samples; it is written in one transaction with INSERT ... ON CONFLICT DO NOTHING, which checks
each sample against what is there at that moment, so two processes on one store never write a
rollout twice, and a sample another process wrote first is kept as it wrote it.
"""

import gc
import logging
from collections.abc import Callable

import torch

from patchdb.controls import RANDOM_VECTOR_LAYER
from patchdb.experiments import NO_STEERING
from patchdb.generate.batching import (
    CPU_BATCH_ROWS,
    even_batch_rows,
    full_rows,
    paged_batch,
    row_costs,
)
from patchdb.generate.controls import ensure_random_vectors
from patchdb.generate.decode_loops import (
    FIRST_CTRL_C,
    SECOND_CTRL_C,
    Sources,
    StageRun,
    StopAfterBatch,
    run_batches,
    run_stream,
    store_prompt,
)
from patchdb.generate.engine import Engine, eos_ids
from patchdb.generate.layers import check_layer_range, find_layers
from patchdb.generate.loading import LoadedModel, default_device, load_model
from patchdb.generate.plan import (  # re-exported: the CLI, tests and scripts import them here
    AUTO_COMPILE_TOKENS,
    UNPATCHED,
    GenerateOptions,
    GeneratePlan,
    GenerateResult,
    PendingUnit,
    auto_compile,
    in_shard,
    missing_samples,
    parse_shard,
    plan_generate,
)
from patchdb.generate.prompt import render_prompt
from patchdb.generate.readout import FirstTokenReader
from patchdb.generate.readout_stage import (
    ReadoutContext,
    missing_readouts,
)
from patchdb.generate.refill import unit_slots_for
from patchdb.generate.sampling import resolve_sampling
from patchdb.generate.vectors import ensure_vectors
from patchdb.store import Store
from patchdb.store.runs import stage_run
from patchdb.store.sweeps import (
    record_sampling,
)

log = logging.getLogger(__name__)

# Continuous batching keeps rows' KV by need (pages.py) once the store holds this many answers
# of the sweep's experiments: their lengths size the rows and the pool (before that, a row
# keeps room for a full answer).
MIN_STORED_ANSWERS = 256
# ... and, unless asked for (--kv-pages), only where a full cache a row leaves fewer rows than
# this: a step of more rows is bound by its matmuls, and more rows add no speed. On an H100
# (Gemma-3-27B shape, 395 rows) the matmuls ran at 94% of the card's measured peak, and paging
# doubled the rows (831) for 1.3% more tokens a second.
PAGED_BELOW_ROWS = 256

__all__ = ["AUTO_COMPILE_TOKENS", "FIRST_CTRL_C", "SECOND_CTRL_C", "UNPATCHED", "GenerateOptions",
           "GeneratePlan", "GenerateResult", "PendingUnit", "auto_compile", "in_shard",
           "missing_samples", "parse_shard", "plan_generate", "run_generate"]


def run_generate(
    store: Store,
    options: GenerateOptions,
    *,
    progress: bool = True,
    load: Callable[..., LoadedModel] = load_model,
) -> GenerateResult:
    """Generate every missing rollout in scope; returns counts and throughput."""
    plan = plan_generate(store, options)
    result = GenerateResult(plan)
    config = plan.config
    arguments = {k: v for k, v in vars(options).items() if v is not None}
    if not plan.pending and not plan.readouts:
        return result  # a run that does nothing leaves no stage_runs row behind

    device = options.device or default_device()
    spread: dict[str, list[int]] = {}
    if options.gpus_per_model > 1:  # a CUDA device (_check_options); the loader checks the cards
        first = torch.device(device).index or 0
        spread["spread"] = list(range(first, first + options.gpus_per_model))
    loaded = load(
        options.model or config.model,
        dtype=options.dtype or config.dtype,
        device=device,
        revision=config.model_revision,
        announce=progress,
        **spread,
    )
    result.model_id = loaded.model_id
    if loaded.device.type == "cuda":
        # Streams, graphs and kernels this process starts belong to its own card (a torchrun
        # rank on cuda:1 would otherwise capture on cuda:0); the loader has checked the device.
        torch.cuda.set_device(loaded.device)
    layer_map = find_layers(loaded.model)
    check_layer_range(len(layer_map.layers), [config.steer_layer], "steer layer")
    patch_layers = sorted({p.unit.patch_layer for p in plan.pending} - UNPATCHED)
    check_layer_range(len(layer_map.layers),
                      sorted({r.unit.patch_layer for r in plan.readouts} - UNPATCHED), "patch layer")
    reader = FirstTokenReader(loaded.tokenizer)
    prompt = render_prompt(loaded.tokenizer, config.prompt_intro, config.prompt_trial)
    sampling = resolve_sampling(
        loaded.model.generation_config, config.temperature, config.top_k, config.top_p
    )
    pending_tokens = sum(len(p.samples) for p in plan.pending) * plan.max_new_tokens
    compile_decode = (options.compile if options.compile is not None
                      else auto_compile(device, pending_tokens))
    engine = Engine(
        loaded.model, layer_map, prompt.input_ids, prompt.injection_start,
        config.steer_layer, eos_ids(loaded.model, loaded.tokenizer),
        compile_decode=compile_decode, share_prefix=options.share_prefix,
    )
    max_len = len(prompt.input_ids) + plan.max_new_tokens
    streams = options.refill and engine.decodes_static(max_len)
    # continuous batching keeps each unit's prompt once (unit slots, sized by its samples)
    unit_samples = (sorted(len(p.samples) for p in plan.pending)[len(plan.pending) // 2]
                    if streams and plan.pending and engine.fast_attention else 0)
    whole_vocab = sampling.temperature != 0 and sampling.top_k == 0
    costs = (row_costs(loaded.model, loaded.device, len(prompt.input_ids),
                       engine.shared_prefix_len(max_len), unit_samples, whole_vocab)
             if loaded.device.type == "cuda" else None)
    fits = full_rows(costs, plan.max_new_tokens) if costs is not None else CPU_BATCH_ROWS
    kv_pages = 0
    stored = sum(plan.answer_lengths.values())
    wanted = options.kv_pages if options.kv_pages is not None else fits < PAGED_BELOW_ROWS
    if (wanted and streams and unit_samples and options.batch_size is None
            and costs is not None and stored >= MIN_STORED_ANSWERS):
        # KV by need: rows sized for the lengths of the answers already stored
        paged = paged_batch(costs, plan.max_new_tokens, plan.answer_lengths)
        if paged is not None:
            log.info("patchdb: KV by need: %d rows (a full cache a row: %d), %d pages, sized "
                     "from %d stored answers", paged[0], fits, paged[1], stored)
            fits, kv_pages = paged
    # fixed batches come out even; continuous batching has no batches to even out
    batch_rows = options.batch_size or (
        fits if streams else even_batch_rows(sum(len(p.samples) for p in plan.pending), fits))
    result.batch_size = batch_rows
    result.kv_pages = kv_pages
    stopper = StopAfterBatch()

    def decode(ids: list[int]) -> str:
        return str(loaded.tokenizer.decode(ids, skip_special_tokens=True))

    try:
        with stage_run(store, "generate", arguments, plan.sweep_id) as run, stopper.installed():
            result.stage_run_id = run.id
            store.transact(
                lambda s: store_prompt(s, plan.sweep_id, prompt.text, prompt.injection_start)
            )
            if plan.pending:  # the readout pass never samples: only rollouts bind top_k/top_p
                store.transact(
                    lambda s: record_sampling(s, plan.sweep_id, sampling.top_k, sampling.top_p)
                )
            units = [p.unit for p in plan.pending] + [r.unit for r in plan.readouts]
            words = sorted(
                ({u.source_word for u in units} | {u.target_word for u in units}) - {NO_STEERING}
            )
            raw = ensure_vectors(store, loaded, config.steer_layer, words)
            # on the engine's card once: a copy from the host per unit would wait for the GPU
            scaled = {w: (raw[w].float() * config.strength).to(engine.device) for w in words}
            randoms = sorted({u.target_word for u in units if u.patch_layer == RANDOM_VECTOR_LAYER})
            random_raw = ensure_random_vectors(store, loaded.model_id, config.steer_layer,
                                               {w: raw[w] for w in randoms})
            random_scaled = {w: (v.float() * config.strength).to(engine.device)
                             for w, v in random_raw.items()}
            sources = Sources(engine, patch_layers, scaled)
            readout = ReadoutContext(engine, loaded.tokenizer, config.prompt_intro,
                                     config.prompt_trial, scaled, random_scaled, reader, run.id,
                                     lambda: stopper.requested, stopper.writing)
            loop = StageRun(store, plan, engine, sources, readout, decode, run.id, result,
                            stopper, progress, sampling)
            if plan.pending and streams:
                run_stream(loop, batch_rows,
                           unit_slots_for(batch_rows, unit_samples) if unit_samples else 0,
                           kv_pages)
            elif plan.pending:
                run_batches(loop, batch_rows)
            if not stopper.requested:
                result.readouts_written += missing_readouts(store, plan.readouts, readout,
                                                            progress)
            if stopper.requested:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        _release(engine, loaded.device, compile_decode)
    return result


def _release(engine: Engine, device: torch.device, compiled: bool) -> None:
    """Give the run's decoder memory back before the next run in this process (each sweep of
    `generate --sweep 'glob*'`, a benchmark's variants): compiled programs hold the static
    cache they were traced on, so they are dropped too."""
    engine._decoder = None
    if device.type != "cuda":
        return
    if compiled:
        import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would bind `torch`
        # here, a local name, and leave it unbound when nothing was compiled)

        dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
