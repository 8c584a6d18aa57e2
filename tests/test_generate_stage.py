"""`patchdb generate` end to end on a tiny random-init Llama saved as a local model folder."""

import functools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import file_digest, run_cli
from pg import execute, query
from test_pins_seeds import by_recipe
from tiny_models import save_tiny_llama

N_LAYERS = 6
WORDS = ("Bread", "Trees", "Dust")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with scaled-up weights (varied answers), saved with the fixture tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, n_layers=N_LAYERS, hidden=64, seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    model.save_pretrained(path)
    return path


def write_config(tmp_path: Path, model_dir: Path, **overrides: object) -> Path:
    values: dict[str, object] = {
        "name": "tiny",
        "model": str(model_dir),
        "dtype": "float32",
        "steer_layer": 1,
        "strength": 4.0,
        "patch_layers": "2-3",
        "samples": 2,
        "max_new_tokens": 5,
        "temperature": 0.0,
        "positive_words": ["Bread", "Trees"],
        "negative_words": ["Dust"],
        "experiments": [
            "failure_to_success", "success_to_failure", "steered_to_unsteered",
            "unsteered_to_steered",
        ],
    }
    values.update(overrides)
    lines = ["[sweep]"]
    for key, value in values.items():
        if isinstance(value, str):
            lines.append(f"{key} = {value!r}".replace("'", '"'))
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            lines.append(f"{key} = {value}")
    path = tmp_path / f"sweep-{len(list(tmp_path.glob('sweep-*.toml')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def init_store(tmp_path: Path, model_dir: Path, name: str = "store.sqlite",
               db: str | Path | None = None, **overrides: object) -> Path | str:
    """Register the tiny sweep in `db` (a path or URL; default: tmp_path / name)."""
    db = Path(db) if db is not None and "://" not in str(db) else db or tmp_path / name
    result = run_cli("init", "--config", write_config(tmp_path, model_dir, **overrides), "--db", db)
    assert result.exit_code == 0, result.output
    return db


def rollouts(db: Path | str) -> dict[tuple[str, int, str, str, int], tuple[str, int, str, int]]:
    rows = query(
        db, "SELECT e.name, r.patch_layer, r.source_word, r.target_word, r.sample_index, "
        "r.answer, r.n_tokens, r.finish_reason, r.seed "
        "FROM rollouts r JOIN experiments e ON e.id = r.experiment_id")
    return {tuple(r[:5]): tuple(r[5:]) for r in rows}  # type: ignore[misc]


# 8 keys per layer (2 + 2 + 2 + 2), 2 layers, plus one unpatched baseline per target condition
# of each experiment (2 + 1 + 1 + 2), 2 samples: (16 + 6) x 2.
ALL_ROLLOUTS = 44


def test_generate_fills_the_sweep_once(tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)
    result = run_cli("generate", "--db", db, "--quiet")
    assert result.exit_code == 0, result.output
    assert "Wrote 44 rollouts in 22 units (22/22 units present)" in result.output
    got = rollouts(db)
    assert len(got) == ALL_ROLLOUTS
    for (_exp, _layer, _src, _tgt, _sample), (answer, n_tokens, reason, seed) in got.items():
        assert reason in ("stop", "length")
        assert 0 < n_tokens <= 5 or reason == "stop"
        assert 0 <= seed < 2**62
        assert "<|im_start|>" not in answer and "Trial 1" not in answer
    assert len({v[3] for v in got.values()}) == ALL_ROLLOUTS  # every rollout its own seed
    for (exp, layer, src, tgt, sample), (_answer, _n, _reason, seed) in got.items():
        assert seed == by_recipe("tiny", exp, layer, src, tgt, sample), (exp, layer, src, tgt)
    with sqlite3.connect(db) as conn:
        prompt, start = conn.execute("SELECT prompt_text, injection_start FROM sweeps").fetchone()
        runs = conn.execute("SELECT stage, status FROM stage_runs").fetchall()
        vectors = conn.execute("SELECT DISTINCT word FROM concept_vectors WHERE layer = 1").fetchall()
    assert "Trial 1" in prompt and start > 0
    assert runs == [("generate", "finished")]
    assert {w for (w,) in vectors} >= set(WORDS)

    again = run_cli("generate", "--db", db, "--quiet")
    assert again.exit_code == 0, again.output
    assert "Nothing to generate: all 22 units of sweep 'tiny' in scope are present." in again.output
    assert rollouts(db) == got


def test_unsteered_experiments_store_the_sentinel(tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)
    result = run_cli("generate", "--db", db, "--quiet", "--experiments",
                     "steered_to_unsteered,unsteered_to_steered", "--layers", "2")
    assert result.exit_code == 0, result.output
    with sqlite3.connect(db) as conn:
        table = conn.execute(
            "SELECT e.name, r.source_word, r.target_word FROM rollouts r "
            "JOIN experiments e ON e.id = r.experiment_id ORDER BY 1, 2, 3"
        ).fetchall()
        view = conn.execute(
            "SELECT DISTINCT experiment, source, target FROM rollouts_readable ORDER BY 1, 2, 3"
        ).fetchall()
    assert sorted(set(table)) == [
        ("steered_to_unsteered", "", ""),  # the baseline with no steering: the control
        ("steered_to_unsteered", "Bread", ""), ("steered_to_unsteered", "Trees", ""),
        ("unsteered_to_steered", "", "Bread"), ("unsteered_to_steered", "", "Trees"),
    ]
    assert view == [
        ("steered_to_unsteered", "(none)", "(none)"),
        ("steered_to_unsteered", "Bread", "(none)"), ("steered_to_unsteered", "Trees", "(none)"),
        ("unsteered_to_steered", "(none)", "Bread"), ("unsteered_to_steered", "(none)", "Trees"),
    ]


def test_a_run_in_parts_equals_a_run_at_once(tmp_path: Path, model_dir: Path) -> None:
    whole = init_store(tmp_path, model_dir, "whole.sqlite")
    assert run_cli("generate", "--db", whole, "--quiet", "--batch-size", "64").exit_code == 0
    parts = init_store(tmp_path, model_dir, "parts.sqlite")
    first = run_cli("generate", "--db", parts, "--quiet", "--layers", "3", "--batch-size", "3")
    assert first.exit_code == 0, first.output
    assert {k[1] for k in rollouts(parts)} == {-1, 3}  # -1: the baselines, not a layer
    second = run_cli("generate", "--db", parts, "--quiet", "--batch-size", "1")
    assert second.exit_code == 0, second.output
    assert "Wrote 16 rollouts in 8 units (22/22 units present)" in second.output
    # Same keys, and (greedy, batch-invariant) the same answers, whatever the batching.
    assert rollouts(parts) == rollouts(whole)


def test_shards_split_the_work_without_overlap(tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)
    assert run_cli("generate", "--db", db, "--quiet", "--shard", "0/2").exit_code == 0
    half = set(rollouts(db))
    assert 0 < len(half) < ALL_ROLLOUTS
    assert run_cli("generate", "--db", db, "--quiet", "--shard", "1/2").exit_code == 0
    assert len(rollouts(db)) == ALL_ROLLOUTS


def test_regenerating_a_deleted_key_reproduces_it(tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir, temperature=1.0, samples=3)
    assert run_cli("generate", "--db", db, "--quiet", "--layers", "2").exit_code == 0
    before = rollouts(db)
    key = ("success_to_failure", 2, "Trees", "Dust")
    assert len({before[(*key, i)][0] for i in range(3)}) > 1  # sampled, not greedy
    with sqlite3.connect(db) as conn:
        conn.execute(
            "DELETE FROM rollouts WHERE patch_layer = 2 AND source_word = 'Trees' "
            "AND target_word = 'Dust'"
        )
        conn.execute(
            "DELETE FROM rollouts WHERE patch_layer = 2 AND source_word = '' "
            "AND target_word = 'Bread' AND sample_index = 1"
        )
    result = run_cli("generate", "--db", db, "--quiet", "--layers", "2")
    assert result.exit_code == 0, result.output
    assert "Wrote 4 rollouts in 2 units" in result.output
    assert rollouts(db) == before


def test_samples_option_generates_the_first_indexes_only(tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)
    result = run_cli("generate", "--db", db, "--quiet", "--samples", "1", "--words", "Dust")
    assert result.exit_code == 0, result.output
    got = rollouts(db)
    assert {k[4] for k in got} == {0}
    assert all("Dust" in (k[2], k[3]) for k in got if k[:4] != ("steered_to_unsteered", -1, "", ""))
    # (Bread, Dust), (Trees, Dust), (Dust, Bread), (Dust, Trees) x 2 layers, Dust's baseline and
    # the no-injection control (the reference of every word)
    assert len(got) == 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "7"], "Error: layer 7 is not a patch layer of sweep 'tiny' (patch layers: 2-3)"),
        (["--words", "Bred"], "Error: unknown word 'Bred'"),
        (["--experiments", "nope"], "Error: unknown experiment 'nope' in sweep 'tiny'"),
        (["--shard", "2/2"], "Invalid value for '--shard': invalid shard '2/2'"),
        (["--shard", "x"], "Invalid value for '--shard': invalid shard 'x': expected i/N"),
        (["--batch-size", "0"], "Invalid value for '--batch-size': expected 'auto' or a positive"),
        (["--samples", "3"], "Error: --samples must be between 1 and the sweep's 2, got 3"),
        (["--sweep", "other"], "Error: no sweep named 'other' in the store (known: tiny)"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    tmp_path: Path, model_dir: Path, args: list[str], message: str
) -> None:
    db = init_store(tmp_path, model_dir)
    digest = file_digest(db)
    result = run_cli("generate", "--db", db, "--quiet", *args)
    assert result.exit_code in (1, 2)
    assert message in result.output
    assert file_digest(db) == digest


def test_layers_outside_the_model_are_refused_before_writing(
    tmp_path: Path, model_dir: Path
) -> None:
    db = init_store(tmp_path, model_dir, patch_layers="4-7")
    digest = file_digest(db)
    result = run_cli("generate", "--db", db, "--quiet")
    assert result.exit_code == 1
    assert "Error: patch layer 6 is outside the model's 6 decoder layers (valid range 0-5)" in (
        result.output
    )
    assert file_digest(db) == digest


def test_ctrl_c_stops_after_a_batch_and_a_rerun_completes(tmp_path: Path, model_dir: Path,
                                                          store_db: str) -> None:
    db = init_store(tmp_path, model_dir, db=store_db, max_new_tokens=40)
    # Ctrl-C as the first unit is written: the process sends itself SIGINT at that point
    # (patchdb/faults.py), so where it lands does not depend on timing.
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATCHDB_FAULT="generate.unit_written:1:INT")
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchdb", "generate", "--db", str(db), "--batch-size", "2",
         "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out + err
    assert "Interrupted" in err
    partial = rollouts(db)
    assert 0 < len(partial) < ALL_ROLLOUTS
    assert len(partial) % 2 == 0  # whole units only (2 samples each)
    assert query(db, "SELECT status FROM stage_runs") == [("interrupted",)]
    result = run_cli("generate", "--db", db, "--quiet")
    assert result.exit_code == 0, result.output
    done = rollouts(db)
    assert len(done) == ALL_ROLLOUTS
    assert all(done[k] == v for k, v in partial.items())


def test_two_processes_on_one_store_write_each_rollout_once(tmp_path: Path, model_dir: Path,
                                                            store_db: str) -> None:
    """Both runs are held after decoding their first batch until the other has got there too,
    so both find work whatever the machine's load; then they race to the end."""
    db = init_store(tmp_path, model_dir, db=store_db)
    command = [sys.executable, "-m", "patchdb", "generate", "--db", str(db), "--batch-size", "2",
               "--quiet"]
    env = dict(os.environ, PATCHDB_FAULT="generate.batch_decoded:1:STOP")
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env))
            wait_until_stopped(procs[-1].pid)
        for p in procs:
            p.send_signal(signal.SIGCONT)
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    n_rows = query(db, "SELECT COUNT(*) FROM rollouts")[0][0]
    by_run = query(db, "SELECT s.status, COUNT(r.id) FROM stage_runs s LEFT JOIN rollouts r "
                       "ON r.stage_run_id = s.id GROUP BY s.id")
    assert n_rows == ALL_ROLLOUTS
    assert [status for status, _ in by_run] == ["finished", "finished"]
    assert sum(n for _, n in by_run) == ALL_ROLLOUTS


def wait_until_stopped(pid: int) -> None:
    """Wait for the process to stop itself (state T), as PATCHDB_FAULT=...:STOP makes it."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.02)
    raise AssertionError("the process never reached its fault point")


def test_units_another_process_wrote_meanwhile_are_skipped(tmp_path: Path, model_dir: Path,
                                                           store_db: str) -> None:
    """The run stops itself after decoding its first batch; meanwhile every unit of the sweep is
    written by another run. It then writes nothing, duplicates nothing and fails on nothing."""
    other = init_store(tmp_path, model_dir, name="other.sqlite")
    assert run_cli("generate", "--db", other, "--quiet").exit_code == 0
    db = init_store(tmp_path, model_dir, db=store_db)
    env = dict(os.environ, PATCHDB_FAULT="generate.batch_decoded:1:STOP")
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchdb", "generate", "--db", str(db), "--batch-size", "2",
         "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until_stopped(proc.pid)
        ids = dict(query(db, "SELECT name, id FROM experiments"))
        execute(db, "INSERT INTO rollouts (experiment_id, patch_layer, source_word, target_word, "
                "sample_index, answer, n_tokens, finish_reason, seed, created_at) VALUES (:e, :l, "
                ":s, :t, :i, :a, :n, :f, :seed, CURRENT_TIMESTAMP)",
                [dict(e=ids[exp], l=layer, s=src, t=tgt, i=i, a=f"elsewhere: {answer}", n=n,
                      f=reason, seed=seed)
                 for (exp, layer, src, tgt, i), (answer, n, reason, seed) in
                 rollouts(other).items()])
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    got = rollouts(db)
    assert len(got) == ALL_ROLLOUTS
    assert all(answer.startswith("elsewhere: ") for answer, *_ in got.values())
    assert "Wrote 0 rollouts in 0 units (22/22 units present)" in out, out
    assert "Skipped 22 units that another process wrote meanwhile." in out, out
    # only the first batch (2 rows of at most 5 tokens) was decoded: the rest was dropped unrun
    decoded = int(re.search(r": (\d+) tokens in ", out).group(1))  # type: ignore[union-attr]
    assert 0 < decoded <= 2 * 5, out
    assert query(db, "SELECT COUNT(*) FROM rollouts WHERE stage_run_id IS NOT NULL") == [(0,)]
    assert query(db, "SELECT status FROM stage_runs") == [("finished",)]


def test_answers_that_end_early_are_written_through_the_static_decoder(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that reach EOS at different steps leave the static decoder's step (it runs on the CPU
    stepwise, without graph replay); every unit is written whole, as the eager decode writes it."""
    from patchdb.generate import stage
    from patchdb.generate.engine import Engine

    seen: list[list[int]] = []
    last_rows: list[int] = []

    class Recording(Engine):
        def generate(self, *args: Any, **kwargs: Any) -> Any:
            out = super().generate(*args, **kwargs)
            seen.extend(c.token_ids for unit in out for c in unit)
            if self._decoder is not None:
                last_rows.append(self._decoder.current.rows)
            return out

    overrides = dict(temperature=1.0, max_new_tokens=8)
    monkeypatch.setattr(stage, "Engine", Recording)
    monkeypatch.setattr(stage, "eos_ids", lambda *a, **k: [])
    assert run_cli("generate", "--db", init_store(tmp_path, model_dir, "free.sqlite", **overrides),
                   "--quiet").exit_code == 0
    # Tokens the rows emit mid-answer: most rows end by their fourth token, the rest later.
    stop = sorted({row[3] for row in seen[:30]} | {row[5] for row in seen[30:]})
    monkeypatch.setattr(stage, "eos_ids", lambda *a, **k: stop)
    eager_db = init_store(tmp_path, model_dir, "eager.sqlite", **overrides)
    assert run_cli("generate", "--db", eager_db, "--quiet").exit_code == 0
    static = functools.partial(Recording, graph_replay=False, fast_attention=False)
    monkeypatch.setattr(stage, "Engine", static)
    static_db = init_store(tmp_path, model_dir, "static.sqlite", **overrides)
    result = run_cli("generate", "--db", static_db, "--quiet", "--no-refill")
    assert result.exit_code == 0, result.output
    assert last_rows and last_rows[-1] < ALL_ROLLOUTS  # the last steps ran at fewer rows
    want = rollouts(eager_db)
    assert rollouts(static_db) == want and len(want) == ALL_ROLLOUTS
    # Continuous batching (the default on the static decoder): 12 rows a step, refilled as
    # answers end, every unit written as it finishes; the same rollouts.
    last_rows.clear()
    streamed_db = init_store(tmp_path, model_dir, "streamed.sqlite", **overrides)
    result = run_cli("generate", "--db", streamed_db, "--quiet", "--batch-size", "12")
    assert result.exit_code == 0, result.output
    assert not last_rows, "the fixed-batch path ran instead of continuous batching"
    assert rollouts(streamed_db) == want
    readouts = "SELECT COUNT(*) FROM readouts"
    assert query(streamed_db, readouts) == query(eager_db, readouts) != [(0,)]
    ends = {n for _answer, n, reason, _seed in want.values() if reason == "stop"}
    assert len(ends) >= 2 and max(ends) < 8, "answers must end early, at different lengths"


@pytest.mark.parametrize("compiled", [False, True])
def test_a_run_on_a_gpu_gives_its_memory_back_compiled_or_not(compiled: bool) -> None:
    """The end of every run on a GPU (here its CPU-safe part: emptying an uninitialised CUDA
    cache does nothing): the decoder is dropped, and an uncompiled run must not fail there (an
    `import torch._dynamo` inside the function once made `torch` a local name, unbound when
    nothing was compiled: every uncompiled run on a GPU ended in a traceback)."""
    from patchdb.generate.stage import _release

    class Held:
        _decoder: object | None = object()

    engine: Any = Held()
    _release(engine, torch.device("cuda"), compiled)
    assert engine._decoder is None


def test_the_plan_counts_the_stored_answers_lengths(tmp_path: Path, model_dir: Path) -> None:
    """Paged KV is sized from the lengths of the answers already stored (tokens drawn, the EOS
    included): the plan reads them from the store, for these experiments only."""
    from patchdb.generate.stage import GenerateOptions, plan_generate
    from patchdb.store import open_store

    db = init_store(tmp_path, model_dir)
    assert plan_generate(open_store(str(db)), GenerateOptions()).answer_lengths == {}
    assert run_cli("generate", "--db", db, "--quiet").exit_code == 0
    want: dict[int, int] = {}
    for n_tokens, reason in query(db, "SELECT n_tokens, finish_reason FROM rollouts"):
        drawn = n_tokens + (reason == "stop")
        want[drawn] = want.get(drawn, 0) + 1
    plan = plan_generate(open_store(str(db)), GenerateOptions(max_new_tokens=5))
    assert plan.answer_lengths == want and sum(want.values()) == ALL_ROLLOUTS
    assert not plan.pending
