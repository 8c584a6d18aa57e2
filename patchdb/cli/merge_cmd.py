"""`patchdb merge`: copy other stores' rows into this one, matched by natural keys."""

from typing import TYPE_CHECKING

import click

from patchdb.cli.options import db_option

if TYPE_CHECKING:  # the store is imported when the command runs: --help stays fast
    from patchdb.store import Store
    from patchdb.store.merge import MergeResult


def render(result: "MergeResult", into: str) -> str:
    lines = [f"Merged {result.source} into {into}: {result.total} new rows"]
    for table, n in result.copied.items():
        lines.append(f"  {table:<16} {n:>9}")
    if result.skipped_judgments:
        lines.append(f"  {result.skipped_judgments} judgments not copied: their rollout has a "
                     "different answer here")
    return "\n".join(lines)


@click.command()
@click.argument("others", nargs=-1, required=True, metavar="OTHER...")
@db_option
def merge(others: tuple[str, ...], db: str) -> None:
    """Copy sweeps, experiments, concept vectors, stage runs, rollouts, judge configs,
    judgments and judge cache entries from OTHER stores (files or URLs) into --db.

    Rows are matched by what they are (a rollout by sweep, experiment, layer, key and sample),
    never by id, so merging again copies nothing twice. A sweep whose config differs between
    the stores is refused before anything is written. An interrupted merge can be rerun.

    \b
    Example:
      patchdb merge gpu-box.sqlite --db laptop.sqlite
      patchdb merge laptop.sqlite --db postgresql://db.lab/patchdb
    """
    from patchdb.label.transfer import copy_labels
    from patchdb.store import open_store
    from patchdb.store.merge import merge_stores

    sources: list[Store] = []
    target: Store | None = None
    try:
        for other in others:
            sources.append(open_store(other))
        target = open_store(db, create=True)
        results = merge_stores(target, sources, steps=[copy_labels])
    finally:
        for store in [*sources, *([target] if target else [])]:
            store.close()
    for result in results:
        click.echo(render(result, target.where))
