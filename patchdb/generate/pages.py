"""KV memory by need for the graphed decode: the rows' own keys and values live in pages of a
shared pool, and a row holds only the pages its answer has reached.

A static cache gives every row room for the longest answer. Real answers mostly end far
sooner (on a Gemma-3-27B shape, 100 new tokens cost a row 48 MiB, and an H100 has about 20 GiB
beside the weights), so most of that room is never written. Here each layer keeps one pool of
pages of PAGE positions ([pages + 1, kv_heads, PAGE, d]), a page table maps each row's page
numbers to pool pages, and the refill loop (refill.py) hands a row a page just before its next
step writes into it and takes the pages back when the row's answer is filed. Page 0 is scratch:
a row's table entries point there until it holds a page, so what a free row (or one waiting
for a page) writes lands where nothing reads it.

The pool can run short when more answers run long than the pool was sized for. A row that
needs a page then waits: it is stepped (the graph steps every row) but draws nothing, and tries
again at the next step, so no answer changes. One row, the priority row (the one holding the
most pages when it is named), always gets its pages: the pool never lends the last pages it may
still need to another row (nor to a new sample), so it finishes and frees its pages, and no set
of waiting rows can hold each other up.
"""

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from patchdb.generate import kv_writes
from patchdb.generate.kv_writes import NewKV
from patchdb.generate.transfer import to_device

PAGE = 8  # positions a page holds: a 100-token answer takes 13 pages, 104 positions


def pages_for(positions: int) -> int:
    return -(-positions // PAGE)


class PagePool:
    """Host-side bookkeeping of a pool of `pages` pages (numbered 1..pages; 0 is scratch) for
    `rows` rows of at most `per_row` pages each, and the page table on `device` ([rows,
    per_row] int32), updated by `sync()` (copies that do not wait for the GPU)."""

    def __init__(self, pages: int, rows: int, per_row: int, device: torch.device) -> None:
        if pages < per_row + 1:
            raise ValueError(f"a pool of {pages} pages cannot hold one row's {per_row} pages "
                             "and a page for the next")
        self.pages = pages
        self.per_row = per_row
        self.device = device
        self.table = torch.zeros(rows, per_row, dtype=torch.int32, device=device)
        self.free = list(range(pages, 0, -1))
        self.held: list[list[int]] = [[] for _ in range(rows)]
        self.priority: int | None = None  # the row whose last pages are kept for it
        self._puts: list[tuple[int, int, int]] = []  # (row, column, page) not yet on the device
        self._cleared: list[int] = []  # rows whose table goes back to scratch
        self.most_used = 0

    @property
    def used(self) -> int:
        return self.pages - len(self.free)

    def capacity(self, row: int) -> int:
        """Positions row `row` can write now."""
        return len(self.held[row]) * PAGE

    def reserve(self) -> int:
        """Pages the priority row may still take, kept back from every other row (a whole
        row's worth while none is named)."""
        if self.priority is None:
            return self.per_row
        return self.per_row - len(self.held[self.priority])

    def elect(self, running: Sequence[int]) -> None:
        """Name a priority row, where none is, among `running` (rows whose answers go on): the
        one holding the most pages. After the last priority row's pages came back, the pool
        has a whole row's worth free, so whichever row it names can finish."""
        if self.priority is None and running:
            self.priority = max(running, key=lambda row: (len(self.held[row]), -row))

    def _take(self, row: int) -> None:
        page = self.free.pop()
        self._puts.append((row, len(self.held[row]), page))
        self.held[row].append(page)
        self.most_used = max(self.most_used, self.used)

    def admissible(self, wanted: int, headroom: int = 0) -> int:
        """How many of `wanted` new rows (one page each) may start now: what the pool has
        beyond the priority row's reserve and `headroom` pages."""
        return max(0, min(wanted, len(self.free) - self.reserve() - headroom))

    def start(self, rows: Sequence[int]) -> None:
        """Give each of `rows` (new samples, holding nothing) its first page."""
        for row in rows:
            assert not self.held[row], "a row starts holding no pages"
            self._take(row)

    def grow(self, need: Sequence[tuple[int, int]]) -> list[int]:
        """Give each row in `need` ((row, positions its next step writes up to), most advanced
        first) the pages it lacks, where the pool allows; returns the rows left waiting."""
        waiting: list[int] = []
        for row, positions in need:
            while self.capacity(row) < positions:
                spare = len(self.free) - (0 if row == self.priority else self.reserve())
                if spare < 1:
                    waiting.append(row)
                    break
                self._take(row)
        return waiting

    def release(self, rows: Sequence[int]) -> None:
        """Take back every page of `rows` (their answers are filed); their table entries point
        to scratch again."""
        gone = set(rows)
        self._puts = [put for put in self._puts if put[0] not in gone]  # not yet on the device
        for row in rows:
            self.free.extend(reversed(self.held[row]))
            self.held[row] = []
            self._cleared.append(row)
            if row == self.priority:
                self.priority = None

    def keep(self, keep: Sequence[int]) -> None:
        """Rows `keep` move to the front, in order (the decoder's keep_rows); the others must
        hold no pages."""
        n = len(keep)
        place = {row: i for i, row in enumerate(keep)}
        assert all(not held for row, held in enumerate(self.held) if row not in place), \
            "rows dropped while holding pages"
        self.held = [self.held[i] for i in keep] + [[] for _ in range(len(self.held) - n)]
        if self.priority is not None:
            self.priority = place.get(self.priority)
        self.sync()
        index = to_device(list(keep), self.device)
        self.table[:n] = self.table.index_select(0, index)
        self.table[n:].zero_()

    def sync(self) -> None:
        """Bring the device page table up to date (queued after the step in flight, which
        still reads the old one)."""
        if self._cleared:
            self.table.index_fill_(0, to_device(self._cleared, self.device), 0)
            self._cleared = []
        if self._puts:
            rows, columns, pages = zip(*self._puts, strict=True)
            values = to_device(list(pages), self.device).to(torch.int32)
            self.table.index_put_((to_device(list(rows), self.device),
                                   to_device(list(columns), self.device)), values)
            self._puts = []


class PagedWrites:
    """`cache.update` for a paged decoder: row r's new key and value (one token) go to pool
    page `page[r]` at offset `offset[r]` of every layer's pool, and attention gets the pools."""

    def __init__(self, pools: dict[int, tuple[torch.Tensor, torch.Tensor]], page: torch.Tensor,
                 offset: torch.Tensor) -> None:
        self.pools = pools
        self.page = page
        self.offset = offset

    def __call__(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                 *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.pools[layer_idx]

        def write() -> None:
            keys[self.page, :, self.offset] = key_states[:, :, 0]
            values[self.page, :, self.offset] = value_states[:, :, 0]

        if not kv_writes.offer(NewKV(layer_idx, key_states, value_states, write)):
            write()
        return keys, values


_TABLE: list[torch.Tensor | None] = [None]


@contextmanager
def _holding(table: torch.Tensor) -> Iterator[None]:
    previous = _TABLE[0]
    _TABLE[0] = table
    try:
        yield
    finally:
        _TABLE[0] = previous


def paged_cache(table: torch.Tensor) -> AbstractContextManager[None]:
    """While the block runs, decode attention reads each row's own keys and values through this
    page table (int32 [rows, pages a row]): the cache it is handed is a pool of pages."""
    return _holding(table)


def page_table() -> torch.Tensor | None:
    return _TABLE[0]


def gather_pages(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Each row's pages of `pool` ([pages, kv, PAGE, d]) in order: [rows, kv, pages*PAGE, d]."""
    rows, per_row = table.shape
    picked = pool.index_select(0, table.reshape(-1).long())
    picked = picked.view(rows, per_row, *pool.shape[1:])
    return picked.transpose(1, 2).reshape(rows, pool.shape[1], per_row * pool.shape[2],
                                          pool.shape[3])


def steady_pages_per_row(lengths: dict[int, int]) -> float:
    """Pages a row holds on average over time when rows take answers of these lengths (length ->
    count) one after another: a long answer holds its row longer, and its pages grow as it goes."""
    held = steps = 0.0
    for length, n in lengths.items():
        length = max(length, 1)
        held += n * sum(pages_for(t) for t in range(1, length + 1))
        steps += n * length
    return held / steps if steps else 0.0

