"""The GPU set (`pytest -m gpu`, scripts/test_gpu.sh): every decode path gives the eager path's
greedy answers on a random-init model of a small real shape, and the sampler never draws a token
outside the support Hugging Face's own warpers leave. Skipped without CUDA."""

from typing import Any

import pytest
import torch
from test_engine import PROMPT, start_from_offsets
from tiny_models import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from patchdb.generate import triton_decode
from patchdb.generate.engine import Engine, TargetUnit, eos_ids
from patchdb.generate.layers import find_layers
from patchdb.generate.sampling import Sampling, choose_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEER_LAYER = 1
N_NEW = 24
# Paths besides the eager decode: Engine keyword arguments.
PATHS = {
    "graphed-sdpa": dict(fast_attention=False),
    "graphed-triton": dict(fast_attention=True),
    "shared-prefix": dict(fast_attention=True, share_prefix=True),
    "compiled": dict(fast_attention=True, compile_decode=True),
}


def real_shape_model(device: str, seed: int = 0) -> Any:
    """A random-init Llama shaped like Llama-3.2-1B per layer (hidden 2048, 32 query heads over
    8 KV heads of 64, MLP 8192), four layers, the fixture tokenizer's vocabulary, float32.
    Weights are scaled up so that greedy answers vary from token to token."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model.to(device).eval()


def engine(model: Any, **kwargs: Any) -> Engine:
    tok = tiny_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    return Engine(model, find_layers(model), ids, start_from_offsets(tok, PROMPT), STEER_LAYER,
                  eos_ids(model, tok), **kwargs)


def units(eager: Engine) -> list[TargetUnit]:
    """Steered and unsteered rows, patched at two layers and unpatched, 1-3 samples each."""
    g = torch.Generator().manual_seed(7)
    hidden = eager.hidden_size

    def vec() -> torch.Tensor:
        return (torch.randn(hidden, generator=g) * 8.0).to(eager.device)

    source = eager.source_run(vec(), [2, 3])
    return [
        TargetUnit(vec(), 2, source[2], [0, 1, 2]),
        TargetUnit(None, 3, source[3], [3]),
        TargetUnit(vec(), None, None, [4, 5]),
        TargetUnit(vec(), 3, source[3], [6]),
    ]


@pytest.fixture(scope="module")
def model() -> Any:
    return real_shape_model("cuda")


@pytest.fixture(scope="module")
def eager_answers(model: Any) -> tuple[list[TargetUnit], list[list[list[int]]]]:
    eager = engine(model, use_graphs=False)
    todo = units(eager)
    with torch.inference_mode():
        answers = [[c.token_ids for c in unit] for unit in eager.generate(todo, N_NEW, 0.0)]
    assert len({tuple(t) for unit in answers for t in unit}) > 1, "the answers are all alike"
    assert all(len(set(t)) > 1 for unit in answers for t in unit), "an answer repeats one token"
    return todo, answers


@pytest.mark.parametrize("path", list(PATHS))
def test_every_decode_path_gives_the_eager_greedy_answers(
    path: str, model: Any, eager_answers: tuple[list[TargetUnit], list[list[list[int]]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    kernel = triton_decode.decode_attention_triton

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(triton_decode, "decode_attention_triton", counted)
    todo, want = eager_answers
    fast = engine(model, **PATHS[path])
    with torch.inference_mode():
        got = [[c.token_ids for c in unit] for unit in fast.generate(todo, N_NEW, 0.0)]
    assert fast._decoder is not None, f"{path}: the graphed decoder did not run"
    expected_prefix = fast.injection_start if path == "shared-prefix" else 0
    assert fast._decoder.prefix_len == expected_prefix
    if path in ("graphed-triton", "shared-prefix"):
        assert calls, f"{path}: the Triton kernel was never called"
    if path == "graphed-sdpa":
        assert not calls
    assert got == want


# --- the sampler's support against Hugging Face's warpers -----------------------------------------

SETTINGS = [
    Sampling(1.0, 50, 1.0),
    Sampling(0.7, 0, 0.9),
    Sampling(1.0, 64, 0.95),
    Sampling(1.3, 5, 0.5),
    Sampling(1.0, 1, 1.0),
]


def hf_support(logits: torch.Tensor, how: Sampling) -> torch.Tensor:
    """[rows, vocab] True where HF generate's warpers (temperature, top-k, top-p, in that order)
    leave a finite score: the tokens that sampling may draw."""
    scores = TemperatureLogitsWarper(how.temperature)(None, logits.float())
    if how.top_k > 0:
        scores = TopKLogitsWarper(how.top_k)(None, scores)
    if how.top_p < 1.0:
        scores = TopPLogitsWarper(how.top_p)(None, scores)
    kept = torch.isfinite(scores)
    # HF's top-p sort is not stable, so which of several tokens tied at the cut it keeps is
    # arbitrary: every token tied with the lowest kept score counts as inside.
    scaled = logits.float() / how.temperature
    lowest = scaled.masked_fill(~kept, float("inf")).min(dim=1, keepdim=True).values
    return kept | (scaled == lowest)


@pytest.mark.parametrize("how", SETTINGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_drawn_token_lies_outside_the_support(how: Sampling, dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(11)
    rows, vocab = 512, 262_144
    logits = (torch.randn(rows, vocab, generator=g, device="cuda") * 3.0).to(dtype)
    logits[:64, :4000] = logits[:64].max(dim=1, keepdim=True).values + 1  # 4000 tied at the top
    support = hf_support(logits, how)
    drawn = torch.zeros_like(support)
    seeds = torch.arange(rows, device="cuda", dtype=torch.int64) * 1_000_003 + 17
    for step in range(200):
        tokens = choose_tokens(logits, seeds, step, how)
        inside = support.gather(1, tokens[:, None]).squeeze(1)
        assert bool(inside.all()), (step, (~inside).nonzero().squeeze(1)[:5].tolist())
        drawn.scatter_(1, tokens[:, None], True)
    # not a sampler stuck on one token: most rows drew several tokens where the support allows
    several = support.sum(dim=1) > 1
    varied = drawn.sum(dim=1) > 1
    assert int(varied.sum()) >= 0.9 * int(several.sum())
