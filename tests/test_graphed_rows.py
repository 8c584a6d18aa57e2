"""Rows that finish leave the static decoder's step (it moves to a smaller row count), and one
compiled program serves every decoder layer; answers stay the eager decode's. On the CPU: the
static decoder runs its steps without graph replay, the compiled one through inductor's C++."""

import shutil
from typing import Any

import pytest
import torch
from test_engine import PROMPT, STEER_LAYER, lively_llama, vector
from tiny_models import tiny_tokenizer

from patchdb.generate.engine import Engine, TargetUnit
from patchdb.generate.graphed import row_buckets
from patchdb.generate.layers import find_layers

N_NEW = 10


def make(model: Any, eos: list[int], **kwargs: Any) -> Engine:
    tok = tiny_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    start = ids.index(tok("\n")["input_ids"][0], 10)
    return Engine(model, find_layers(model), ids, start, STEER_LAYER, eos, **kwargs)


def gpu_engines(model: Any) -> Any:
    """build(eos, **kwargs): an Engine over `model` (the GPU tests' real-shape model) with the
    tiny tokenizer's prompt and the GPU tests' steer layer."""
    from test_engine import start_from_offsets
    from test_gpu import STEER_LAYER as GPU_STEER

    tok = tiny_tokenizer()
    ids = tok(PROMPT)["input_ids"]

    def build(eos: list[int], **kwargs: Any) -> Engine:
        return Engine(model, find_layers(model), ids, start_from_offsets(tok, PROMPT), GPU_STEER,
                      eos, **kwargs)

    return build


def units(engine: Engine) -> list[TargetUnit]:
    source = engine.source_run(vector(11), [3])
    return [TargetUnit(vector(12), 3, source[3], list(range(10))),
            TargetUnit(None, None, None, list(range(10, 16)))]


def answers(engine: Engine, todo: list[TargetUnit], temperature: float) -> list[Any]:
    return [[(c.token_ids, c.finish_reason) for c in unit]
            for unit in engine.generate(todo, N_NEW, temperature)]


def test_row_buckets_halve_down_to_an_eighth() -> None:
    assert row_buckets(1024) == [1024, 512, 256, 128]
    assert row_buckets(9) == [9, 5, 3, 2]
    assert row_buckets(1) == [1]


@pytest.mark.parametrize("fast_attention,temperature", [(False, 1.0), (True, 0.0)])
def test_finished_rows_leave_the_step_and_answers_stay(fast_attention: bool,
                                                       temperature: float) -> None:
    model = lively_llama(seed=4)
    free = make(model, [], use_graphs=False)
    todo = units(free)
    rows = [ids for unit in answers(free, todo, temperature) for ids, _ in unit]
    # Call EOS the tokens that most rows emit early, so rows end at different steps.
    stop = sorted({row[2] for row in rows[:12]} | {row[4] for row in rows[12:]})
    eager = answers(make(model, stop, use_graphs=False), todo, temperature)
    ends = sorted(len(ids) for unit in eager for ids, reason in unit if reason == "stop")
    assert len(ends) >= 12 and ends[0] < ends[-1] < N_NEW, "rows must end at different steps"
    for shrink in (True, False):
        static = make(model, stop, graph_replay=False, fast_attention=fast_attention,
                      share_prefix=fast_attention, shrink_rows=shrink)
        assert answers(static, todo, temperature) == eager
        decoder = static._decoder
        assert decoder is not None, "the static decoder did not run"
        # the last steps ran at fewer rows than the 16 the batch started with, or at all 16
        assert (decoder.current.rows < 16) == shrink
        assert decoder.sizes == ([16, 8, 4, 2] if shrink else [16])


def _compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_one_compiled_program_serves_every_layer_and_batch() -> None:
    from torch._dynamo.utils import counters

    model = lively_llama(seed=4)
    eager = make(model, [], use_graphs=False)
    todo = units(eager)
    want = answers(eager, todo, 1.0)
    static = make(model, [], graph_replay=False, compile_decode=True, share_prefix=True)
    torch._dynamo.reset()
    counters.clear()
    assert answers(static, todo, 1.0) == want
    first = counters["stats"]["unique_graphs"]
    # Programs per kind of layer, not per layer: compiling each of the 6 layers took 9 here.
    assert 0 < first < len(find_layers(model).layers)
    # A smaller batch (another row count) compiles once more, with the row count left
    # symbolic; later row counts reuse that.
    assert answers(static, todo[1:], 1.0) == want[1:]
    second = counters["stats"]["unique_graphs"]
    assert second <= 2 * first
    assert answers(static, [TargetUnit(None, None, None, [10, 11, 12])], 1.0) == [want[1][:3]]
    assert counters["stats"]["unique_graphs"] == second


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_rows_leave_captured_graphs_with_the_eager_greedy_answers(compiled: bool) -> None:
    """On a GPU: rows that finish move into graphs captured at fewer rows (plain and
    compiled), and the greedy answers stay the eager decode's."""
    from test_gpu import real_shape_model
    from test_gpu import units as gpu_units

    build = gpu_engines(real_shape_model("cuda"))
    with torch.inference_mode():
        free = build([], use_graphs=False)
        todo = gpu_units(free)
        rows = [c.token_ids for unit in free.generate(todo, 16, 0.0) for c in unit]
        stop = sorted({rows[0][3], rows[4][5]})  # the first unit's and the third's rows end early
        want = answers_16(build(stop, use_graphs=False), todo)
        ends = [len(ids) for unit in want for ids, reason in unit if reason == "stop"]
        assert len(ends) >= 5, "most rows must end early"
        fast = build(stop, compile_decode=compiled, share_prefix=True)
        assert answers_16(fast, todo) == want
    assert fast._decoder is not None and fast._decoder.current.rows < 7
    assert fast._decoder.captures >= 2  # the full row count and at least one smaller


def answers_16(engine: Engine, todo: list[TargetUnit]) -> list[Any]:
    return [[(c.token_ids, c.finish_reason) for c in unit] for unit in engine.generate(todo, 16, 0.0)]
