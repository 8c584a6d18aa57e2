"""`patchdb init`: register a sweep in the store."""

import click

from patchdb.cli.options import db_option
from patchdb.configs import config_option_help, resolve_config
from patchdb.store import open_store
from patchdb.store.sweeps import register_sweep


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

    \b
    Example:
      patchdb init --config sweep.toml --db runs.sqlite
      patchdb init --config demo --db demo.sqlite
    """
    config = resolve_config(config_path)
    store = open_store(db, create=True)
    try:
        sweep, created = store.transact(lambda s: register_sweep(s, config))
    finally:
        store.close()
    verb = "registered" if created else "already registered"
    n_keys = len(config.layers)
    click.echo(
        f"Sweep {sweep.name!r} {verb} in {store.where}: model {config.model}, "
        f"{len(config.experiments)} experiments, {n_keys} patch layers ({config.patch_layers})."
    )
