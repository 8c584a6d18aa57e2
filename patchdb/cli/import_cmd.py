"""`patchdb import-json`: bring a sweep on disk in the JSON layout into the store."""

from pathlib import Path

import click

from patchdb.cli.options import db_option


@click.command("import-json")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@db_option
@click.option("--sweep", "sweep_name", envvar="PATCHDB_SWEEP",
              help="Name of the sweep to create (default: the folder's name; env PATCHDB_SWEEP).")
@click.option("--model", default="unknown", show_default=True, envvar="PATCHDB_IMPORT_MODEL",
              help="The model that wrote the rollouts, recorded in the sweep's config "
                   "(env PATCHDB_IMPORT_MODEL).")
@click.option("--steer-layer", type=click.IntRange(min=0), envvar="PATCHDB_IMPORT_STEER_LAYER",
              help="The injection layer (default: the default sweep's 38, if the patch layers come after "
                   "it; env PATCHDB_IMPORT_STEER_LAYER).")
def import_json(folder: Path, db: str, sweep_name: str | None, model: str,
                steer_layer: int | None) -> None:
    """Import FOLDER, which holds one sub-folder per experiment (like patching_layer_sweep/),
    with layer_<L>/rollouts.json and any judgments_<type>.json files. In a pair experiment
    judgments_detection.json holds the detection+identification verdicts, unless a
    judgments_detection_identification.json lies beside it. Words, layers and samples are read
    from the files; every file is checked before anything is written. Importing the same
    folder again changes nothing.

    \b
    Example:
      patchdb import-json patching_layer_sweep --db runs.sqlite --model google/gemma-3-27b-it
      patchdb report --db runs.sqlite --sweep patching_layer_sweep
    """
    from patchdb.report.importer import import_tree, read_tree  # here: --help stays fast
    from patchdb.store import open_store

    plan = read_tree(folder, sweep_name, model, steer_layer)
    store = open_store(db, create=True)
    try:
        result = import_tree(store, plan)
    finally:
        store.close()
    config = plan.config
    verb = "registered" if result.sweep_created else "already in the store"
    click.echo(
        f"Sweep {result.sweep!r} {verb}: {len(config.experiments)} experiments, patch layers "
        f"{config.patch_layers}, {len(config.positive_words)} positive and "
        f"{len(config.negative_words)} negative words, up to {config.samples} samples per key.")
    judge = f" (judge config #{result.judge_config_id}, backend import)" \
        if result.judge_config_id is not None else ""
    click.echo(f"Imported {result.new_rollouts} new rollouts and {result.new_judgments} new "
               f"judgments{judge}; {plan.n_rollouts - result.new_rollouts} rollouts and "
               f"{plan.n_judgments - result.new_judgments} judgments were already there.")
    if result.new_labels:
        click.echo(f"Imported {result.new_labels} new human labels.")
    for path in plan.score_mismatches:
        click.echo(f"Note: {path} disagrees with its judgments; patchdb recomputes rates from "
                   "the judgments.", err=True)
