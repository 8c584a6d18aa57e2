"""`patchdb sweeps ls | rm`: list the store's sweeps, remove one registered by mistake."""

import click

from patchdb.cli.options import db_option


@click.group()
def sweeps() -> None:
    """List the store's sweeps, or remove an empty one.

    \b
    Example:
      patchdb sweeps ls --db runs.sqlite
      patchdb sweeps rm demo --db runs.sqlite
    """


@sweeps.command("ls")
@db_option
def ls(db: str) -> None:
    """List every sweep with its model and how many rollouts and readouts it holds."""
    from patchdb.store import open_store
    from patchdb.store.sweep_removal import sweep_summaries

    store = open_store(db)
    try:
        with store.read() as session:
            rows = sweep_summaries(session)
    finally:
        store.close()
    if not rows:
        click.echo(f"No sweeps in {store.where}; register one with `patchdb init`.")
        return
    table = [("sweep", "model", "experiments", "rollouts", "readouts", "registered")]
    table += [(r.name, r.model, str(r.experiments), f"{r.rollouts:,}", f"{r.readouts:,}",
               r.created_at.strftime("%Y-%m-%d %H:%M")) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@sweeps.command("rm")
@click.argument("name")
@db_option
def rm(name: str, db: str) -> None:
    """Remove sweep NAME, its experiments and its stage runs, when it holds no results (no
    rollouts, readouts or judge batches): the way out of a sweep registered with a mistake,
    such as a misspelled model id, so that `init` can register the corrected config under the
    same name. A sweep with results is refused and the store left as it was.

    \b
    Example:
      patchdb sweeps rm demo --db runs.sqlite
    """
    from patchdb.store import open_store
    from patchdb.store.sweep_removal import remove_empty_sweep

    store = open_store(db)
    try:
        removed = store.transact(lambda session: remove_empty_sweep(session, name))
    finally:
        store.close()
    runs = f" and {removed.stage_runs} stage run{'s' * (removed.stage_runs != 1)}" \
        if removed.stage_runs else ""
    click.echo(f"Removed sweep {removed.name!r} from {store.where} ({removed.experiments} "
               f"experiment{'s' * (removed.experiments != 1)}{runs}; it held no results).")
