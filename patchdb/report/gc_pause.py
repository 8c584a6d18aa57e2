"""Python's cyclic garbage collector paused while a report is made.

A report allocates many small objects that live until it ends (rows, the rollout pages' dicts,
matplotlib's artists), and each batch of them set off collections that walked every object
alive, every imported module's included: on the full-size bench store (docs/performance.md)
those full collections were about 0.3 s of a 3.5 s `report --html`. Reference counting still
frees everything outside a cycle; the figures' own cycles (some MB) wait until the collector
is back on, right after the report.
"""

import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def without_cyclic_gc(function: Callable[P, R]) -> Callable[P, R]:
    """Run `function` with the cyclic collector off, and turn it back on after (if it was on
    before: nested calls leave it to the outermost), also when `function` raises."""

    @functools.wraps(function)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        was_on = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if was_on:
                gc.enable()

    return paused
