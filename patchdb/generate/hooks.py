"""Forward hooks for steering, MLP patching and recording MLP outputs.

All three work on whole batches with tensor ops: each row has its own steering vector (zero for
none), its own patch layer (-1 for none) and its own patch values, and nothing branches on a row
in Python. The engine tells the hooks where the current forward pass starts (`offset`), so the
same hook serves the prefill (the whole prompt) and each decode step (one token).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from patchdb.generate.layers import LayerMap


def _hidden(output: Any) -> torch.Tensor:
    """A decoder layer returns a tensor (transformers 5) or a tuple starting with one (GPT-2)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


class Steering:
    """Adds vectors[row] to a decoder layer's output at absolute positions >= start.

    `vectors` is [rows, hidden], already multiplied by the strength, in the model's dtype; a row
    without steering holds zeros. Set `offset` to the absolute position of the first token of
    each forward pass before running it.
    """

    def __init__(self, vectors: torch.Tensor, start: int) -> None:
        self.vectors = vectors
        self.start = start
        self.offset = 0

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden(output)
        positions = torch.arange(
            self.offset, self.offset + hidden.shape[1], device=hidden.device
        )
        mask = (positions >= self.start).to(hidden.dtype)
        # .to() is a no-op on one card; a model spread over cards has layers on others.
        steered = hidden + self.vectors.to(hidden.device)[:, None, :] * mask[None, :, None]
        return _replace_hidden(output, steered)


class Patch:
    """Replaces the MLP output of each row's patch layer over prompt positions start.. with
    that row's source values. `layers` is [rows] (int64, -1 for no patch); `values` is
    [rows, n_positions, hidden] in the model's dtype (anything for unpatched rows). `wanted`,
    the patch layers some row asks for, saves reading `layers` back from the GPU (a sync)."""

    def __init__(self, layers: torch.Tensor, values: torch.Tensor, start: int,
                 wanted: list[int] | None = None) -> None:
        self.layers = layers
        self.values = values
        self.start = start
        if wanted is None:
            wanted = [int(x) for x in layers.tolist()]
        self.wanted = sorted({x for x in wanted if x >= 0})

    def hook_for(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            end = self.start + self.values.shape[1]
            if output.shape[1] < end:
                raise RuntimeError(
                    f"patch over positions {self.start}-{end - 1} needs the whole prompt, "
                    f"got {output.shape[1]} positions"
                )
            chosen = (self.layers == layer).to(output.device)[:, None, None]
            values = self.values.to(device=output.device, dtype=output.dtype)
            patched = torch.where(chosen, values, output[:, self.start:end])
            return torch.cat([output[:, : self.start], patched, output[:, end:]], dim=1)

        return hook


@contextmanager
def steering(layer_map: LayerMap, layer: int, steer: Steering) -> Iterator[Steering]:
    """Steer the output of decoder layer `layer` while the block runs (before other hooks)."""
    handle = layer_map.layers[layer].register_forward_hook(steer, prepend=True)
    try:
        yield steer
    finally:
        handle.remove()


@contextmanager
def patching(layer_map: LayerMap, patch: Patch) -> Iterator[Patch]:
    """Patch the MLPs of the layers some row asks for (use around the prefill only).

    The hooks go first, so every other hook on the MLP sees the patched output."""
    handles = [layer_map.mlps[i].register_forward_hook(patch.hook_for(i), prepend=True)
               for i in patch.wanted]
    try:
        yield patch
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recording(
    layer_map: LayerMap, layers: list[int], start: int = 0
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the MLP output of each listed layer at positions start.. of every forward pass.

    The dict fills in as forwards run: layer -> [rows, positions, hidden] of the last pass.
    It sees patched outputs: patch hooks always run first.
    """
    records: dict[int, torch.Tensor] = {}

    def make(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            records[layer] = output[:, start:].detach().clone()

        return hook

    handles = [layer_map.mlps[i].register_forward_hook(make(i)) for i in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
