"""The hand-over of a decode step's new keys and values from the cache's writer to attention."""

import pytest
import torch

from patchdb.generate import kv_writes
from patchdb.generate.kv_writes import NewKV


def new_kv(layer: int, stored: list[int]) -> NewKV:
    t = torch.zeros(2, 1, 1, 4)
    return NewKV(layer, t, t, lambda: stored.append(layer))


def test_writers_store_their_own_outside_the_block() -> None:
    assert kv_writes.offer(new_kv(0, [])) is False
    assert kv_writes.take(0) is None


def test_attention_takes_what_its_layers_writer_offered() -> None:
    stored: list[int] = []
    with kv_writes.deferred():
        assert kv_writes.offer(new_kv(3, stored))
        with pytest.raises(RuntimeError, match="layer 5's attention found layer 3's"):
            kv_writes.take(5)
        new = kv_writes.take(3)
        assert new is not None and new.layer == 3
        assert kv_writes.take(3) is None  # taken once
        new.write()
    assert stored == [3]


def test_an_offer_nobody_took_is_an_error_not_a_lost_write() -> None:
    with kv_writes.deferred():
        kv_writes.offer(new_kv(1, []))
        with pytest.raises(RuntimeError, match="layer 1's new keys and values were never stored"):
            kv_writes.offer(new_kv(2, []))
    with kv_writes.deferred():  # the block's end dropped what was left
        assert kv_writes.offer(new_kv(2, []))
