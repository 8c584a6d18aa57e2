"""`patchdb judge --judge-backend hf`: grader prompts through a local model, no network, no key."""

import math
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli
from judge_server import make_store, small_config
from tiny_models import save_tiny_llama


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return save_tiny_llama(tmp_path / "m")


def test_hf_backend_judges_every_rollout(db_path: Path, tiny_model: Path) -> None:
    n = make_store(db_path, patch_layers="2", samples=1,
                   experiments=["steered_to_unsteered", "unsteered_to_steered"])  # 4 rollouts
    result = run_cli("judge", "--db", db_path, "--judge-backend", "hf", "--judge-model",
                     tiny_model, "--judge-batch-size", "4", "--judge-max-new-tokens", "24")
    assert result.exit_code == 0, result.output
    assert f"Judged {2 * n} calls" in result.output
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("""SELECT grader, verdict, raw_reply, error, attempts, cost,
                               prompt_tokens > 100, completion_tokens, cut_off
                               FROM judgments""").fetchall()
        config = conn.execute("SELECT model, reasoning, backend FROM judge_configs").fetchall()
    assert len(rows) == 2 * n
    assert config[0][1:] == ("none", "hf")
    # a random-init model writes garbage: its replies are kept, and mostly have no verdict
    assert all(r[2] is not None and r[3] is None and r[4] == 1 and r[5] == 0.0 for r in rows)
    assert all(r[6] == 1 and 0 <= r[7] <= 24 for r in rows)
    # a reply is cut off exactly when it used all 24 tokens (an end token is not kept)
    assert [r[8] for r in rows] == [int(r[7] == 24) for r in rows]
    unparsed = sum(1 for r in rows if r[1] is None)
    cut_off = sum(1 for r in rows if r[1] is None and r[7] == 24)
    assert unparsed >= n
    status = run_cli("status", "--db", db_path)
    total = [line for line in status.output.splitlines() if line.startswith("total")][0]
    judged_field = total.split()[-4]
    assert judged_field.startswith(f"{2 * n - unparsed}/")  # judged counts parsed verdicts only
    assert total.split()[-3:] == [str(unparsed - cut_off), str(cut_off), "0"]
    again = run_cli("judge", "--db", db_path, "--judge-backend", "hf", "--judge-model",
                    tiny_model)
    assert "Judged 0 calls" in again.output


def test_hf_backend_needs_a_model(db_path: Path) -> None:
    make_store(db_path)
    result = run_cli("judge", "--db", db_path, "--judge-backend", "hf")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: --judge-backend hf needs --judge-model (a path, hub id or alias)")


def p_yes_one_by_one(model_dir: Path, prompt: str, reasoning: str) -> float:
    """P(YES) computed apart from the backend: one unpadded conversation, a full softmax, and
    the token ids of the twelve spellings looked up here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # SmolLM2's tokenizer: YES and " YES" split into "Y"/" Y" + "ES"; the rest are whole tokens
    yes = {tok.encode(s, add_special_tokens=False)[0] for s in
           ("YES", " YES", "Yes", " Yes", "yes", " yes")}
    no = {tok.encode(s, add_special_tokens=False)[0] for s in ("NO", " NO", "No", " No", "no", " no")}
    assert len(yes) == len(no) == 6
    log_odds = []
    for request in ("YES or NO", "NO or YES"):  # asked both ways, log-odds averaged
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": reasoning},
             {"role": "user", "content": f"Give your verdict now in one word: {request}."}],
            tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), dim=0)
        p_yes, p_no = float(probs[list(yes)].sum()), float(probs[list(no)].sum())
        log_odds.append(math.log(p_yes / p_no))
    return 1 / (1 + math.exp(-sum(log_odds) / 2))


def test_hf_logprobs_mode_reads_a_verdict_from_every_reply(db_path: Path, tiny_model: Path) -> None:
    make_store(db_path, patch_layers="2", samples=1,
               experiments=["steered_to_unsteered", "unsteered_to_steered"])  # 4 rollouts
    result = run_cli("judge", "--db", db_path, "--judge-backend", "hf", "--judge-model",
                     tiny_model, "--judge-batch-size", "3", "--judge-max-new-tokens", "12",
                     "--verdict", "logprobs")
    assert result.exit_code == 0, result.output
    assert "0 unparsed, 0 errors" in result.output
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("""SELECT j.verdict, j.p_yes, j.raw_reply, j.cut_off, r.answer,
                               j.grader, r.target_word, r.source_word FROM judgments j
                               JOIN rollouts r ON r.id = j.rollout_id ORDER BY j.id""").fetchall()
        modes = conn.execute("SELECT verdict_mode FROM judge_configs").fetchall()
    assert modes == [("logprobs",)] and len(rows) == 8
    assert all(0 < r[1] < 1 and r[0] == int(r[1] > 0.5) for r in rows)
    # batches of 3 with left padding give what one unpadded conversation gives
    from patchdb.judge.templates import DEFAULT_TEMPLATES

    question = small_config().prompt_trial
    for _verdict, p_yes, raw, _cut, answer, grader, target, source in rows[:3]:
        prompt = DEFAULT_TEMPLATES.render(grader, question, answer, target or source)
        assert p_yes == pytest.approx(p_yes_one_by_one(tiny_model, prompt, raw), abs=1e-4)
    status = run_cli("status", "--db", db_path)
    total = [line for line in status.output.splitlines() if line.startswith("total")][0]
    # every verdict parsed, none cut off; status also expects 3 baselines x 1 sample x 2 graders
    assert total.split()[-4:] == ["8/14", "0", "0", "0"]
