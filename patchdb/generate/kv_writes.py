"""A decode step's new keys and values, handed from the cache update to the attention that
follows it, so that patchdb's Triton kernel stores them itself.

A graphed decode step used to write each layer's new key and value (one token a row) with two
scatter kernels before attention read the cache: 124 of a 62-layer step's ~1,250 kernels,
0.7 ms a step on an H100 at 385 rows and 1.5 ms on an H200 at 1,252. While `deferred()` runs,
the cache's writer (graphed._RowWrites, pages.PagedWrites) hands them over here instead, and
decode attention either passes them to the kernel, which stores each row's before reading its
cache, or, where the kernel does not run (SDPA), has the writer store them first. Either way
the cache holds the same values when attention reads it.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NewKV:
    """Layer `layer`'s new keys and values ([b, kv_heads, 1, d]) and the writer's own store,
    for attention that does not store them. They go to each row's last valid position: the
    length attention reads (attention.cache_length) less one, in the row's own cache or, with
    KV pages, at that position's page of the page table. The writer's store puts them at the
    same place, which the decoder keeps in step (graphed.GraphedDecoder.step)."""

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    write: Callable[[], None]


_DEFER: list[bool] = [False]
_PENDING: list[NewKV | None] = [None]


@contextmanager
def deferred() -> Iterator[None]:
    """While the block runs, writers offer their new keys and values to attention."""
    previous = _DEFER[0]
    _DEFER[0] = True
    try:
        yield
    finally:
        _DEFER[0] = previous
        _PENDING[0] = None


def offer(new: NewKV) -> bool:
    """Hand a layer's new keys and values to its attention (True), or, outside `deferred`,
    decline (False: the writer stores them itself)."""
    if not _DEFER[0]:
        return False
    if _PENDING[0] is not None:
        raise RuntimeError(f"layer {_PENDING[0].layer}'s new keys and values were never stored")
    _PENDING[0] = new
    return True


def take(layer: int) -> NewKV | None:
    """The new keys and values offered for this layer, if any; the caller must store them."""
    new = _PENDING[0]
    if new is None:
        return None
    if new.layer != layer:
        raise RuntimeError(f"layer {layer}'s attention found layer {new.layer}'s new keys")
    _PENDING[0] = None
    return new
