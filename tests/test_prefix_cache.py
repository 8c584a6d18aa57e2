"""The shared prompt prefix's cache, repeated for a prefill of many units (engine.repeated):
broadcast views in shallow copies of its layers, so the one-row prefix cache stays as it was and
every prefill computes exactly what a deep copy repeated row by row gave."""

import copy

import pytest
import torch
from test_engine import lively_llama, vector
from test_graphed_rows import make
from tiny_models import tiny_tokenizer
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig
from transformers.cache_utils import DynamicLayer

from patchdb.generate.engine import TargetUnit, repeated
from patchdb.generate.loading import forward_arguments

ROWS = 3


def tiny_gemma(window: int) -> Gemma3ForCausalLM:
    """Six layers, five of them sliding-window (Gemma-3's pattern), in float32."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tiny_tokenizer()), hidden_size=64,
                              intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, sliding_window=window,
                              max_position_embeddings=256)
    return Gemma3ForCausalLM(config).eval()


def kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def same(a: list[tuple[torch.Tensor, torch.Tensor]],
         b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(v, w)
                                    for (x, v), (y, w) in zip(a, b, strict=True))


@pytest.mark.parametrize("window", [1024, 6], ids=["window-past-the-prompt", "window-of-6"])
@torch.inference_mode()
def test_a_repeated_prefix_computes_what_a_deep_copy_did_and_stays_as_it_was(window: int) -> None:
    model = tiny_gemma(window)
    ids = torch.tensor([tiny_tokenizer()("I can inject thoughts into your activations.")
                        ["input_ids"]])
    name = forward_arguments(model)[0]

    def run(tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        return model(input_ids=tokens, use_cache=True, **{name: cache}).logits

    prefix = DynamicCache(config=model.config)
    run(ids[:, :7], prefix)
    before = kv(prefix)
    suffix = torch.randint(0, model.config.vocab_size, (ROWS, 5), generator=torch.Generator()
                           .manual_seed(1))

    deep = copy.deepcopy(prefix)
    deep.batch_repeat_interleave(ROWS)
    want = run(suffix, deep)
    shallow = repeated(prefix, ROWS)
    got = run(suffix, shallow)

    assert torch.equal(got, want)
    assert same(kv(shallow), kv(deep))
    assert same(kv(prefix), before), "the prefix cache was written by a prefill"
    assert all(layer.keys.shape[0] == 1 for layer in prefix.layers)
    # a second prefill from the same prefix computes the same again
    assert torch.equal(run(suffix, repeated(prefix, ROWS)), want)


def test_a_cache_of_another_layer_kind_is_deep_copied() -> None:
    class Other(DynamicLayer):
        pass

    cache = DynamicCache()
    cache.layers = [Other()]
    keys = torch.arange(8.0).reshape(1, 1, 2, 4)
    cache.layers[0].update(keys, keys + 1)
    out = repeated(cache, ROWS)
    assert out.layers[0] is not cache.layers[0]
    assert out.layers[0].keys.shape == (ROWS, 1, 2, 4)
    assert out.layers[0].keys.stride(0) != 0  # rows of its own, not a view of the one row
    assert torch.equal(out.layers[0].values[2], keys[0] + 1)


@torch.inference_mode()
def test_prefills_from_the_shared_prefix_leave_it_as_it_was() -> None:
    engine = make(lively_llama(seed=4), [], graph_replay=False, share_prefix=True)
    units = [TargetUnit(vector(12), None, None, [0, 1]), TargetUnit(None, None, None, [2])]
    logits, cache = engine.prefill_from_prefix(units)
    assert engine._prefix_cache is not None
    held = kv(engine._prefix_cache)
    assert all(k.shape[0] == 1 and k.shape[2] == engine.injection_start for k, _ in held)
    again, cache_again = engine.prefill_from_prefix(units)
    assert torch.equal(again, logits)
    assert same(kv(cache_again), kv(cache))
    assert same(kv(engine._prefix_cache), held)
    assert all(k.shape[0] == len(units) and k.shape[2] == engine.prompt_len for k, _ in kv(cache))
