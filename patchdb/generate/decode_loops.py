"""The generate stage's decode loops: fixed batches (run_batches) or continuous batching on the
static decoder (run_stream), each unit written with its first-token readout in one transaction as
soon as all its samples are done; and Ctrl-C handling (first: start nothing new, finish and write
what is in progress; second: stop now)."""


import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from sqlalchemy.orm import Session
from tqdm import tqdm

from patchdb.errors import ConfigError
from patchdb.experiments import NO_STEERING
from patchdb.faults import fault_point
from patchdb.generate.batching import Piece, plan_batches
from patchdb.generate.controls import unit_steer
from patchdb.generate.engine import Completion, Engine, TargetUnit
from patchdb.generate.plan import (
    UNPATCHED,
    GeneratePlan,
    GenerateResult,
    PendingUnit,
    missing_samples,
)
from patchdb.generate.readout_stage import (
    PrefillReadouts,
    ReadoutContext,
    keep_readouts,
)
from patchdb.generate.refill import generate_stream
from patchdb.generate.sampling import Sampling, rollout_seed
from patchdb.store import Rollout, Store, Sweep
from patchdb.store.dialect import dialect_insert
from patchdb.store.models import utcnow
from patchdb.store.readouts import (
    ReadoutUnit,
)

FIRST_CTRL_C = ("Ctrl-C: stopping after the current batch; every finished unit is kept. "
                "Press Ctrl-C again to stop now.")
SECOND_CTRL_C = "Ctrl-C again: stopping now; the batch in progress is dropped."


class StopAfterBatch:
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
    def installed(self) -> Iterator["StopAfterBatch"]:
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


def store_prompt(session: Session, sweep_id: int, text: str, injection_start: int) -> None:
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


def write_unit(
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
class Sources:
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


@dataclass
class StageRun:
    """What the decode loops take from the stage run: the store and plan, the engine and
    where its source runs, readouts and sampling come from, how answers are decoded to text,
    the stage_runs row, the result to count into, Ctrl-C, and whether a bar is shown."""

    store: Store
    plan: GeneratePlan
    engine: Engine
    sources: Sources
    readout: ReadoutContext
    decode: Callable[[list[int]], str]
    run_id: int
    result: GenerateResult
    stopper: StopAfterBatch
    progress: bool
    sampling: Sampling


def run_batches(run: StageRun, batch_rows: int) -> None:
    """Decode and write the pending units batch by batch. The bar counts token budgets (rows
    x max_new_tokens): it advances with every decode step, and a batch's rows that stopped
    early (or units another process wrote) count in full, so its ETA holds from the start."""
    store, plan, engine, result, stopper = run.store, run.plan, run.engine, run.result, run.stopper
    done: dict[int, dict[int, Completion]] = {}
    budget = plan.max_new_tokens
    bar = tqdm(total=sum(len(p.samples) for p in plan.pending) * budget, unit="tok",
               desc="generate", disable=not run.progress)
    started = time.perf_counter()
    try:
        for planned in plan_batches(plan.pending, batch_rows):
            batch = still_missing(store, plan, planned, done)
            skipped = {p.unit_index for p in planned} - {p.unit_index for p in batch}
            result.units_skipped += len(skipped)
            bar.update(budget * sum(len(p.samples) for p in planned if p.unit_index in skipped))
            if not batch:
                continue
            units = [target_unit(piece, plan, run.sources, run.readout) for piece in batch]
            read = PrefillReadouts(run.readout.reader)
            fault_point("generate.batch_started")
            drawn = bar.n
            outputs = engine.generate(units, budget, run.sampling, on_prefill=read,
                                      on_step=bar.update)
            bar.update(budget * sum(len(p.samples) for p in batch) - (bar.n - drawn))
            fault_point("generate.batch_decoded")
            with stopper.writing():
                prefilled = [ReadoutUnit(plan.pending[p.unit_index].unit) for p in batch]
                result.readouts_written += keep_readouts(store, prefilled, read.values,
                                                         run.run_id)
                keep_batch(store, plan, batch, outputs, done, run.decode, run.run_id, result)
            result.seconds = time.perf_counter() - started
            bar.set_postfix_str(f"{result.units_written} units written")
            if stopper.requested:
                break
    finally:
        result.seconds = time.perf_counter() - started
        bar.close()


def run_stream(run: StageRun, batch_rows: int, unit_slots: int, kv_pages: int = 0) -> None:
    """Decode the pending units with continuous batching (refill.py) and write each unit, with
    its first-token readout, as soon as its samples are done. Units another process wrote are
    dropped as they come up (checked STREAM_CHECK units at a time); after Ctrl-C no new unit
    starts and those in progress are finished and written. The bar counts token budgets, as
    run_batches' does. `kv_pages`: the rows' KV by need, in that many pages (pages.py)."""
    store, plan, engine, result, stopper = run.store, run.plan, run.engine, run.result, run.stopper
    budget = plan.max_new_tokens
    bar = tqdm(total=sum(len(p.samples) for p in plan.pending) * budget, unit="tok",
               desc="generate", disable=not run.progress)
    read: dict[int, Any] = {}
    started = time.perf_counter()

    def feed() -> Iterator[tuple[int, TargetUnit]]:
        for first in range(0, len(plan.pending), STREAM_CHECK):
            pieces = [Piece(i, plan.pending[i].samples)
                      for i in range(first, min(first + STREAM_CHECK, len(plan.pending)))]
            if stopper.requested:
                return
            batch = still_missing(store, plan, pieces, {})
            kept = {p.unit_index for p in batch}
            for piece in pieces:
                if piece.unit_index not in kept:
                    result.units_skipped += 1
                    bar.update(budget * len(piece.samples))
            for piece in batch:
                if stopper.requested:
                    return
                fault_point("generate.batch_started")
                yield piece.unit_index, target_unit(piece, plan, run.sources, run.readout)

    def on_prefill(keys: list[int], logits: torch.Tensor) -> None:
        # computed now, read when the unit is written: no wait for the GPU while it decodes
        pending = run.readout.reader.start(logits)
        read.update((key, (pending, i)) for i, key in enumerate(keys))

    def readout(index: int) -> Any:
        values, row = read.pop(index)
        return values.values()[row]

    def on_unit(index: int, completions: list[Completion]) -> None:
        pending = plan.pending[index]
        drawn = sum(len(c.token_ids) + (c.finish_reason == "stop") for c in completions)
        fault_point("generate.batch_decoded")
        with stopper.writing():
            result.readouts_written += keep_readouts(
                store, [ReadoutUnit(pending.unit)], [readout(index)], run.run_id)
            keep_batch(store, plan, [Piece(index, pending.samples)], [completions], {},
                       run.decode, run.run_id, result)
        bar.update(budget * len(completions) - drawn)
        result.seconds = time.perf_counter() - started
        bar.set_postfix_str(f"{result.units_written} units written", refresh=False)

    try:
        generate_stream(engine, feed(), budget, run.sampling, batch_rows, on_unit,
                        on_prefill=on_prefill, on_step=bar.update, unit_slots=unit_slots,
                        stop=lambda: stopper.requested, kv_pages=kv_pages)
    finally:
        result.seconds = time.perf_counter() - started
        bar.close()


STREAM_CHECK = 16  # units checked against the store at a time while streaming


def keep_batch(
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
            written = write_unit(store, pending, plan.sweep_name, got, decode, run_id)
            del done[piece.unit_index]
            if written:
                result.units_written += 1
            else:  # another process wrote all of it after this one decoded it
                result.units_skipped += 1
            result.rollouts_written += written
            fault_point("generate.unit_written")


def still_missing(
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


def target_unit(
    piece: Piece, plan: GeneratePlan, sources: Sources, readout: ReadoutContext
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
