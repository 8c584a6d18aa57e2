"""The generate stage: fill every missing rollout of a sweep, one committed unit at a time.

What is missing is a query (expected units minus rollouts present), so resuming after a crash,
a kill or Ctrl-C is just running again. A unit is one key at one patch layer with all its
samples; it is written in one transaction with INSERT ... ON CONFLICT DO NOTHING, which checks
each sample against what is there at that moment, so two processes on one store never write a
rollout twice, and a sample another process wrote first is kept as it wrote it.
"""

import gc
import hashlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session
from tqdm import tqdm

from patchdb.config import DTYPES, SweepConfig
from patchdb.controls import RANDOM_VECTOR_LAYER
from patchdb.errors import ConfigError
from patchdb.experiments import BASELINE_LAYER, NO_STEERING
from patchdb.faults import fault_point
from patchdb.generate.controls import ensure_random_vectors, unit_steer
from patchdb.generate.engine import (
    Completion,
    Engine,
    Piece,
    TargetUnit,
    auto_batch_size,
    eos_ids,
    even_batch_rows,
    plan_batches,
)
from patchdb.generate.layers import check_layer_range, find_layers
from patchdb.generate.loading import LoadedModel, default_device, load_model
from patchdb.generate.prompt import render_prompt
from patchdb.generate.readout import FirstTokenReader
from patchdb.generate.readout_stage import (
    PrefillReadouts,
    ReadoutContext,
    keep_readouts,
    missing_readouts,
)
from patchdb.generate.refill import generate_stream, unit_slots_for
from patchdb.generate.sampling import Sampling, resolve_sampling, rollout_seed
from patchdb.generate.vectors import ensure_vectors
from patchdb.store import Rollout, Store, Sweep
from patchdb.store.baselines import baseline_units
from patchdb.store.dialect import dialect_insert
from patchdb.store.models import utcnow
from patchdb.store.readouts import (
    ReadoutUnit,
    expected_readouts,
    present_readouts,
    random_vector_units,
)
from patchdb.store.runs import stage_run
from patchdb.store.sweeps import (
    ExpectedUnit,
    expected_units,
    get_experiments,
    get_sweep,
    record_sampling,
    sweep_config,
)


@dataclass
class GenerateOptions:
    """What `patchdb generate` was asked to do; None means "the sweep's own value"."""

    sweep: str | None = None
    experiments: list[str] | None = None
    layers: list[int] | None = None
    words: list[str] | None = None
    samples: int | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None  # None: pick from free device memory
    device: str | None = None  # None: cuda:0 when available, else cpu
    dtype: str | None = None
    shard: tuple[int, int] | None = None  # (index, count), index in 0..count-1
    model: str | None = None
    compile: bool | None = None  # torch.compile the graphed decode step; None: auto_compile()
    share_prefix: bool = True  # keep the prompt's KV before the injection start once (GPU)
    gpus_per_model: int = 1  # >1: one model copy spread over this many cards (device_map="auto")
    baselines: bool = True  # also every target condition with no patch (patch_layer -1)
    readout_only: bool = False  # prefill every unit for its first-token readout; no rollouts
    refill: bool = True  # static decoder (GPU): finished rows take the next sample (refill.py)


# Compiling the decode step compiles one program per kind of decoder layer (GraphedDecoder's
# update_in_attention), not one per layer as it did (40-60 s for a 27B model). On an H200 with
# a Gemma-3-27B shape it cost 6.6 s more set-up and saved 2.6 s per 1,024-row batch of 100
# tokens (12.6 -> 10.0 s): it pays from about 260,000 decode tokens on.
AUTO_COMPILE_TOKENS = 300_000
UNPATCHED = {BASELINE_LAYER, RANDOM_VECTOR_LAYER}  # units whose target run has no patch


def auto_compile(device: str, pending_tokens: int) -> bool:
    """Compile by default on GPUs when the pending work is long enough to repay it."""
    return device.startswith("cuda") and pending_tokens >= AUTO_COMPILE_TOKENS


@dataclass
class PendingUnit:
    """A unit with the sample indexes it still lacks."""

    unit: ExpectedUnit
    samples: list[int]


@dataclass
class GeneratePlan:
    sweep_id: int
    sweep_name: str
    config: SweepConfig
    samples: int
    max_new_tokens: int
    expected: int  # units in scope (after narrowing and sharding)
    pending: list[PendingUnit]
    readouts_expected: int = 0
    readouts: list[ReadoutUnit] = field(default_factory=list)  # readouts missing


@dataclass
class GenerateResult:
    plan: GeneratePlan
    units_written: int = 0
    units_skipped: int = 0  # written by another process while this one ran
    rollouts_written: int = 0
    readouts_written: int = 0
    tokens: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    interrupted: bool = False
    stage_run_id: int | None = None
    model_id: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"invalid shard {text!r}: expected i/N, e.g. 0/4")
    index, count = int(parts[0]), int(parts[1])
    if count < 1 or index >= count:
        raise ConfigError(f"invalid shard {text!r}: need N >= 1 and 0 <= i < N (i counts from 0)")
    return index, count


def in_shard(unit: ExpectedUnit, shard: tuple[int, int] | None) -> bool:
    """A stable hash of the unit's key decides its shard, the same on every machine."""
    if shard is None:
        return True
    text = "\x1f".join(
        [unit.experiment, str(unit.patch_layer), unit.source_word, unit.target_word]
    )
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return value % shard[1] == shard[0]


def _check_options(options: GenerateOptions, config: SweepConfig) -> None:
    if options.samples is not None and not 1 <= options.samples <= config.samples:
        raise ConfigError(
            f"--samples must be between 1 and the sweep's {config.samples}, got {options.samples}"
        )
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {options.max_new_tokens}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {options.batch_size}")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.device is not None:
        try:
            device = torch.device(options.device)
        except RuntimeError:
            raise ConfigError(f"invalid device {options.device!r} (e.g. cpu, cuda:0)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {options.device!r} asked for, but CUDA is not available")
    if options.gpus_per_model > 1 and not (options.device or default_device()).startswith("cuda"):
        raise ConfigError(f"--gpus-per-model {options.gpus_per_model} needs CUDA GPUs; "
                          f"device is {options.device or default_device()}")


def missing_samples(session: Session, unit: ExpectedUnit, samples: int) -> list[int]:
    """Sample indexes below `samples` that the unit has no rollout for."""
    present = set(
        session.scalars(
            select(Rollout.sample_index).where(
                Rollout.experiment_id == unit.experiment_id,
                Rollout.patch_layer == unit.patch_layer,
                Rollout.source_word == unit.source_word,
                Rollout.target_word == unit.target_word,
            )
        )
    )
    return [i for i in range(samples) if i not in present]


def plan_generate(store: Store, options: GenerateOptions) -> GeneratePlan:
    """Validate the options and find the missing units; reads only."""
    with store.read() as session:
        sweep = get_sweep(session, options.sweep)
        config = sweep_config(sweep)
        _check_options(options, config)
        experiments = get_experiments(session, sweep, options.experiments)
        baselines = (baseline_units(config, experiments, options.words)
                     + random_vector_units(config, experiments, options.words)
                     if options.baselines else [])
        units = [
            u
            for u in baselines + expected_units(config, experiments, options.layers, options.words)
            if in_shard(u, options.shard)
        ]
        readouts = [r for r in expected_readouts(config, experiments, units)
                    if in_shard(r.unit, options.shard)]
        have_readouts = present_readouts(session, [e.id for e in experiments])
        samples = options.samples or config.samples
        present: dict[tuple[int, int, str, str], set[int]] = {}
        rows = session.execute(
            select(
                Rollout.experiment_id,
                Rollout.patch_layer,
                Rollout.source_word,
                Rollout.target_word,
                Rollout.sample_index,
            ).where(Rollout.experiment_id.in_([e.id for e in experiments]))
        )
        for exp_id, layer, source, target, index in rows:
            present.setdefault((exp_id, layer, source, target), set()).add(index)
        pending = []
        for u in units:
            have = present.get((u.experiment_id, u.patch_layer, u.source_word, u.target_word), set())
            lacking = [i for i in range(samples) if i not in have]
            if lacking and not options.readout_only:
                pending.append(PendingUnit(u, lacking))
        return GeneratePlan(
            sweep_id=sweep.id,
            sweep_name=sweep.name,
            config=config,
            samples=samples,
            max_new_tokens=options.max_new_tokens or config.max_new_tokens,
            expected=len(units),
            pending=pending,
            readouts_expected=len(readouts),
            readouts=[r for r in readouts if r.key not in have_readouts],
        )


FIRST_CTRL_C = ("Ctrl-C: stopping after the current batch; every finished unit is kept. "
                "Press Ctrl-C again to stop now.")
SECOND_CTRL_C = "Ctrl-C again: stopping now; the batch in progress is dropped."


class _StopAfterBatch:
    """First Ctrl-C asks to stop after the current batch and says so at once; a second one
    interrupts at once, except while finished units are being written (then right after)."""

    def __init__(self) -> None:
        self.requested = False
        self.now = False
        self._writing = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.requested = True
            _say(FIRST_CTRL_C)
            return
        if not self.now:
            self.now = True
            _say(SECOND_CTRL_C)
        if not self._writing:
            raise KeyboardInterrupt

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Finished units are written whole even if a second Ctrl-C comes meanwhile."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
        if self.now:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator["_StopAfterBatch"]:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)


def _say(line: str) -> None:
    """One line on stderr now, from a signal handler (below any progress bar)."""
    sys.stderr.write(f"\n{line}\n")
    sys.stderr.flush()


def _store_prompt(session: Session, sweep_id: int, text: str, injection_start: int) -> None:
    sweep = session.get(Sweep, sweep_id)
    assert sweep is not None
    if sweep.prompt_text is None:
        sweep.prompt_text = text
        sweep.injection_start = injection_start
    elif sweep.prompt_text != text or sweep.injection_start != injection_start:
        raise ConfigError(
            f"sweep {sweep.name!r} was generated with a different prompt or injection start "
            f"({sweep.injection_start}, now {injection_start}); this model's tokenizer or chat "
            "template differs from the one used before"
        )


def _write_unit(
    store: Store,
    pending: PendingUnit,
    sweep_name: str,
    completions: dict[int, Completion],
    decode: Callable[[list[int]], str],
    run_id: int,
) -> int:
    """Insert the unit's rollouts in one transaction; a sample another process wrote meanwhile
    is skipped by ON CONFLICT DO NOTHING, the one re-check that holds on both backends (a
    SELECT first would leave PostgreSQL a gap between the read and the write). Returns how many
    rows this call inserted, counted by RETURNING: psycopg reports rowcount -1 here, which
    printed "Wrote -6 rollouts"."""
    unit = pending.unit

    def write(session: Session) -> int:
        rows = [
            dict(
                experiment_id=unit.experiment_id,
                patch_layer=unit.patch_layer,
                source_word=unit.source_word,
                target_word=unit.target_word,
                sample_index=index,
                answer=decode(c.token_ids),
                n_tokens=len(c.token_ids),
                finish_reason=c.finish_reason,
                seed=rollout_seed(
                    sweep_name, unit.experiment, unit.patch_layer,
                    unit.source_word, unit.target_word, index,
                ),
                stage_run_id=run_id,
                created_at=utcnow(),
            )
            for index, c in sorted(completions.items())
        ]
        stmt = dialect_insert(session, Rollout).values(rows).on_conflict_do_nothing(
            index_elements=["experiment_id", "patch_layer", "source_word", "target_word",
                            "sample_index"]).returning(Rollout.id)
        return len(session.execute(stmt).all())

    return store.transact(write)


@dataclass
class _Sources:
    """Source runs, computed on first use and kept for the whole stage run."""

    engine: Engine
    layers: list[int]
    vectors: dict[str, torch.Tensor]
    runs: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def values(self, word: str, layer: int) -> torch.Tensor:
        if word not in self.runs:
            steer = self.vectors[word] if word != NO_STEERING else None
            self.runs[word] = self.engine.source_run(steer, self.layers)
        return self.runs[word][layer]


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
    batch_rows = options.batch_size or even_batch_rows(
        sum(len(p.samples) for p in plan.pending),
        auto_batch_size(loaded.model, loaded.device, len(prompt.input_ids), plan.max_new_tokens,
                        engine.shared_prefix_len(max_len), unit_samples),
    )
    result.batch_size = batch_rows
    stopper = _StopAfterBatch()

    def decode(ids: list[int]) -> str:
        return str(loaded.tokenizer.decode(ids, skip_special_tokens=True))

    try:
        with stage_run(store, "generate", arguments, plan.sweep_id) as run, stopper.installed():
            result.stage_run_id = run.id
            store.transact(
                lambda s: _store_prompt(s, plan.sweep_id, prompt.text, prompt.injection_start)
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
            scaled = {w: raw[w].float() * config.strength for w in words}
            randoms = sorted({u.target_word for u in units if u.patch_layer == RANDOM_VECTOR_LAYER})
            random_raw = ensure_random_vectors(store, loaded.model_id, config.steer_layer,
                                               {w: raw[w] for w in randoms})
            random_scaled = {w: v.float() * config.strength for w, v in random_raw.items()}
            sources = _Sources(engine, patch_layers, scaled)
            readout = ReadoutContext(engine, loaded.tokenizer, config.prompt_intro,
                                     config.prompt_trial, scaled, random_scaled, reader, run.id,
                                     lambda: stopper.requested, stopper.writing)
            if plan.pending and streams:
                _run_stream(store, plan, engine, sources, readout, batch_rows, decode, run.id,
                            result, stopper, progress, sampling,
                            unit_slots_for(batch_rows, unit_samples) if unit_samples else 0)
            elif plan.pending:
                _run_batches(store, plan, engine, sources, readout, batch_rows, decode, run.id,
                             result, stopper, progress, sampling)
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
        import torch._dynamo

        torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _run_batches(
    store: Store,
    plan: GeneratePlan,
    engine: Engine,
    sources: _Sources,
    readout: ReadoutContext,
    batch_rows: int,
    decode: Callable[[list[int]], str],
    run_id: int,
    result: GenerateResult,
    stopper: _StopAfterBatch,
    progress: bool,
    sampling: Sampling,
) -> None:
    """Decode and write the pending units batch by batch. The bar counts token budgets (rows
    x max_new_tokens): it advances with every decode step, and a batch's rows that stopped
    early (or units another process wrote) count in full, so its ETA holds from the start."""
    done: dict[int, dict[int, Completion]] = {}
    budget = plan.max_new_tokens
    bar = tqdm(total=sum(len(p.samples) for p in plan.pending) * budget, unit="tok",
               desc="generate", disable=not progress)
    started = time.perf_counter()
    try:
        for planned in plan_batches(plan.pending, batch_rows):
            batch = _still_missing(store, plan, planned, done)
            skipped = {p.unit_index for p in planned} - {p.unit_index for p in batch}
            result.units_skipped += len(skipped)
            bar.update(budget * sum(len(p.samples) for p in planned if p.unit_index in skipped))
            if not batch:
                continue
            units = [_target_unit(piece, plan, sources, readout) for piece in batch]
            read = PrefillReadouts(readout.reader)
            fault_point("generate.batch_started")
            drawn = bar.n
            outputs = engine.generate(units, budget, sampling, on_prefill=read,
                                      on_step=bar.update)
            bar.update(budget * sum(len(p.samples) for p in batch) - (bar.n - drawn))
            fault_point("generate.batch_decoded")
            with stopper.writing():
                prefilled = [ReadoutUnit(plan.pending[p.unit_index].unit) for p in batch]
                result.readouts_written += keep_readouts(store, prefilled, read.values, run_id)
                _keep_batch(store, plan, batch, outputs, done, decode, run_id, result)
            result.seconds = time.perf_counter() - started
            bar.set_postfix_str(f"{result.units_written} units written")
            if stopper.requested:
                break
    finally:
        result.seconds = time.perf_counter() - started
        bar.close()


def _run_stream(
    store: Store,
    plan: GeneratePlan,
    engine: Engine,
    sources: _Sources,
    readout: ReadoutContext,
    batch_rows: int,
    decode: Callable[[list[int]], str],
    run_id: int,
    result: GenerateResult,
    stopper: _StopAfterBatch,
    progress: bool,
    sampling: Sampling,
    unit_slots: int,
) -> None:
    """Decode the pending units with continuous batching (refill.py) and write each unit, with
    its first-token readout, as soon as its samples are done. Units another process wrote are
    dropped as they come up (checked STREAM_CHECK units at a time); after Ctrl-C no new unit
    starts and those in progress are finished and written. The bar counts token budgets, as
    _run_batches' does."""

    budget = plan.max_new_tokens
    bar = tqdm(total=sum(len(p.samples) for p in plan.pending) * budget, unit="tok",
               desc="generate", disable=not progress)
    read: dict[int, Any] = {}
    started = time.perf_counter()

    def feed() -> Iterator[tuple[int, TargetUnit]]:
        for first in range(0, len(plan.pending), STREAM_CHECK):
            pieces = [Piece(i, plan.pending[i].samples)
                      for i in range(first, min(first + STREAM_CHECK, len(plan.pending)))]
            if stopper.requested:
                return
            batch = _still_missing(store, plan, pieces, {})
            kept = {p.unit_index for p in batch}
            for piece in pieces:
                if piece.unit_index not in kept:
                    result.units_skipped += 1
                    bar.update(budget * len(piece.samples))
            for piece in batch:
                if stopper.requested:
                    return
                fault_point("generate.batch_started")
                yield piece.unit_index, _target_unit(piece, plan, sources, readout)

    def on_prefill(keys: list[int], logits: torch.Tensor) -> None:
        read.update(zip(keys, readout.reader.read(logits), strict=True))

    def on_unit(index: int, completions: list[Completion]) -> None:
        pending = plan.pending[index]
        drawn = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in completions)
        fault_point("generate.batch_decoded")
        with stopper.writing():
            result.readouts_written += keep_readouts(
                store, [ReadoutUnit(pending.unit)], [read.pop(index)], run_id)
            _keep_batch(store, plan, [Piece(index, pending.samples)], [completions], {}, decode,
                        run_id, result)
        bar.update(budget * len(completions) - drawn)
        result.seconds = time.perf_counter() - started
        bar.set_postfix_str(f"{result.units_written} units written", refresh=False)

    try:
        generate_stream(engine, feed(), budget, sampling, batch_rows, on_unit,
                        on_prefill=on_prefill, on_step=bar.update, unit_slots=unit_slots,
                        stop=lambda: stopper.requested)
    finally:
        result.seconds = time.perf_counter() - started
        bar.close()


STREAM_CHECK = 16  # units checked against the store at a time while streaming


def _keep_batch(
    store: Store,
    plan: GeneratePlan,
    batch: list[Piece],
    outputs: list[list[Completion]],
    done: dict[int, dict[int, Completion]],
    decode: Callable[[list[int]], str],
    run_id: int,
    result: GenerateResult,
) -> None:
    """File a decoded batch's completions; write every unit that now has all its samples."""
    for piece, completions in zip(batch, outputs, strict=True):
        got = done.setdefault(piece.unit_index, {})
        for index, c in zip(piece.samples, completions, strict=True):
            got[index] = c
            result.tokens += len(c.token_ids) + (c.finish_reason == "stop")
        pending = plan.pending[piece.unit_index]
        if len(got) == len(pending.samples):
            written = _write_unit(store, pending, plan.sweep_name, got, decode, run_id)
            del done[piece.unit_index]
            if written:
                result.units_written += 1
            else:  # another process wrote all of it after this one decoded it
                result.units_skipped += 1
            result.rollouts_written += written
            fault_point("generate.unit_written")


def _still_missing(
    store: Store, plan: GeneratePlan, batch: list[Piece], started: dict[int, Any]
) -> list[Piece]:
    """Drop the pieces of units that another process has written since the plan was made
    (a unit already half computed here is kept; its write skips what exists)."""
    fresh = {p.unit_index for p in batch if p.unit_index not in started}
    if not fresh:
        return batch
    with store.read() as session:
        gone = {
            i for i in fresh
            if not set(plan.pending[i].samples)
            & set(missing_samples(session, plan.pending[i].unit, plan.samples))
        }
    return [p for p in batch if p.unit_index not in gone]


def _target_unit(
    piece: Piece, plan: GeneratePlan, sources: _Sources, readout: ReadoutContext
) -> TargetUnit:
    unit = plan.pending[piece.unit_index].unit
    steer = unit_steer(unit, readout.scaled, readout.random_scaled)
    baseline = unit.patch_layer in UNPATCHED  # no patch: the row's MLPs are left alone
    return TargetUnit(
        steer=steer,
        patch_layer=None if baseline else unit.patch_layer,
        patch_values=None if baseline else sources.values(unit.source_word, unit.patch_layer),
        seeds=[
            rollout_seed(plan.sweep_name, unit.experiment, unit.patch_layer,
                         unit.source_word, unit.target_word, index)
            for index in piece.samples
        ],
    )
