"""Generate's progress counts decode tokens: the engine reports each decode step's rows, and the
bar (total = pending rollouts x max_new_tokens) advances with every step, a batch's rows that
stopped early counting in full when it ends. Tiny random-init Llama on the CPU."""

from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from test_engine import lively_llama
from test_generate_stage import init_store
from test_graphed_rows import N_NEW, answers, make, units
from tiny_models import tiny_tokenizer

from patchdb.generate import decode_loops, stage
from patchdb.generate.engine import Engine


@pytest.fixture(scope="module")
def ending_early() -> tuple[Any, list[Any], list[int]]:
    """The lively tiny Llama, 16 rows (two units) and EOS tokens that end the rows' answers
    at different steps (tokens the rows emit early)."""
    model = lively_llama(seed=4)
    free = make(model, [], use_graphs=False)
    todo = units(free)
    rows = [ids for unit in answers(free, todo, 1.0) for ids, _ in unit]
    return model, todo, sorted({row[2] for row in rows[:12]} | {row[4] for row in rows[12:]})


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_on_step_reports_the_rows_that_drew_a_token_at_each_step(
    static: bool, ending_early: tuple[Any, list[Any], list[int]]
) -> None:
    """At step s, the rows that drew a token are those whose answer (EOS included) is longer
    than s; the static decoder (CPU: no graph replay) reports as the eager decode does."""
    model, todo, stop = ending_early
    engine = make(model, stop, graph_replay=False) if static else make(model, stop,
                                                                        use_graphs=False)
    calls: list[int] = []
    out = engine.generate(todo, N_NEW, 1.0, on_step=calls.append)
    drawn = [len(c.token_ids) + (c.finish_reason == "stop") for unit in out for c in unit]
    assert len(drawn) == 16 and min(drawn) < max(drawn)  # rows stopped at different steps
    assert calls == [sum(d > s for d in drawn) for s in range(max(drawn))]
    assert calls[0] == 16 and sum(calls) == sum(drawn)
    assert (engine._decoder is not None) == static


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lively tiny Llama (varied answers), saved with the fixture tokenizer."""
    path = tmp_path_factory.mktemp("lively")
    lively_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_the_bar_advances_with_decode_steps(tmp_path: Path, model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two words a side, the two experiments of one key per word, layers 2-3, no baselines:
    8 units x 2 samples = 16 rollouts of up to 8 tokens, in 4 batches of 4 rows, with EOS
    tokens that end many answers early. The bar's total is 16 x 8 = 128; each batch starts
    where the last one's 4 x 8 = 32 ended, whatever its rows drew; inside a batch the bar
    moves at every decode step."""
    tokens_seen: list[list[int]] = []
    bars: list[Any] = []
    starts: list[int] = []
    steps: list[list[tuple[int, int]]] = []

    class Bar(decode_loops.tqdm):  # type: ignore[name-defined,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

    class Watched(Engine):
        def generate(self, *args: Any, on_step: Any = None, **kwargs: Any) -> Any:
            if not bars:  # the first run, which only finds tokens to call EOS
                out = super().generate(*args, on_step=on_step, **kwargs)
                tokens_seen.extend(c.token_ids for unit in out for c in unit)
                return out
            [bar] = bars
            starts.append(bar.n)
            seen: list[tuple[int, int]] = []
            steps.append(seen)

            def step(rows: int) -> None:
                if on_step is not None:  # the stage's own callback: the bar's update
                    on_step(rows)
                seen.append((rows, bar.n))

            return super().generate(*args, on_step=step, **kwargs)

    overrides = dict(temperature=1.0, max_new_tokens=8,
                     experiments=["steered_to_unsteered", "unsteered_to_steered"])
    monkeypatch.setattr(stage, "Engine", Watched)
    monkeypatch.setattr(stage, "eos_ids", lambda *a, **k: [])
    free = init_store(tmp_path, model_dir, "free.sqlite", **overrides)
    assert run_cli("generate", "--db", free, "--quiet", "--no-baselines").exit_code == 0
    assert len(tokens_seen) == 16
    stop = sorted({row[1] for row in tokens_seen[:8]} | {row[4] for row in tokens_seen[8:]})
    monkeypatch.setattr(stage, "eos_ids", lambda *a, **k: stop)
    monkeypatch.setattr(decode_loops, "tqdm", Bar)
    db = init_store(tmp_path, model_dir, **overrides)
    result = run_cli("generate", "--db", db, "--batch-size", "4", "--no-baselines")
    assert result.exit_code == 0, result.output
    [bar] = bars
    assert bar.total == 128 and bar.n == 128
    assert starts == [0, 32, 64, 96]
    for seen in steps:
        assert len(seen) > 1  # the bar moved during the batch, not only at its end
        assert [n for _, n in seen] == sorted({n for _, n in seen})  # at every step
    drawn = [sum(rows for rows, _ in seen) for seen in steps]
    assert any(d < 32 for d in drawn[:3])  # some rows stopped early: the rest came at the end
