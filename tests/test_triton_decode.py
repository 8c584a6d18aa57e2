"""The Triton decode-attention kernel against SDPA on the valid part of the cache (on the CPU it
runs in Triton's interpreter, which conftest.py turns on)."""

import pytest
import torch

from patchdb.generate import triton_decode
from patchdb.generate.attention import cache_length, decode_attention

pytestmark = pytest.mark.skipif(triton_decode.triton is None, reason="Triton is not installed")


class Heads(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


# bfloat16 on GPUs only: Triton's CPU interpreter mishandles it (float16 stands in here).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,groups,dim,length", [
    (2, 1, 16, 1), (2, 2, 32, 64), (1, 4, 16, 65), (3, 8, 64, 100), (2, 16, 16, 128),
])
def test_kernel_matches_sdpa_over_the_valid_positions(
    dtype: torch.dtype, kv_heads: int, groups: int, dim: int, length: int
) -> None:
    g = torch.Generator().manual_seed(length * 7 + groups)
    batch, max_len = 3, 130
    query = torch.randn(batch, kv_heads, groups, dim, generator=g).to(dtype)
    key = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(dtype)
    value = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(dtype)
    key[:, :, length:] = 1e4  # stale cache beyond the valid length must not count
    out = triton_decode.decode_attention_triton(
        query, key, value, torch.tensor(length, dtype=torch.int32), 0.2)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key[:, :, :length].float(), value[:, :, :length].float(), scale=0.2)
    assert out.shape == query.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_decode_attention_uses_the_kernel_while_a_length_is_set() -> None:
    g = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, max_len, dim = 2, 4, 2, 40, 16
    query = torch.randn(batch, heads, 1, dim, generator=g)
    key = torch.randn(batch, kv_heads, max_len, dim, generator=g)
    value = torch.randn(batch, kv_heads, max_len, dim, generator=g)
    mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool)
    mask[..., :30] = True
    module = Heads(heads // kv_heads)
    by_mask, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    with cache_length(torch.tensor(30, dtype=torch.int32)):
        by_kernel, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(by_kernel, by_mask, rtol=1e-5, atol=1e-5)
    # the kernel follows the length it is given, not the mask
    with cache_length(torch.tensor(12, dtype=torch.int32)):
        shorter, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    mask[..., 12:] = False
    expected, _ = decode_attention(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(shorter, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shorter, by_mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix_len,length", [(1, 1), (64, 30), (100, 65)])
def test_kernel_attends_to_a_shared_prefix_then_each_rows_own(
    dtype: torch.dtype, prefix_len: int, length: int
) -> None:
    g = torch.Generator().manual_seed(prefix_len + length)
    batch, kv_heads, groups, dim, max_len = 3, 2, 4, 32, 80
    query = torch.randn(batch, kv_heads, groups, dim, generator=g).to(dtype)
    key = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(dtype)
    value = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(dtype)
    p_key = torch.randn(kv_heads, prefix_len, dim, generator=g).to(dtype)
    p_value = torch.randn(kv_heads, prefix_len, dim, generator=g).to(dtype)
    out = triton_decode.decode_attention_triton(
        query, key, value, torch.tensor(length, dtype=torch.int32), 0.2, (p_key, p_value))
    full_k = torch.cat([p_key.expand(batch, -1, -1, -1), key[:, :, :length]], dim=2)
    full_v = torch.cat([p_value.expand(batch, -1, -1, -1), value[:, :, :length]], dim=2)
    ref = torch.nn.functional.scaled_dot_product_attention(
        query.float(), full_k.float(), full_v.float(), scale=0.2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
