"""The judge's progress: a bar on a terminal, plain lines when stderr goes to a file or a pipe.

A bar redrawn with carriage returns is unreadable in a log, and tqdm draws none there, so a
judge run into a file said nothing for its whole length. Off a terminal the run prints one line
each time another 5% of its calls is done and at least every `every_s` seconds, e.g.
`judge: 1,200/4,800 calls (25%), $0.1200, 3.1 calls/s`.
"""

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

EVERY_S = 30.0  # off a terminal: a line at least this often while calls finish
STEPS = 20  # off a terminal: a line at each 5% of the calls


class PlainProgress:
    """The parts of tqdm's interface the judge uses, printed as one plain line per step."""

    def __init__(self, total: int, cost: Callable[[], float], file: TextIO | None = None,
                 every_s: float = EVERY_S, unit: str = "calls") -> None:
        self.total = total
        self.n = 0
        self.cost, self.unit, self.every_s = cost, unit, every_s
        self.file = file if file is not None else sys.stderr
        self._started = self._last = time.monotonic()
        self._step = 0  # the last 5% step printed

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        step = self.n * STEPS // self.total if self.total > 0 else 0
        if step > self._step or now - self._last >= self.every_s:
            self._step = max(self._step, step)
            self._last = now
            self.file.write(self.line(now) + "\n")
            self.file.flush()

    def line(self, now: float) -> str:
        """`judge: done/total calls (pct%), $cost, rate calls/s`."""
        elapsed = now - self._started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.n // self.total}%)" if self.total > 0 else ""
        return (f"judge: {self.n:,}/{self.total:,} {self.unit}{pct}, ${self.cost():.4f}, "
                f"{rate:.1f} {self.unit}/s")

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        return None

    def refresh(self) -> None:
        return None

    def close(self) -> None:
        return None


def judge_progress(total: int, show: bool, cost: Callable[[], float]) -> Any:
    """A tqdm bar on a terminal; plain lines off one; nothing with --no-progress."""
    from tqdm import tqdm

    if show and not _is_tty(sys.stderr):
        return PlainProgress(total, cost)
    return tqdm(total=total, desc="judge", unit="call", dynamic_ncols=True, leave=True,
                disable=not show)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
