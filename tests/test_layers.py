"""find_layers on tiny random-init models of every supported family (nothing downloaded)."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

from patchdb.errors import ModelError
from patchdb.generate.layers import LAYER_PATHS, check_layer_range, find_layers

TEXT = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
FAMILIES = [
    ("LlamaConfig", {}),
    ("MistralConfig", {}),
    ("Qwen2Config", {}),
    ("Qwen3Config", {"head_dim": 8}),
    ("Gemma2Config", {"head_dim": 8}),
    ("Gemma3TextConfig", {"head_dim": 8}),
    ("Olmo2Config", {}),
]


def _forward_hidden(model: torch.nn.Module, layer: torch.nn.Module) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, _i: object, out: object) -> None:
        seen.append(out[0] if isinstance(out, tuple) else out)  # type: ignore[arg-type]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize(("config_name", "extra"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_decoder_families(config_name: str, extra: dict[str, int]) -> None:
    config = getattr(transformers, config_name)(**TEXT, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    found = find_layers(model)
    assert found.path == "model.layers"
    assert len(found.layers) == len(found.mlps) == 3
    assert found.mlps[1] is found.layers[1].mlp
    # the layer's output is the residual stream: hidden size on the last axis
    assert _forward_hidden(model, found.layers[2]).shape == (1, 4, 32)


def test_gpt2_style() -> None:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    found = find_layers(model)
    assert found.path == "transformer.h"
    assert found.mlps[0] is model.transformer.h[0].mlp
    assert _forward_hidden(model, found.layers[1]).shape == (1, 4, 32)


def test_gemma3_multimodal_wrapper_finds_text_layers_not_vision() -> None:
    config = Gemma3Config(
        text_config={**TEXT, "head_dim": 8, "num_hidden_layers": 4},
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    found = find_layers(model)
    assert found.path == "model.language_model.layers"
    assert len(found.layers) == 4
    assert type(found.layers[0]).__name__ == "Gemma3DecoderLayer"
    assert _forward_hidden(model, found.layers[3]).shape == (1, 4, 32)


def test_unknown_layout_is_found_by_search() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feed_forward = torch.nn.Linear(4, 4)

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.blocks = torch.nn.ModuleList([Block() for _ in range(5)])

    found = find_layers(Odd())
    assert found.path == "backbone.blocks"
    assert len(found.mlps) == 5


def test_unsupported_architecture_names_the_paths_tried() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ModelError) as err:
        find_layers(model)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot find decoder layers with an MLP in Sequential")
    for path in LAYER_PATHS:
        assert path in message


def test_check_layer_range_names_the_valid_range() -> None:
    check_layer_range(30, [0, 18, 29], "patch layer")
    with pytest.raises(ModelError, match=r"^patch layer 30 is outside the model's 30 decoder "
                                         r"layers \(valid range 0-29\)$"):
        check_layer_range(30, [20, 30], "patch layer")
    with pytest.raises(ModelError, match="valid range 0-5"):
        check_layer_range(6, [-1], "steer layer")
