"""The GPU's decode path (static KV cache, patchdb's decode attention with the Triton kernel)
run step by step on the CPU, without graph replay, against the engine's eager decode."""

import pytest
import torch
from test_engine import PROMPT, STEER_LAYER, lively_llama, vector
from tiny_models import tiny_tokenizer

from patchdb.generate import triton_decode
from patchdb.generate.engine import Engine, TargetUnit, eos_ids
from patchdb.generate.layers import find_layers

pytestmark = pytest.mark.triton  # the kernel, interpreted on the CPU (conftest.py)


def engines(**static: bool) -> tuple[Engine, Engine]:
    model = lively_llama(seed=4)
    tok = tiny_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    start = ids.index(tok("\n")["input_ids"][0], 10)
    args = (model, find_layers(model), ids, start, STEER_LAYER, eos_ids(model, tok))
    return Engine(*args, use_graphs=False), Engine(*args, graph_replay=False, **static)


def units(engine: Engine) -> list[TargetUnit]:
    source = engine.source_run(vector(11), [3, 4])
    return [
        TargetUnit(vector(12), 3, source[3], [0, 1, 2]),
        TargetUnit(None, 4, source[4], [3]),
        TargetUnit(vector(13), None, None, [4, 5]),
    ]


@pytest.mark.parametrize("fast_attention,share_prefix,temperature", [
    (True, False, 0.0), (False, False, 1.0), (True, True, 0.0), (True, True, 1.0),
])
def test_static_decoder_gives_the_eager_answers(
    fast_attention: bool, share_prefix: bool, temperature: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    kernel = triton_decode.decode_attention_triton

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return kernel(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_decode, "decode_attention_triton", counted)
    eager, static = engines(fast_attention=fast_attention, share_prefix=share_prefix)
    todo = units(eager)
    want = [[c.token_ids for c in unit] for unit in eager.generate(todo, 6, temperature)]
    got = [[c.token_ids for c in unit] for unit in static.generate(todo, 6, temperature)]
    assert static._decoder is not None, "the static decoder did not run"
    shared = static._decoder.prefix_len
    assert shared == (static.injection_start if share_prefix else 0)
    # a shared prefix leaves the rows' own cache that much shorter
    assert static._decoder.mask.shape[-1] == static.prompt_len + 6 - shared
    assert got == want
    assert len({tuple(t) for unit in want for t in unit}) > 1  # the answers are not all alike
    uses_kernel = fast_attention and triton_decode.available(torch.zeros(1))
    assert bool(calls) == uses_kernel


def test_the_prefix_is_shared_only_where_the_decode_attention_honours_it() -> None:
    eager, static = engines(share_prefix=True)
    max_len = static.prompt_len + 6
    assert static.shared_prefix_len(max_len) == static.injection_start
    assert eager.shared_prefix_len(max_len) == 0  # the eager decode keeps every row's prompt
    todo = units(eager)
    config = static.model.config
    # Attention that patchdb does not route would not see a shared prefix. Under another
    # implementation the engine decodes eagerly (the static decoder's mask is SDPA's); with
    # softcapped logits the static decoder keeps every row's whole prompt. Answers stay the same.
    for setting, value, static_path in (("_attn_implementation", "eager", False),
                                        ("attn_logit_softcapping", 30.0, True)):
        before = getattr(config, setting, None)
        setattr(config, setting, value)
        static._decoder, static._graph_ok = None, {}
        try:
            assert static.shared_prefix_len(max_len) == 0
            want = [[c.token_ids for c in unit] for unit in eager.generate(todo, 6, 1.0)]
            got = [[c.token_ids for c in unit] for unit in static.generate(todo, 6, 1.0)]
            assert (static._decoder is not None) == static_path
            assert static._decoder is None or static._decoder.prefix_len == 0
            assert got == want
        finally:
            setattr(config, setting, before)
            static._graph_ok = {}
    assert static.shared_prefix_len(max_len) == static.injection_start
