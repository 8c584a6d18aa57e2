"""`patchdb init`: register a sweep in the store."""

import click

from patchdb.cli.options import db_option
from patchdb.configs import config_option_help, resolve_series


@click.command()
@click.option(
    "--config",
    "config_path",
    envvar="PATCHDB_CONFIG",
    help=config_option_help(),
)
@db_option
def init(config_path: str | None, db: str) -> None:
    """Create or upgrade the store and register a sweep.

    The default prompt intro (the first user turn) is patchdb's own wording, and introspection
    rates depend on the prompt's exact text: to reproduce an earlier sweep, put its exact
    first-turn text in `prompt_intro` under [sweep] in the config.

    A list for `strength` or `steer_layer` (a dose series) registers one sweep per value, named
    `<name>-strength<S>` or `<name>-steer<L>` (both lists: `<name>-steer<L>-strength<S>`); if
    one of them is refused, none is registered.

    \b
    Example:
      patchdb init --config sweep.toml --db runs.sqlite
      patchdb init --config demo --db demo.sqlite
    """
    from patchdb.store import open_store  # here, not above: --help stays fast
    from patchdb.store.sweeps import register_sweeps

    series = resolve_series(config_path)
    store = open_store(db, create=True)
    try:
        registered = store.transact(lambda s: register_sweeps(s, series.configs))
    finally:
        store.close()
    if series.is_series:
        click.echo(f"Series {series.name!r}: {len(series.configs)} sweeps, one per "
                   f"{' and '.join(series.varied)} value (select them with --sweep "
                   f"'{series.name}-*').")
    for config, (sweep, created) in zip(series.configs, registered, strict=True):
        verb = "registered" if created else "already registered"
        click.echo(
            f"Sweep {sweep.name!r} {verb} in {store.where}: model {config.model}, "
            f"{len(config.experiments)} experiments, {len(config.layers)} patch layers "
            f"({config.patch_layers})."
        )
