"""Deterministic fault injection: a process stops itself at a named point.

Set `PATCHDB_FAULT=<point>:<n>[:<signal>]` and the process sends itself the signal (default
SIGKILL) the n-th time it passes `fault_point("<point>")`. Tests use it to kill or interrupt a stage
at an exact place (after unit n, after judge write batch n, ...) instead of sleeping and hoping.
Several faults can be given, separated by commas, the same point more than once too (two
Ctrl-Cs at passes 2 and 4). Unset, a fault point costs one dict lookup.
`judge --batch` passes judge.batch_uploaded and judge.batch_created (right after each call,
before the store records it), judge.batch_collected_file (after each file download),
judge.batch_collect_chunk (after each chunk of judgments is written) and judge.batch_poll
(before each wait for live batches). The in-process judge passes judge.hf_step (after each
decode step) and judge.hf_generated (after a batch's replies are decoded, before their verdicts).
"""

import os
import signal

ENV = "PATCHDB_FAULT"
_hits: dict[str, int] = {}


def _faults() -> dict[str, dict[int, signal.Signals]]:
    spec = os.environ.get(ENV, "")
    faults: dict[str, dict[int, signal.Signals]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, rest = item.partition(":")
        count, _, sig = rest.partition(":")
        faults.setdefault(point, {})[int(count or 1)] = signal.Signals[
            f"SIG{sig.upper() or 'KILL'}"]
    return faults


def fault_point(name: str) -> None:
    """Stop this process here if PATCHDB_FAULT names this point and this is its n-th pass."""
    if ENV not in os.environ:
        return
    fault = _faults().get(name)
    if fault is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] in fault:
        os.kill(os.getpid(), fault[_hits[name]])
