"""`patchdb vectors`: compute concept vectors alone, or import a user's own."""

from pathlib import Path

import click

from patchdb.cli.options import db_option, list_callback, sweep_option
from patchdb.config import DTYPES


@click.command()
@db_option
@sweep_option
@click.option("--words", callback=list_callback, envvar="PATCHDB_WORDS",
              help="Comma-separated words, each one of the sweep's (default: all its positive "
                   "and negative words).")
@click.option("--layer", type=click.IntRange(min=0), envvar="PATCHDB_LAYER",
              help="Decoder layer of the vectors (default: the sweep's steer_layer).")
@click.option("--model", envvar="PATCHDB_MODEL",
              help="Model spec: hub id, local directory, .gguf file or smollm2-135m (default: the sweep's).")
@click.option("--device", envvar="PATCHDB_DEVICE",
              help="Torch device, e.g. cuda:0 or cpu (default: cuda:0 when available).")
@click.option("--dtype", type=click.Choice(DTYPES), envvar="PATCHDB_DTYPE",
              help="Model dtype (default: the sweep's).")
@click.option("--import", "import_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="PATCHDB_VECTORS_IMPORT",
              help="Store the vectors of a torch file {word: tensor} instead of computing them.")
def vectors(
    db: str,
    sweep: str | None,
    words: list[str] | None,
    layer: int | None,
    model: str | None,
    device: str | None,
    dtype: str | None,
    import_path: Path | None,
) -> None:
    """Compute the concept vectors a sweep steers with, and store them for later runs.

    A vector is the output of the decoder layer at the last token of "Tell me about {word}."
    minus the mean over 100 baseline words. Vectors already stored are reused; the model is
    loaded only when one is missing. Imported vectors take precedence over computed ones.

    Words, listed or in an imported file, must be the sweep's words; a word that is not is
    refused and nothing is stored. Only with --model and --layer and no --sweep, when no sweep
    is read, may they be any words.

    \b
    Example:
      patchdb vectors --words Bread,Trees
      patchdb vectors --layer 20 --model smollm2-135m --words Bread
      patchdb vectors --import my_vectors.pt --layer 38
    """
    from patchdb.generate.vectors import RECIPE, run_vectors
    from patchdb.store import open_store  # here, not above: --help stays fast

    store = open_store(db)
    try:
        result = run_vectors(store, sweep, words, layer, model, device, dtype, import_path)
    finally:
        store.close()
    if result.imported is not None:
        click.echo(
            f"Imported {len(result.norms)} concept vectors from {import_path} for "
            f"{result.model_id} at layer {result.layer} ({result.imported} new)."
        )
        return
    click.echo(f"Concept vectors for {result.model_id} at layer {result.layer} ({RECIPE}):")
    width = max((len(w) for w in result.norms), default=0)
    for word, norm in result.norms.items():
        state = "computed now" if word in result.new else "stored"
        click.echo(f"  {word:<{width}}  norm {norm:9.3f}  {state}")
    reused = len(result.norms) - len(result.new)
    click.echo(f"Computed {len(result.new)}, reused {reused}.")
