"""Continuous batching on the static decoder: a row whose answer ends takes the next sample.

Answers end at different lengths (most of a real model's are far shorter than the cap), and a
batch decoded in lockstep either keeps finished rows in the step, computing nothing useful, or
moves to smaller captured graphs and leaves the card half idle. Here the decoder keeps its full
row count while work remains: finished rows are harvested and refilled with the next samples
(of the same unit or the next ones), each row at its own step. Units are prefilled ahead in
chunks (the prompt before the injection start run once and copied), and only each unit's own
prompt KV is kept until its samples have rows.

The GPU is never left waiting for the host: each step is launched before the host looks at the
last draw, whose outcome is copied to pinned memory without a sync and read while the step runs
(rows admitted meanwhile skip that step's draw). Finished units are written one a step, while
steps run, and units are prefilled ahead, with nothing in a prefill waiting for the GPU.

A row's tokens depend on its unit (prompt KV and steering vector) and its seed only: its
uniforms come from (seed, its own step), and attention reads only its own cache. So refilling
changes no answer; tests compare every row with the eager decode.
"""

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from patchdb.generate.engine import Completion, Engine, TargetUnit, parse_row
from patchdb.generate.graphed import GraphedDecoder
from patchdb.generate.pages import PAGE
from patchdb.generate.sampling import Sampling, as_sampling, choose_tokens
from patchdb.generate.transfer import to_device
from patchdb.generate.unit_queue import Unit, UnitQueue

# Harvest and refill once at least this fraction of the rows has finished. A refill costs the
# GPU a few small kernels (with unit slots no prompt is copied) and the host's work runs while a
# step does; rows left waiting for the threshold draw nothing. At 1/16, a one-layer H100 bench
# (381 rows, answers of the early-stop model) kept 97.7% of step-rows drawing before the drain,
# as scripts/sim_refill.py predicts for it; the simulation gives 99.8% at 1/64 (6 rows). On one
# H100 at fixed rows (A B B A in one process), 1/64 measured 99.8% and drew 1.3-4.2% more
# tokens a second than 1/16 before the drain.
REFILL_FRACTION = 1 / 64
# Samples kept prefilled ahead: the queue is topped up to AHEAD_ROWS rows' worth once it holds
# under TOP_UP_BELOW rows' worth, in at most PREFILLS_PER_STEP prefill calls while one step runs
# (None: all at once). A call's host time (about 160 ms on an H200's host for 16 units, mostly
# Python and launches) runs while the step's graph does, and the GPU waits only for what
# outlasts the step. Topping up all at once below one row's worth (TOP_UP_BELOW 1 and
# PREFILLS_PER_STEP None, as before) made three calls in one step at 1,464 rows, and an H200
# spent 1.8 s of a 101-s layer in its 11 prefills (docs/performance.md).
AHEAD_ROWS = 2
TOP_UP_BELOW = 2
PREFILLS_PER_STEP: int | None = 1
# Finished units handed over (written to the store) while one step runs; the rest wait for the
# next steps. A unit's write takes less host time than a step of a large model.
FLUSH_PER_STEP = 1
# With KV pages, new samples start while the pool keeps this many steps of the running rows'
# growth free beyond the priority row's reserve (a row takes a page every PAGE steps). The rows
# were sized for the pages a row holds on average, so the pool fills; a row that finds none
# free waits a step. In scripts/sim_pages.py (one H100 layer as benched: 831 rows, 4,642 pages)
# 4 steps kept 94.5% of step-rows drawing, 1.5% of rows waiting at a time (measured: 93.7%),
# refilling at 1/16 idle rows; at 1/64 the simulation gives 95.9%.
PAGE_HEADROOM_STEPS = 4


class Refill:
    """Decodes every sample of every unit the feed yields on one static decoder, refilling
    rows as they finish. `on_prefill(keys, logits)` gets each chunk's prefill logits (the
    first-token readouts); `on_step(n)` how many rows drew a token; `on_unit(key, completions)`
    each unit once all its samples are done, in seed order (called while the next step runs)."""

    def __init__(self, engine: Engine, decoder: GraphedDecoder,
                 feed: Iterator[tuple[Any, TargetUnit]], max_new_tokens: int, sampling: Sampling,
                 on_unit: Callable[[Any, list[Completion]], None],
                 on_prefill: Callable[[list[Any], torch.Tensor], None] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 stop: Callable[[], bool] | None = None) -> None:
        self.engine = engine
        self.stop = stop
        self.decoder = decoder
        self.max_new = max_new_tokens
        self.how = sampling
        self.on_unit = on_unit
        self.on_step = on_step
        decoder.restart()
        rows, device = decoder.rows, engine.device
        self.device = device
        self.tokens = torch.full((rows, max_new_tokens), -1, dtype=torch.int64, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.last = torch.zeros(rows, dtype=torch.int64, device=device)
        self.live = torch.zeros(rows, dtype=torch.bool, device=device)
        self.owner: list[tuple[Unit, int] | None] = [None] * rows
        self.eos_list = engine.eos_token_ids or [-1]
        self.eos = torch.tensor(self.eos_list, device=device)
        self.queue = UnitQueue(engine, decoder, feed, sampling, on_prefill)
        self.done_units: list[Unit] = []
        self.refills = 0  # admissions after the first (for benchmarks and tests)
        self.slot_waits = 0  # admissions cut short for want of a free unit slot
        self.step_redraws = 0  # draws made again after their top-k tie check failed
        # The host's copy of the last draw's outcome (live rows, tokens, top-k tie check),
        # copied without a sync and read once the draw is done (_wait): the next step is
        # launched before the host looks, so the GPU never waits for the host to launch it.
        pin = device.type == "cuda"
        self.host_live = torch.zeros(rows, dtype=torch.bool, pin_memory=pin)
        self.host_tokens = torch.full((rows, max_new_tokens), -1, dtype=torch.int64,
                                      pin_memory=pin)
        self.host_overflow = torch.zeros(1, dtype=torch.bool, pin_memory=pin)
        self.drawn_event = torch.cuda.Event() if pin else None
        # rows admitted since the step in flight was launched: its logits are not theirs
        self.fresh = torch.zeros(rows, dtype=torch.bool, device=device)
        self.undo: tuple[Any, ...] | None = None  # the state before the last draw
        self.overflow: torch.Tensor | None = None  # the last draw's tie check, to copy
        # the drain (nothing left to start): when it began (perf_counter) and the tokens drawn
        # before it, for benchmarks: a sweep in one process drains once, at its very end
        self.drain_started: float | None = None
        self.drawn_before_drain = 0
        self.drawn = 0
        self.steps = 0  # decode steps launched (a redrawn step counted once)
        self.steps_before_drain = 0
        # KV pages (decoder.pool): per row, an upper bound on the tokens it has drawn (what its
        # next step's write needs room for), whether the host has seen its answer end, the rows
        # admitted since the last launch, and the rows that wait for a page at this step
        self.pool = decoder.pool
        self.count = [0] * rows
        self.ended = [True] * rows
        self.fresh_rows: list[int] = []
        self.waiting: list[int] = []
        self.held = torch.zeros(rows, dtype=torch.bool, device=device)
        self.held_row_steps = 0  # row-steps spent waiting for a page (benchmarks, tests)

    @property
    def redraws(self) -> int:
        """Draws made again after their top-k tie check failed: steps' and first tokens'."""
        return self.step_redraws + self.queue.redraws

    def _more_work(self) -> bool:
        if self.stop is not None and not self.queue.stopping and self.stop():
            self.queue.stop_starting()
        return bool(self.queue.queued()) or not self.queue.fed_all

    # -- rows -------------------------------------------------------------------------------

    def _admit(self, free: list[int]) -> int:
        """Start waiting samples in rows `free` (as many as wait); returns how many started.
        Each draws its first token from its unit's prefill logits."""
        queue = self.queue
        if self.pool is not None:
            free = free[:self._room(len(free))]
        queue.pull(len(free))
        started = 0
        while free and queue.chunks:
            chunk = queue.chunks[0]
            queue.settle(chunk)
            picks, waiting = queue.take(chunk, len(free))
            if not picks:
                self.slot_waits += waiting
                break
            n = len(picks)
            rows, free = free[:n], free[n:]
            at = self._ix(rows)
            units = self._ix([p[0] for p in picks])
            seeds = self._ix([p[2] for p in picks])
            slots = None
            if self.decoder.unit_slots:  # with unit slots, every pick's unit holds one (_take)
                held = [chunk.units[p[0]].slot for p in picks]
                slots = self._ix([slot for slot in held if slot is not None])
                assert slots.shape[0] == n
            self.decoder.admit(at, chunk.kv, units, chunk.vectors.index_select(0, units),
                               self.engine.prompt_len, slots)
            first = chunk.first.index_select(0, self._ix([p[3] for p in picks]))
            self.fresh.index_fill_(0, at, True)
            self.tokens.index_fill_(0, at, -1)
            self.tokens[:, 0].index_copy_(0, at, first)
            self.seeds.index_copy_(0, at, seeds)
            self.last.index_copy_(0, at, first)
            ended = torch.isin(first, self.eos) | (self.max_new <= 1)
            self.live.index_copy_(0, at, ~ended)
            for row, (unit, sample, _, _) in zip(rows, picks, strict=True):
                self.owner[row] = (chunk.units[unit], sample)
                chunk.units[unit].started = True
                self.count[row], self.ended[row] = 1, False
            self.fresh_rows.extend(rows)
            if self.pool is not None:
                self.pool.start(rows)
            started += n
            if not chunk.queue:
                queue.chunks.popleft()
            if waiting:
                self.slot_waits += 1
                break
        self.drawn += started
        if started and self.on_step is not None:
            self.on_step(started)
        return started

    def _order(self, rows: int) -> None:
        """Rows of one unit side by side in the order decode attention takes them (each
        program then reads a unit's prompt once for all its rows of that unit, where refilled
        rows leave a unit's samples scattered); free rows go last."""
        if not self.decoder.unit_slots:
            return

        def unit_first(row: int) -> tuple[int, int, int]:
            owner = self.owner[row]
            if owner is None:
                return (1, 0, row)
            slot = owner[0].slot
            return (0, -1 if slot is None else slot, row)

        self.decoder.order_rows(sorted(range(rows), key=unit_first))

    def _harvest(self, rows: int) -> None:
        """File the answers of the finished rows among the first `rows`; those rows are free
        after it."""
        live = self.host_live[:rows].tolist()
        done = [r for r in range(rows) if self.owner[r] is not None and not live[r]]
        if not done:
            return
        eos = set(self.eos_list)
        drawn = self.host_tokens[done].tolist()
        for row, ids in zip(done, drawn, strict=True):
            owner = self.owner[row]
            assert owner is not None
            unit, sample = owner
            unit.completions[sample] = parse_row(ids, eos)
            unit.left -= 1
            self.count[row], self.ended[row] = 0, True
            if unit.left == 0:
                self.done_units.append(unit)
                if unit.slot is not None:
                    self.queue.free_slots.append(unit.slot)
            self.owner[row] = None
        if self.pool is not None:
            self.pool.release(done)

    def _flush(self, most: int | None = None) -> None:
        """Hand finished units to on_unit (while the step just launched runs), at most `most`
        of them: when many finish at once (rows in step end together), writing them all in one
        step would leave the GPU waiting for the host."""
        cut = len(self.done_units) if most is None else most
        done, self.done_units = self.done_units[:cut], self.done_units[cut:]
        for unit in done:
            completions = [c for c in unit.completions if c is not None]
            assert len(completions) == len(unit.completions)
            self.on_unit(unit.key, completions)

    def _shrink(self, rows: int) -> None:
        """Nothing left to start: move the live rows (all finished ones harvested) to the front
        and step at the fewest rows that hold them."""
        keep = self.live[:rows].nonzero().squeeze(1)
        self.decoder.keep_rows(keep)
        n = keep.shape[0]
        for buffer in (self.tokens, self.seeds, self.last, self.live):
            buffer[:n] = buffer.index_select(0, keep)
        kept = keep.tolist()
        owners = [self.owner[i] for i in kept]
        self.owner[:rows] = owners + [None] * (rows - n)
        self.count[:rows] = [self.count[i] for i in kept] + [0] * (rows - n)
        self.ended[:rows] = [self.ended[i] for i in kept] + [True] * (rows - n)
        self.waiting = []
        self.held.zero_()
        self._order(self.decoder.current.rows)

    def run(self) -> None:
        decoder = self.decoder
        if not self._admit(list(range(decoder.rows))) and not self._more_work():
            return  # an empty feed (or a stop before the first unit): no step to run
        self._order(decoder.rows)
        self._publish(decoder.rows)
        threshold = max(1, int(decoder.rows * REFILL_FRACTION))
        while True:
            rows = decoder.current.rows
            self._give_pages(rows)
            # The step is launched before the host looks at the last draw (no sync first): the
            # GPU runs it while the host files answers and refills rows.
            logits = decoder.step(self.last[:rows])
            self.steps += 1
            self.fresh.zero_()
            self.fresh_rows = []
            self._flush(FLUSH_PER_STEP)
            if not self.queue.fed_all and self.queue.queued() < TOP_UP_BELOW * decoder.rows:
                # Prefill ahead while the step runs, one call of PREFILL_UNITS at most (a
                # prefill's cost is mostly per call: topping the queue up by a unit or two a call
                # cost 4x the prefill time in an H100 bench).
                self.queue.pull(AHEAD_ROWS * decoder.rows, calls=PREFILLS_PER_STEP)
            if self._wait():
                continue  # the last draw was made again: the step launched from its tokens too
            live = int(self.host_live[:rows].sum())
            finished = sum(o is not None for o in self.owner[:rows]) - live
            held = sum(bool(self.host_live[r]) for r in self.waiting)  # live, drawing nothing
            more = self._more_work()
            if not more and self.drain_started is None:
                self.drain_started = time.perf_counter()
                self.drawn_before_drain = self.drawn
                self.steps_before_drain = self.steps
            refill = more and rows == decoder.rows and (live == 0 or rows - live >= threshold)
            shrink = not more and decoder.shrinks_to(live)
            # pages short: file finished answers now, for their pages
            if finished and (refill or shrink or live == 0 or self.waiting):
                self._harvest(rows)
            started = 0
            if refill:
                started = self._admit([r for r in range(rows) if self.owner[r] is None])
                self.refills += bool(started)
                if started:
                    self._order(rows)
            if live == 0 and not started:
                if self._more_work():
                    continue
                self._flush()
                return
            self._draw(logits, rows, live - held, started)
            self._publish(rows)
            if shrink:
                self._shrink_rows(rows)

    def _shrink_rows(self, rows: int) -> None:
        """Nothing left to start and the live rows fit a smaller row count: once the last draw
        is done, file the rows it finished and move the live ones to the front."""
        self._wait()
        self._harvest(rows)
        self._shrink(rows)
        self._publish(self.decoder.current.rows)

    def _room(self, wanted: int) -> int:
        """New samples the KV pool has room for (a page each): the free pages beyond the
        priority row's reserve and PAGE_HEADROOM_STEPS steps of the running rows' growth."""
        pool = self.pool
        assert pool is not None
        running = sum(1 for r, owner in enumerate(self.owner)
                      if owner is not None and not self.ended[r])
        return pool.admissible(wanted, running * PAGE_HEADROOM_STEPS // PAGE)

    def _give_pages(self, rows: int) -> None:
        """Before a step: each row still running gets the pages its write needs (the furthest
        along first); a row the pool cannot serve waits out the step, drawing nothing."""
        pool = self.pool
        if pool is None:
            return
        limit = pool.per_row * PAGE
        running = [r for r in range(rows) if self.owner[r] is not None and not self.ended[r]]
        pool.elect(running)
        need = sorted(((r, min(self.count[r], limit)) for r in running
                       if self.count[r] > pool.capacity(r)), key=lambda pair: -pair[1])
        waiting = pool.grow(need) if need else []
        if waiting != self.waiting:
            self.held.zero_()
            if waiting:
                self.held.index_fill_(0, self._ix(waiting), True)
        self.waiting = waiting
        self.held_row_steps += len(waiting)

    def _note_ended(self) -> None:
        """After a wait: rows whose answers the host has now seen end need no more pages."""
        live = self.host_live.tolist()
        for row, owner in enumerate(self.owner):
            if owner is not None and not live[row]:
                self.ended[row] = True

    def _ix(self, values: list[int]) -> torch.Tensor:
        """An int64 tensor on the device, copied without waiting for the GPU."""
        return to_device(values, self.device)

    def _publish(self, rows: int) -> None:
        """Copy the last draw's outcome to the host without waiting; _wait reads it."""
        self.host_live[:rows].copy_(self.live[:rows], non_blocking=True)
        self.host_tokens[:rows].copy_(self.tokens[:rows], non_blocking=True)
        if self.overflow is not None:
            self.host_overflow.copy_(self.overflow.reshape(1), non_blocking=True)
        else:
            self.host_overflow.fill_(False)
        self.overflow = None
        if self.drawn_event is not None:
            self.drawn_event.record()

    def _wait(self) -> bool:
        """Wait for the last draw's outcome (not for the step launched after it). Where its
        top-k ties reached past the candidates taken, undo it, run its step again (the same
        inputs: the same logits and cache writes) and draw exactly; returns whether it did."""
        if self.drawn_event is not None:
            self.drawn_event.synchronize()
        if self.pool is not None:
            self._note_ended()
        undo, self.undo = self.undo, None
        if undo is None or not bool(self.host_overflow[0]):
            return False
        last, live, drawn, fresh_count, rows, held, fresh_rows = undo
        self.step_redraws += 1
        self.decoder.unmark_step()  # the step launched from the undone draw's tokens
        self.last[:rows], self.live[:rows] = last, live
        self.decoder.current.drawn.copy_(drawn)
        logits = self.decoder.step(self.last[:rows])
        self.fresh.zero_()
        self._draw(logits, rows, fresh_count, exact=(held, fresh_rows))
        self._publish(rows)
        if self.drawn_event is not None:
            self.drawn_event.synchronize()
        if self.pool is not None:
            self._note_ended()
        return True

    def _draw(self, logits: torch.Tensor, rows: int, live_count: int, fresh_count: int = 0,
              exact: tuple[torch.Tensor, list[int]] | None = None) -> None:
        """Each live row draws its next token at its own step, except rows admitted after the
        step was launched (its logits are not theirs) and rows that waited for a KV page;
        rows that reach EOS or the cap stop being live. The sampler does not wait for its
        top-k tie check (_wait reads it); `exact` (the step's waiting rows and the rows
        admitted after it): the draw made again after a failed check, where every live row
        was stepped."""
        drawn = self.decoder.current.drawn  # per row, tokens drawn so far: this one's index
        live = self.live[:rows]
        if exact is not None:
            held, skipped = exact
            drawing = live & ~held[:rows]
        else:
            drawing = live & ~self.fresh[:rows] & ~self.held[:rows]
        if self.pool is not None:  # each row's count of tokens drawn, an upper bound
            if exact is not None:  # the rows the first draw skipped as new
                counted = [r for r in skipped if r < rows]
            else:
                skip = set(self.fresh_rows) | set(self.waiting)
                counted = [r for r in range(rows) if self.owner[r] is not None
                           and not self.ended[r] and r not in skip]
            for row in counted:
                self.count[row] += 1
        overflow: list[torch.Tensor] | None = None if exact is not None else []
        if exact is None:
            waiting = set(self.waiting)  # new rows on a waiting row's place draw nothing either
            self.undo = (self.last[:rows].clone(), live.clone(), drawn.clone(), fresh_count, rows,
                         self.held[:rows].clone(), [r for r in self.fresh_rows if r not in waiting])
        picked = choose_tokens(logits, self.seeds[:rows], drawn, self.how, overflow)
        self.overflow = overflow[0] if overflow else None
        at = drawn.clamp(max=self.max_new - 1)[:, None]
        tokens = self.tokens[:rows]
        tokens.scatter_(1, at, torch.where(drawing, picked,
                                           tokens.gather(1, at).squeeze(1))[:, None])
        self.last[:rows] = torch.where(drawing, picked, self.last[:rows])
        self.decoder.advance(drawing)  # in place: `drawn` now counts this token
        ended = torch.isin(picked, self.eos) | (drawn >= self.max_new)
        self.live[:rows] = live & ~(drawing & ended)
        # an exact draw adds the fresh rows' tokens
        count = fresh_count if exact is not None else live_count
        self.drawn += count
        if self.on_step is not None:
            self.on_step(count)


def unit_slots_for(rows: int, samples: int) -> int:
    """Unit slots for `rows` rows of units of `samples` samples: four times the units that fill
    the rows at once (a unit keeps its slot until its longest answer ends), at most one a row."""
    return min(rows, 4 * -(-rows // max(samples, 1)) + 8)


def generate_stream(engine: Engine, feed: Iterator[tuple[Any, TargetUnit]], max_new_tokens: int,
                    sampling: Sampling | float, rows: int,
                    on_unit: Callable[[Any, list[Completion]], None],
                    on_prefill: Callable[[list[Any], torch.Tensor], None] | None = None,
                    on_step: Callable[[int], None] | None = None,
                    unit_slots: int = 0, stop: Callable[[], bool] | None = None,
                    kv_pages: int = 0) -> Refill:
    """Decode every sample the feed yields (key, unit) on `rows` static-decoder rows with
    continuous batching; each unit goes to on_unit as soon as its samples are done. With
    `unit_slots`, each unit's prompt is kept once in one of that many slots, not in each of its
    rows (patchdb's decode attention only). Once `stop()` is true no new unit starts; those
    started finish and are handed over. `kv_pages` (with unit slots): the rows' own keys and
    values in a pool of that many pages of PAGE positions, given by need (pages.py), so that
    more rows fit where answers end early (new samples start as the pool's free pages allow).
    Needs the static decoder (engine.decodes_static);
    returns the finished Refill (its counters)."""
    if kv_pages and not unit_slots:
        raise ValueError("KV pages need unit slots (a row's cache holds only its answer)")
    max_len = engine.prompt_len + max_new_tokens
    with torch.inference_mode():
        decoder = engine._graphed_decoder(rows, max_len, unit_slots, kv_pages)
        if decoder is None:
            raise ValueError("continuous batching needs the static decoder")
        refill = Refill(engine, decoder, feed, max_new_tokens, as_sampling(sampling), on_unit,
                        on_prefill, on_step, stop)
        refill.run()
    return refill
