"""The units waiting for rows in continuous batching (refill.py): prefilled ahead in chunks,
their samples queued in order, each unit's prompt stored once in a decoder unit slot while it has
rows.

A prefill runs while a decode step does, so nothing in it waits for the GPU: the prompt before
the injection start is run once and copied, index tensors go from pinned memory, the first-token
readouts reach the host later, and every sample's first token is drawn at once (top-k once per
unit), with top-k's tie check read only before the chunk's first rows are admitted.
"""

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from patchdb.generate.engine import Completion, Engine, TargetUnit
from patchdb.generate.graphed import GraphedDecoder
from patchdb.generate.sampling import Sampling, choose_first_tokens
from patchdb.generate.transfer import HostCopy, to_device

# Units in one prefill forward (its activations and KV are transient). A prefill's cost on the
# host is mostly per call, so each call takes this many while the feed has them.
PREFILL_UNITS = 16


@dataclass
class Unit:
    """One unit in progress: its key, its samples' answers as they finish, how many are left."""

    key: Any
    completions: list[Completion | None]
    left: int
    slot: int | None = None  # the decoder's unit slot holding its prompt, while it has rows
    started: bool = False  # some sample has had a row


@dataclass
class TieCheck:
    """The top-k tie check of a chunk's first tokens, on its way to the host (drawn without
    waiting for it), and what drawing them again exactly takes."""

    flag: HostCopy  # one bool: whether ties reached past the candidates in some unit
    logits: torch.Tensor
    counts: list[int]
    seeds: torch.Tensor


@dataclass
class Chunk:
    """Prefilled units whose samples wait for rows: each unit's prompt KV after the shared
    prefix (per layer), each sample's first token and each unit's steering vector."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    first: torch.Tensor  # each sample's first token (from the prefill's logits), in queue order
    vectors: torch.Tensor
    units: list[Unit]
    # unit, sample, seed, the sample's place in `first`
    queue: deque[tuple[int, int, int, int]] = field(default_factory=deque)
    tie_check: TieCheck | None = None  # read before the first tokens are used


class UnitQueue:
    """Units from `feed` (key, unit), prefilled PREFILL_UNITS at a time as rows need them;
    `on_prefill(keys, logits)` gets each prefill's last-position logits."""

    def __init__(self, engine: Engine, decoder: GraphedDecoder,
                 feed: Iterator[tuple[Any, TargetUnit]], sampling: Sampling,
                 on_prefill: Callable[[list[Any], torch.Tensor], None] | None = None) -> None:
        self.engine = engine
        self.decoder = decoder
        self.feed = feed
        self.how = sampling
        self.on_prefill = on_prefill
        self.device = engine.device
        self.chunks: deque[Chunk] = deque()
        self.fed_all = False
        self.stopping = False  # asked to stop: no new unit starts
        self.free_slots = list(range(decoder.unit_slots))[::-1]
        self.redraws = 0  # chunks whose first tokens were drawn again after their tie check

    def queued(self) -> int:
        return sum(len(c.queue) for c in self.chunks)

    def stop_starting(self) -> None:
        """Asked to stop: no new unit starts. Units already started keep their waiting samples
        (so that they finish whole and are handed over); the rest are dropped unrun, those
        already prefilled too."""
        self.fed_all = self.stopping = True
        for chunk in self.chunks:
            chunk.queue = deque(p for p in chunk.queue if chunk.units[p[0]].started)
        self.chunks = deque(c for c in self.chunks if c.queue)

    def pull(self, need: int, calls: int | None = None) -> None:
        """Prefill units from the feed, PREFILL_UNITS a call, until `need` samples wait (or the
        feed is done), in at most `calls` calls (None: as many as that takes)."""
        while self.queued() < need and not self.fed_all and calls != 0:
            calls = None if calls is None else calls - 1
            taken: list[tuple[Any, TargetUnit]] = []
            while len(taken) < PREFILL_UNITS:
                item = next(self.feed, None)
                if item is None:
                    self.fed_all = True
                    break
                if item[1].seeds:
                    taken.append(item)
            if taken:
                self.prefill(taken)

    def prefill(self, taken: list[tuple[Any, TargetUnit]]) -> None:
        """Prefill units and queue their samples. Nothing here waits for the GPU: it runs while
        a decode step does (the readouts and the first tokens' tie check reach the host later)."""
        units = [u for _, u in taken]
        logits, cache = self.engine.prefill_from_prefix(units)
        if self.on_prefill is not None:
            self.on_prefill([k for k, _ in taken], logits)
        decoder = self.decoder
        decoder.set_prefix(cache)
        kv = [(k.clone(), v.clone()) for k, v in decoder.prompt_kv(cache, self.engine.prompt_len)]
        del cache
        vectors = self.engine._steer_rows([u.steer for u in units])
        # Every sample's first token now, so that admitting rows later needs no prefill logits;
        # top-k runs once per unit, not once per sample.
        counts = [len(u.seeds) for u in units]
        seeds = to_device([seed for u in units for seed in u.seeds], self.device)
        overflow: list[torch.Tensor] = []
        first = choose_first_tokens(logits, counts, seeds, self.how, overflow)
        chunk = Chunk(kv, first, vectors, [Unit(k, [None] * len(u.seeds), len(u.seeds))
                                            for k, u in taken])
        if overflow:
            chunk.tie_check = TieCheck(HostCopy(overflow[0]), logits, counts, seeds)
        for i, unit in enumerate(units):
            base = len(chunk.queue)
            chunk.queue.extend((i, s, seed, base + s) for s, seed in enumerate(unit.seeds))
        self.chunks.append(chunk)

    def settle(self, chunk: Chunk) -> None:
        """Before a chunk's first tokens are used: where top-k ties reached past the candidates
        taken for some unit, draw them again exactly (rare; that waits for the GPU)."""
        check, chunk.tie_check = chunk.tie_check, None
        if check is None:
            return
        if bool(check.flag.get()):
            self.redraws += 1
            chunk.first = choose_first_tokens(check.logits, check.counts, check.seeds, self.how)

    def take(self, chunk: Chunk, most: int) -> tuple[list[tuple[int, int, int, int]], bool]:
        """Up to `most` waiting samples of the chunk, in order; with unit slots, as many as
        have their unit in a slot or get one now (their prompts are stored). Returns them and
        whether a sample waits for a free slot."""
        if not self.decoder.unit_slots:
            return [chunk.queue.popleft() for _ in range(min(most, len(chunk.queue)))], False
        picks: list[tuple[int, int, int, int]] = []
        stored: list[tuple[int, int]] = []  # slot, unit index in the chunk
        waiting = False
        while chunk.queue and len(picks) < most:
            unit = chunk.units[chunk.queue[0][0]]
            if unit.slot is None:
                if not self.free_slots:
                    waiting = True
                    break
                unit.slot = self.free_slots.pop()
                stored.append((unit.slot, chunk.queue[0][0]))
            picks.append(chunk.queue.popleft())
        if stored:
            self.decoder.store_units(to_device([s for s, _ in stored], self.device), chunk.kv,
                                     to_device([u for _, u in stored], self.device))
        return picks, waiting
