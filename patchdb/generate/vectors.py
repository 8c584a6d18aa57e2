"""Concept vectors: the original pipeline's recipe, stored in concept_vectors and reused later.

For word w at layer L: the output of decoder layer L (the residual stream) at the last token of
the chat prompt "Tell me about {w}." minus the mean of the same over the baseline words in
baseline_words.txt: the published introspection paper's list, which has "Butterflies" twice and
is de-duplicated in order to 99 words as the original scripts do. Not normalised. The baseline
mean is stored too, as the row with word "__baseline_mean__", so a new word later costs one
forward pass, not 100.

Every row carries its recipe. Vectors of another recipe (OLD_RECIPES: patchdb's earlier list of
100 words, which moves every vector) stay in the store but are never used for a sweep, so a
store that holds them computes the paper-baseline vectors beside them.

A user's own vectors come in through `import_vectors` under the recipe "imported"; where a word
has both, the imported vector is the one `ensure_vectors` returns.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from patchdb.errors import ConfigError, ImportFormatError
from patchdb.generate.layers import check_layer_range, find_layers
from patchdb.generate.loading import LoadedModel, default_device, load_model, model_id_for
from patchdb.generate.prompt import concept_prompt_ids
from patchdb.store import ConceptVector, Store
from patchdb.store.runs import stage_run
from patchdb.store.sweeps import check_sweep_words, get_sweep, sweep_config

RECIPE = "last-token-minus-paper-baseline-mean/v2"
OLD_RECIPES = ("last-token-minus-baseline-mean/v1",)  # patchdb's own 100-word baseline
IMPORTED_RECIPE = "imported"
BASELINE_MEAN = "__baseline_mean__"
BATCH_SIZE = 16


def baseline_words() -> list[str]:
    """The 99 paper baseline words whose mean is subtracted, in order, each once."""
    text = resources.files("patchdb.generate").joinpath("baseline_words.txt").read_text("utf-8")
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def to_blob(vector: torch.Tensor) -> bytes:
    return vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def from_blob(row: ConceptVector) -> torch.Tensor:
    return torch.frombuffer(bytearray(row.vector), dtype=torch.float32).clone()


class _Stop(Exception):
    """Raised by the layer hook: nothing after layer L is needed."""


@torch.inference_mode()
def last_token_outputs(
    loaded: LoadedModel, layer: int, words: list[str], batch_size: int = BATCH_SIZE
) -> dict[str, torch.Tensor]:
    """Output of decoder layer `layer` at the last prompt token of each word's concept prompt.

    Prompts of equal length run together, so no padding touches the positions or the result."""
    block = find_layers(loaded.model).layers[layer]
    by_length: dict[int, list[tuple[str, list[int]]]] = defaultdict(list)
    for word in dict.fromkeys(words):
        ids = concept_prompt_ids(loaded.tokenizer, word)
        by_length[len(ids)].append((word, ids))
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[:, -1, :].to("cpu", torch.float32))
        raise _Stop

    outputs: dict[str, torch.Tensor] = {}
    handle = block.register_forward_hook(hook)
    try:
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                batch = torch.tensor([ids for _, ids in chunk], device=loaded.device)
                captured.clear()
                try:
                    loaded.model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
                except _Stop:
                    pass
                for (word, _), row in zip(chunk, captured[0], strict=True):
                    outputs[word] = row.clone()
    finally:
        handle.remove()
    return outputs


def stored_vectors(
    session: Session, model_id: str, layer: int, words: list[str], recipes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Stored vectors of these words; a recipe earlier in `recipes` wins."""
    rows = session.scalars(
        select(ConceptVector).where(
            ConceptVector.model == model_id,
            ConceptVector.layer == layer,
            ConceptVector.word.in_(words),
            ConceptVector.recipe.in_(recipes),
        )
    ).all()
    rank = {recipe: i for i, recipe in enumerate(recipes)}
    best: dict[str, ConceptVector] = {}
    for row in rows:
        if row.word not in best or rank[row.recipe] < rank[best[row.word].recipe]:
            best[row.word] = row
    return {word: from_blob(row) for word, row in best.items()}


def insert_missing(
    session: Session, model_id: str, layer: int, recipe: str, vectors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Insert the vectors that are not stored yet; a row already there (another process got
    first) wins. Returns what the store holds afterwards."""
    held = stored_vectors(session, model_id, layer, list(vectors), (recipe,))
    for word, vector in vectors.items():
        if word in held:
            continue
        row = ConceptVector(
            model=model_id,
            layer=layer,
            word=word,
            recipe=recipe,
            dimension=int(vector.numel()),
            norm=float(vector.norm()),
            vector=to_blob(vector),
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:  # inserted by a concurrent writer since we looked
            pass
    held.update(stored_vectors(session, model_id, layer, list(vectors), (recipe,)))
    return held


def ensure_vectors(
    store: Store, loaded: LoadedModel, layer: int, words: list[str]
) -> dict[str, torch.Tensor]:
    """Raw float32 CPU concept vectors at `layer`, computing and storing (in one transaction)
    those the store does not hold yet."""
    check_layer_range(len(find_layers(loaded.model).layers), [layer], "concept vector layer")
    words = list(dict.fromkeys(words))
    if BASELINE_MEAN in words:
        raise ConfigError(f"{BASELINE_MEAN!r} is reserved for the stored baseline mean")
    model_id = loaded.model_id
    with store.read() as session:
        found = stored_vectors(session, model_id, layer, words, (IMPORTED_RECIPE, RECIPE))
        mean = stored_vectors(session, model_id, layer, [BASELINE_MEAN], (RECIPE,)).get(BASELINE_MEAN)
    missing = [w for w in words if w not in found]
    if not missing:
        return {w: found[w] for w in words}
    new: dict[str, torch.Tensor] = {}
    if mean is None:
        mean = torch.stack(list(last_token_outputs(loaded, layer, baseline_words()).values())).mean(0)
        new[BASELINE_MEAN] = mean
    raw = last_token_outputs(loaded, layer, missing)
    new.update({w: raw[w] - mean for w in missing})
    held = store.transact(lambda s: insert_missing(s, model_id, layer, RECIPE, new))
    found.update({w: held[w] for w in missing})
    return {w: found[w] for w in words}


def missing_vectors(store: Store, model_id: str, layer: int, words: list[str]) -> list[str]:
    """The words whose vector at `layer` is not stored yet (imported or computed)."""
    with store.read() as session:
        found = stored_vectors(session, model_id, layer, words, (IMPORTED_RECIPE, RECIPE))
    return [w for w in dict.fromkeys(words) if w not in found]


def _load_failure(exc: Exception) -> str:
    """One line on why torch.load refused a file, without torch's advice to turn
    weights_only off (that would let the file run code)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        reasons = [line for line in lines if not line.startswith(boilerplate)]
        return "refused by weights_only=True" + (f" ({reasons[0]})" if reasons else "")
    return lines[0] if lines else type(exc).__name__


def read_vector_file(path: Path) -> dict[str, torch.Tensor]:
    """A user's `{word: tensor}` file, loaded with weights_only=True and checked."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ImportFormatError(f"vector file not found: {path}") from None
    except Exception as exc:  # torch raises many kinds for a bad or unsafe file
        raise ImportFormatError(
            f"cannot read {path} as a torch file of tensors: {_load_failure(exc)}") from None
    if not isinstance(data, dict) or not data:
        raise ImportFormatError(f"{path} must hold a non-empty {{word: tensor}} dict")
    vectors: dict[str, torch.Tensor] = {}
    for word, value in data.items():
        if not isinstance(word, str) or not word.strip() or word.startswith("__"):
            raise ImportFormatError(f"{path}: {word!r} is not a usable word")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ImportFormatError(f"{path}: the value for {word!r} is not a float tensor")
        vector = value.detach().squeeze()
        if vector.dim() != 1:
            raise ImportFormatError(
                f"{path}: the vector for {word!r} has shape {tuple(value.shape)}; expected (d,)"
            )
        if not torch.isfinite(vector).all():
            raise ImportFormatError(f"{path}: the vector for {word!r} holds NaN or inf")
        vectors[word] = vector.to(torch.float32)
    dims = {v.numel() for v in vectors.values()}
    if len(dims) > 1:
        raise ImportFormatError(f"{path}: vectors have different dimensions {sorted(dims)}")
    return vectors


def _import(session: Session, model_id: str, layer: int, vectors: dict[str, torch.Tensor], path: Path) -> int:
    dimension = next(iter(vectors.values())).numel()
    known = session.scalars(
        select(ConceptVector.dimension).where(
            ConceptVector.model == model_id, ConceptVector.layer == layer
        )
    ).first()
    if known is not None and known != dimension:
        raise ImportFormatError(
            f"{path}: vectors have dimension {dimension}, but {model_id} at layer {layer} "
            f"has dimension {known}"
        )
    held = stored_vectors(session, model_id, layer, list(vectors), (IMPORTED_RECIPE,))
    for word, vector in vectors.items():
        if word in held and not torch.equal(held[word], vector):
            raise ImportFormatError(
                f"{word!r} already has a different imported vector for {model_id} at layer "
                f"{layer}; nothing was imported"
            )
    added = insert_missing(session, model_id, layer, IMPORTED_RECIPE, vectors)
    return len([w for w in added if w not in held])


def import_vectors(store: Store, path: Path, model_id: str, layer: int) -> int:
    """Store a user's `{word: tensor}` file as imported vectors; returns how many were new.
    A bad file changes nothing."""
    vectors = read_vector_file(Path(path))
    return store.transact(lambda s: _import(s, model_id, layer, vectors, Path(path)))



@dataclass
class VectorsResult:
    """What `patchdb vectors` did: the vectors it holds now and which of them are new."""

    model_id: str
    layer: int
    norms: dict[str, float] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    imported: int | None = None


def run_vectors(
    store: Store,
    sweep_name: str | None = None,
    words: list[str] | None = None,
    layer: int | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    import_path: Path | None = None,
) -> VectorsResult:
    """Compute (or import) concept vectors, by default the sweep's words at its steer layer,
    recorded as a "vectors" stage run. The model is loaded only if a vector is missing.

    Words, listed or imported, must be the sweep's; only without a sweep (a model and a layer
    given, no sweep named) may they be any. A refused word changes nothing in the store."""
    config = None
    sweep_id = None
    if sweep_name is not None or model is None or layer is None or (words is None and import_path is None):
        with store.read() as session:
            sweep = get_sweep(session, sweep_name)
        config, sweep_id = sweep_config(sweep), sweep.id
    spec = model or (config.model if config else "")
    revision = config.model_revision if config and model is None else None
    layer = layer if layer is not None else (config.steer_layer if config else 0)
    vectors_in = read_vector_file(import_path) if import_path is not None else None
    if config is not None:
        if vectors_in is not None:
            check_sweep_words(config, list(vectors_in), f"{import_path}: ")
        elif words is not None:
            check_sweep_words(config, words)
    model_id = model_id_for(spec)
    arguments = {"words": words, "layer": layer, "model": spec, "device": device, "dtype": dtype,
                 "import": str(import_path) if import_path else None}
    with stage_run(store, "vectors", arguments, sweep_id):
        if vectors_in is not None and import_path is not None:
            count = store.transact(lambda s: _import(s, model_id, layer, vectors_in, import_path))
            norms = {w: float(v.norm()) for w, v in vectors_in.items()}
            return VectorsResult(model_id, layer, norms, [], count)
        wanted = words or ([*config.positive_words, *config.negative_words] if config else [])
        missing = missing_vectors(store, model_id, layer, wanted)
        if missing:
            loaded = load_model(spec, dtype or (config.dtype if config else "float32"),
                                device or default_device(), revision)
            held = ensure_vectors(store, loaded, layer, wanted)
        else:
            with store.read() as session:
                held = stored_vectors(session, model_id, layer, wanted, (IMPORTED_RECIPE, RECIPE))
        return VectorsResult(model_id, layer, {w: float(held[w].norm()) for w in wanted}, missing)
