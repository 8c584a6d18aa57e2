"""The controls on a tiny random-init Llama: the norm-matched random vector (its norm, its seed,
its rollouts injected like the word with no patch) and the unrelated questions' readouts with
the yes-bias index, each checked against values worked out here."""

import hashlib
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_engine import hand_greedy, start_from_offsets
from test_generate_stage import init_store, model_dir, rollouts
from test_pins_seeds import by_recipe
from test_readout import (
    STEER_LAYER,
    STRENGTH,
    hand_logits,
    hand_readout,
    readouts,
)
from tiny_models import tiny_tokenizer

from patchdb.controls import UNRELATED, unrelated_questions
from patchdb.generate.controls import question_trial, random_vector, random_vector_seed

__all__ = ["model_dir"]  # the tiny model fixture, shared with test_generate_stage

RECIPE = "random-direction-at-concept-norm/v1"
# one random-vector unit per target word of each experiment: Bread, Trees | Dust | (none: no
# word, no norm to match) | Bread, Trees
RANDOM_KEYS = {("failure_to_success", "Bread"), ("failure_to_success", "Trees"),
               ("success_to_failure", "Dust"), ("unsteered_to_steered", "Bread"),
               ("unsteered_to_steered", "Trees")}


def test_the_question_list_is_balanced_and_fixed() -> None:
    assert len(UNRELATED) == 20 and len(set(unrelated_questions())) == 20
    assert sum(answer for _, answer in UNRELATED) == 10
    assert all(q.endswith("?") for q in unrelated_questions())
    assert question_trial("Ok, let's get started.\n\nTrial 1: Do you detect it?",
                          "Is ice frozen water?") == (
        "Ok, let's get started.\n\nTrial 1: Is ice frozen water?")
    assert question_trial("Go.\n\nAnswer me: anything?", "Is ten odd?") == "Go.\n\nIs ten odd?"


def test_a_random_vector_has_its_words_norm_and_a_seeded_direction() -> None:
    # the seed: 62 bits of sha256 over the text, worked out here with hashlib
    assert random_vector_seed(38, "Bread") == int.from_bytes(
        hashlib.sha256(b"random_vector/38/Bread").digest()[:8], "big") >> 2
    assert random_vector_seed(38, "Bread") == 1160464431275070829
    concept = torch.arange(64, dtype=torch.float32) - 20.0
    vec = random_vector(38, "Bread", concept)
    assert float(vec.norm()) == pytest.approx(float(concept.norm()), rel=1e-6)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1160464431275070829))
    assert torch.allclose(vec, direction / direction.norm() * concept.norm(), atol=1e-6)
    assert torch.equal(random_vector(38, "Bread", concept), vec)  # the same every time
    other = random_vector(38, "Trees", concept)
    cosine = float(vec @ other / (vec.norm() * other.norm()))
    assert abs(cosine) < 0.5 and abs(float(vec @ concept / (vec.norm() * concept.norm()))) < 0.5


def _vectors(db: Path | str, recipe_like: str) -> dict[str, tuple[torch.Tensor, float]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT word, vector, norm FROM concept_vectors WHERE layer = ? "
                            "AND recipe LIKE ? AND word NOT LIKE '\\_\\_%' ESCAPE '\\'",
                            (STEER_LAYER, recipe_like)).fetchall()
    return {w: (torch.frombuffer(bytearray(v), dtype=torch.float32), n) for w, v, n in rows}


def test_random_vector_units_are_injected_like_the_word_with_no_patch(
        tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir, controls=["random_vector"])  # greedy, 2 samples
    result = run_cli("generate", "--db", db, "--quiet")
    assert result.exit_code == 0, result.output
    # 16 patched units, 6 baselines and 5 random-vector units, 2 samples each
    assert "Wrote 54 rollouts in 27 units (27/27 units present)" in result.output
    got = {k: v for k, v in rollouts(db).items() if k[1] == -2}
    assert {(exp, tgt) for exp, _l, _s, tgt, _i in got} == RANDOM_KEYS
    assert {(src, i) for _e, _l, src, _t, i in got} == {("", 0), ("", 1)}
    for (exp, layer, src, tgt, i), (_a, _n, _r, seed) in got.items():
        assert seed == by_recipe("tiny", exp, layer, src, tgt, i)

    concepts = _vectors(db, "last-token%")
    randoms = _vectors(db, RECIPE)
    assert set(randoms) == {"Bread", "Trees", "Dust"}
    for word, (vec, norm) in randoms.items():
        want = concepts[word][0]
        assert norm == pytest.approx(float(want.norm()), rel=1e-5)
        assert float(vec.norm()) == pytest.approx(float(want.norm()), rel=1e-5)
        g = torch.Generator().manual_seed(int.from_bytes(
            hashlib.sha256(f"random_vector/{STEER_LAYER}/{word}".encode()).digest()[:8],
            "big") >> 2)
        direction = torch.randn(vec.numel(), generator=g)
        assert torch.allclose(vec, direction / direction.norm() * want.norm(), atol=1e-5)

    # each answer is the greedy answer with strength x the random vector at the steer layer,
    # nothing patched, worked out here layer by layer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = tiny_tokenizer()
    with sqlite3.connect(db) as conn:
        prompt, start = conn.execute("SELECT prompt_text, injection_start FROM sweeps").fetchone()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answers = {}
    for word in ("Bread", "Dust"):
        tokens = hand_greedy(model, ids, randoms[word][0] * STRENGTH, STEER_LAYER, start, 5)
        cut = next((k for k, t in enumerate(tokens) if t == tok.eos_token_id), len(tokens))
        answers[word] = tok.decode(tokens[:cut], skip_special_tokens=True)
    word_answer = {(e, t): a for (e, layer, _s, t, _i), (a, *_r) in rollouts(db).items()
                   if layer == -1}
    for (exp, _l, _s, tgt, _i), (answer, *_rest) in got.items():
        if tgt in answers:
            assert answer == answers[tgt], (exp, tgt)
    assert answers["Bread"] != word_answer[("failure_to_success", "Bread")]  # not the word's

    assert {k[:4] for k in readouts(db) if k[1] == -2} == {
        (e, -2, "", t) for e, t in RANDOM_KEYS}
    with sqlite3.connect(db) as conn:
        status = run_cli("status", "--db", db).output
        layer_rates = conn.execute("SELECT DISTINCT patch_layer FROM layer_rates").fetchall()
    assert {layer for (layer,) in layer_rates} <= {2, 3}
    assert "failure_to_success      rand             4/4" in status
    assert "steered_to_unsteered    rand" not in status
    # judged like baselines: their own dry-run row (2 words x 2 samples x 2 graders), in the total
    plan = run_cli("judge", "--db", db, "--dry-run", "--layers", "2").output.splitlines()
    rows = [line.split() for line in plan if line.startswith("  random vector")]
    assert rows == [["random", "vector", "2", "2", "1", "2", "8", "0", "8", "0"],
                    ["random", "vector", "1", "2", "1", "2", "4", "0", "4", "0"],
                    ["random", "vector", "2", "2", "1", "2", "8", "0", "8", "0"]]
    # 8 patched keys x 2 samples at layer 2, 12 baseline and 10 random-vector rollouts, 2 calls each
    assert next(line for line in plan if line.startswith("total")).split()[1] == "76"


def test_unrelated_questions_give_readouts_and_the_yes_bias_index(
        tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir, controls=["unrelated_questions"])
    result = run_cli("generate", "--db", db, "--quiet", "--readout-only")
    assert result.exit_code == 0, result.output
    # 22 units' trial readouts, and 20 questions x (22 units + the no-injection arm of the
    # three experiments whose baselines do not include one)
    assert "Wrote 522 readouts (522/522 present)" in result.output
    got = readouts(db)
    questions = set(unrelated_questions())
    assert {k[4] for k in got} == questions | {""}
    arms = {k[:4] for k in got if k[1] == -1 and k[3] == ""}
    assert {k[0] for k in arms} == {"failure_to_success", "success_to_failure",
                                    "steered_to_unsteered", "unsteered_to_steered"}

    # two of them against plain forwards over the prompt asked by hand
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = tiny_tokenizer()
    with sqlite3.connect(db) as conn:
        intro = conn.execute("SELECT config_json FROM sweeps").fetchone()[0]
        vectors = {w: torch.frombuffer(bytearray(v), dtype=torch.float32) * STRENGTH
                   for w, v in conn.execute("SELECT word, vector FROM concept_vectors "
                                            "WHERE layer = ?", (STEER_LAYER,))}
    import json

    intro = json.loads(intro)["prompt_intro"]
    question = "Do bees make honey?"
    text = tok.apply_chat_template(
        [{"role": "user", "content": intro}, {"role": "assistant", "content": "Ok."},
         {"role": "user", "content": f"Ok, let's get started.\n\nTrial 1: {question}"}],
        tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start = start_from_offsets(tok, text)
    with torch.inference_mode():
        plain = hand_readout(hand_logits(model, ids, start, None))
        record: dict[str, torch.Tensor] = {}
        hand_logits(model, ids, start, vectors["Dust"], 3, record)
        patched = hand_readout(hand_logits(model, ids, start, vectors["Bread"], 3,
                                           {"replace": record["record"]}))
    none = got[("failure_to_success", -1, "", "", question)]
    assert none[:3] == pytest.approx(plain[:3], abs=1e-5) and none[3] == plain[3]
    unit = got[("failure_to_success", 3, "Dust", "Bread", question)]
    assert unit[:3] == pytest.approx(patched[:3], abs=1e-5) and unit[3] == patched[3]

    # the yes-bias index: the mean over questions of P(yes) at the unit less P(yes) with
    # nothing injected, computed here from the table, against the view
    with sqlite3.connect(db) as conn:
        view = {tuple(r[:4]): r[4:] for r in conn.execute(
            "SELECT experiment, patch_layer, source_word, target_word, n_questions, yes_bias "
            "FROM yes_bias")}
    units = {k[:4] for k in got if k[4] == ""} | arms
    assert set(view) == units
    for key in units:
        exp = key[0]
        diffs = [got[(*key, q)][0] - got[(exp, -1, "", "", q)][0] for q in questions]
        n, bias = view[key]
        assert n == 20 and bias == pytest.approx(sum(diffs) / 20, abs=1e-9), key
    assert view[("steered_to_unsteered", -1, "", "")][1] == 0.0
    assert any(abs(b) > 1e-4 for _n, b in view.values())  # injections move P(yes)


# On SmolLM2 both controls are checked in the demo's run (test_demo.py), which turns them on:
# the no-injection readout against a plain forward and the yes-bias index of every unit.
