"""`--sweep GLOB`: a command run once per matching sweep (a dose series: `--sweep 'demo-dose-*'`)."""

from collections.abc import Callable
from typing import Any

import click


def matching_sweeps(db: str, sweep: str | None) -> list[str | None]:
    """What --sweep names in the store at `db`: several sweeps for a glob, else [sweep]."""
    if sweep is None:
        return [None]
    from patchdb.store import open_store  # here, not above: --help stays fast
    from patchdb.store.sweeps import sweep_names

    store = open_store(db)
    try:
        with store.read() as session:
            return sweep_names(session, sweep)
    finally:
        store.close()


def run_per_sweep(db: str, sweep: str | None,
                  changes: Callable[[str], dict[str, Any]] | None = None) -> bool:
    """If --sweep is a glob, run the current command once per matching sweep (a header line
    before each when there are several; `changes(name)` adjusts its other parameters) and
    return True; else return False and let the command run as usual."""
    names = matching_sweeps(db, sweep)
    if names == [sweep]:
        return False
    ctx = click.get_current_context()
    assert ctx.command.callback is not None
    for name in names:
        assert name is not None
        if len(names) > 1:
            click.echo(f"== sweep {name}")
        extra = changes(name) if changes is not None and len(names) > 1 else {}
        ctx.invoke(ctx.command.callback, **{**ctx.params, "sweep": name, **extra})
    return True
