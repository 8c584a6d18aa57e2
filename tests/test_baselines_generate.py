"""Baselines through `patchdb generate` on a tiny random-init Llama: one unit per target
condition at patch layer -1, no patch applied (checked against a forward written out by hand
with only the steering), the same seeds rule, --no-baselines, and resume after a kill."""

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import torch
from conftest import run_cli
from test_engine import hand_greedy
from test_generate_stage import init_store, model_dir, rollouts
from test_pins_seeds import by_recipe
from tiny_models import tiny_tokenizer

__all__ = ["model_dir"]  # the tiny model fixture, shared with test_generate_stage

STEER_LAYER, STRENGTH, N_NEW = 1, 4.0, 5
# one baseline per target condition of each experiment: Bread, Trees | Dust | none | Bread, Trees
BASELINE_KEYS = {
    ("failure_to_success", "Bread"), ("failure_to_success", "Trees"),
    ("success_to_failure", "Dust"), ("steered_to_unsteered", ""),
    ("unsteered_to_steered", "Bread"), ("unsteered_to_steered", "Trees"),
}


def baselines(db: Path) -> dict[tuple[str, str, int], tuple[str, int, str, int]]:
    return {(exp, tgt, i): value for (exp, layer, src, tgt, i), value in rollouts(db).items()
            if layer == -1 and src == ""}


def test_generate_writes_one_unpatched_unit_per_target_condition(tmp_path: Path,
                                                                  model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)  # greedy, 2 samples, 5 new tokens
    result = run_cli("generate", "--db", db, "--quiet")
    assert result.exit_code == 0, result.output
    got = baselines(db)
    assert {(exp, tgt) for exp, tgt, _ in got} == BASELINE_KEYS
    assert {i for _, _, i in got} == {0, 1}
    assert len([k for k in rollouts(db) if k[1] == -1]) == len(got) == 12
    for (exp, tgt, i), (_answer, _n, _reason, seed) in got.items():
        assert seed == by_recipe("tiny", exp, -1, "", tgt, i)

    # No patch: each answer is the greedy answer of the prompt with the target's steering
    # alone, computed here layer by layer with no hooks.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = tiny_tokenizer()
    with sqlite3.connect(db) as conn:
        prompt, start = conn.execute("SELECT prompt_text, injection_start FROM sweeps").fetchone()
        stored = {w: torch.frombuffer(bytearray(v), dtype=torch.float32)
                  for w, v in conn.execute("SELECT word, vector FROM concept_vectors "
                                           "WHERE layer = ?", (STEER_LAYER,))}
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    eos = {tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    answers = {}
    for word in ("Bread", "Trees", "Dust", ""):
        vec = stored[word] * STRENGTH if word else torch.zeros(model.config.hidden_size)
        tokens = hand_greedy(model, ids, vec, STEER_LAYER, start, N_NEW)
        cut = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
        answers[word] = tok.decode(tokens[:cut], skip_special_tokens=True)
    assert len(set(answers.values())) > 1  # the steering shows in the answers
    for (exp, tgt, _i), (answer, _n, _reason, _seed) in got.items():
        assert answer == answers[tgt], (exp, tgt)


def test_no_baselines_skips_them_and_a_later_run_adds_only_them(tmp_path: Path,
                                                                 model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)
    first = run_cli("generate", "--db", db, "--quiet", "--no-baselines")
    assert first.exit_code == 0, first.output
    assert "Wrote 32 rollouts in 16 units (16/16 units present)" in first.output
    assert baselines(db) == {}
    patched = rollouts(db)
    second = run_cli("generate", "--db", db, "--quiet")
    assert second.exit_code == 0, second.output
    assert "Wrote 12 rollouts in 6 units (22/22 units present)" in second.output
    after = rollouts(db)
    assert {k: v for k, v in after.items() if k[1] != -1} == patched
    assert {(exp, tgt) for exp, tgt, _ in baselines(db)} == BASELINE_KEYS


def test_words_narrow_the_baselines_but_keep_the_control(tmp_path: Path,
                                                          model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)
    result = run_cli("generate", "--db", db, "--quiet", "--words", "Dust", "--layers", "2")
    assert result.exit_code == 0, result.output
    assert {(exp, tgt) for exp, tgt, _ in baselines(db)} == {("success_to_failure", "Dust"),
                                                               ("steered_to_unsteered", "")}


def test_a_killed_run_resumes_to_the_same_baselines(tmp_path: Path, model_dir: Path) -> None:
    whole = init_store(tmp_path, model_dir, name="whole.sqlite")
    assert run_cli("generate", "--db", whole, "--quiet").exit_code == 0
    db = init_store(tmp_path, model_dir, name="killed.sqlite")
    # SIGKILL right after the third unit is written (the baselines come first)
    env = dict(os.environ, PATCHDB_FAULT="generate.unit_written:3")
    proc = subprocess.run(
        [sys.executable, "-m", "patchdb", "generate", "--db", str(db), "--batch-size", "2",
         "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = rollouts(db)
    assert len(partial) == 3 * 2 and {k[1] for k in partial} == {-1}
    result = run_cli("generate", "--db", db, "--quiet")
    assert result.exit_code == 0, result.output
    assert "Wrote 38 rollouts in 19 units (22/22 units present)" in result.output
    assert rollouts(db) == rollouts(whole)
