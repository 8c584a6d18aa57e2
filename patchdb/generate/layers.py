"""Finding a model's decoder layers and their MLPs without hard-coding one architecture.

Known layouts are tried first (Llama-likes, multimodal wrappers, GPT-2); failing those, the
longest list of blocks that each carry an MLP is taken. Anything else is an error naming every
path that was tried.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from patchdb.errors import ModelError

# Where decoder layers sit, most specific first. "model.language_model.layers" is a multimodal
# wrapper such as Gemma3ForConditionalGeneration; "transformer.h" is GPT-2 style.
LAYER_PATHS = (
    "model.language_model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "layers",
)
MLP_NAMES = ("mlp", "feed_forward", "ffn")
# Module lists under these names are never decoder layers of the text model.
NOT_TEXT = ("vision", "visual", "audio", "image", "multi_modal_projector", "encoder")


@dataclass
class LayerMap:
    layers: list[torch.nn.Module]
    mlps: list[torch.nn.Module]
    path: str


def _attribute(root: torch.nn.Module, path: str) -> object | None:
    node: object = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _mlp_of(layer: torch.nn.Module) -> torch.nn.Module | None:
    for name in MLP_NAMES:
        mlp = getattr(layer, name, None)
        if isinstance(mlp, torch.nn.Module):
            return mlp
    return None


def _layer_map(blocks: object, path: str) -> LayerMap | None:
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        return None
    layers = list(blocks)
    mlps = [_mlp_of(layer) for layer in layers]
    if any(m is None for m in mlps):
        return None
    return LayerMap(layers, [m for m in mlps if m is not None], path)


def _search(model: torch.nn.Module) -> LayerMap | None:
    """The longest ModuleList of blocks with an MLP, outside vision/audio towers."""
    best: LayerMap | None = None
    for name, module in model.named_modules():
        if any(word in name.lower() for word in NOT_TEXT):
            continue
        found = _layer_map(module, name)
        if found is not None and (best is None or len(found.layers) > len(best.layers)):
            best = found
    return best


def find_layers(model: torch.nn.Module) -> LayerMap:
    """The decoder layers of `model` in order, each with its MLP module."""
    for path in LAYER_PATHS:
        found = _layer_map(_attribute(model, path), path)
        if found is not None:
            return found
    found = _search(model)
    if found is not None:
        return found
    raise ModelError(
        f"cannot find decoder layers with an MLP in {type(model).__name__} "
        f"(tried {', '.join(LAYER_PATHS)}, then any list of blocks with "
        f"{'/'.join(MLP_NAMES)}); this architecture is not supported"
    )


def check_layer_range(n_layers: int, layers: Iterable[int], what: str) -> None:
    """Refuse a layer index the model does not have, naming the valid range."""
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ModelError(
                f"{what} {layer} is outside the model's {n_layers} decoder layers "
                f"(valid range 0-{n_layers - 1})"
            )
