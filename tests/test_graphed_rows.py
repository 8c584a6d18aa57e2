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
