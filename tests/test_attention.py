"""patchdb's decode attention against transformers' SDPA path, alone and inside a model."""

import pytest
import torch
from tiny_models import tiny_llama
from transformers import StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from patchdb.generate.attention import NAME, decode_attention, decode_attention_for


class Heads(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("additive", [False, True])
def test_decode_attention_matches_sdpa(heads: int, kv_heads: int, additive: bool) -> None:
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    batch, length, dim = 5, 23, 16
    query = torch.randn(batch, heads, 1, dim, generator=g)
    key = torch.randn(batch, kv_heads, length, dim, generator=g)
    value = torch.randn(batch, kv_heads, length, dim, generator=g)
    lengths = torch.tensor([1, 7, 23, 12, 18])
    mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :]
    if additive:
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    module = Heads(heads // kv_heads)
    ours, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == ref.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # a row sees only its own unmasked positions: changing a masked key changes nothing
    key[0, :, 5:] = 100.0
    again, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(again[0], ours[0], rtol=0, atol=0)


def test_a_model_decodes_the_same_through_it_and_gets_its_own_back() -> None:
    model = tiny_llama(n_layers=3, hidden=64, seed=2)
    prompt = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(1))

    def step() -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.inference_mode():
            model(input_ids=prompt, cache=cache, use_cache=True)
            mask = torch.zeros(3, 1, 1, 16, dtype=torch.bool)
            mask[..., :10] = True
            out = model(input_ids=prompt[:, -1:], cache=cache, use_cache=True,
                        attention_mask=mask, position_ids=torch.full((3, 1), 9))
        return out.logits.float()

    before = step()
    with decode_attention_for(model) as used:
        assert used
        assert ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, None) \
            is decode_attention
        during = step()
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-4)
    assert NAME != "sdpa"


def test_a_model_not_on_sdpa_is_left_alone() -> None:
    model = tiny_llama(n_layers=2, hidden=32, seed=3)
    model.config._attn_implementation = "eager"
    with decode_attention_for(model) as used:
        assert not used
        assert model.config._attn_implementation == "eager"


def test_rows_a_decode_kernel_program_takes() -> None:
    from patchdb.generate.triton_decode import rows_per_program

    # 16 query lines over 2 query heads a KV head: 8 rows, where 381 rows x 16 KV heads make
    # 768 programs, at least 4 a multiprocessor on 132
    assert rows_per_program(381, 16, 16, 2, 132) == 8
    # 20 rows: 48 programs at 8 rows, under 528; halved until 320 at 1 row
    assert rows_per_program(20, 16, 16, 2, 132) == 1
    assert rows_per_program(100, 16, 16, 2, 132) == 2  # 50 x 16 = 800 programs
    assert rows_per_program(20, 16, 16, 2, 0) == 8  # no multiprocessors given: no floor
    assert rows_per_program(5, 16, 1, 2, 0) == 1
