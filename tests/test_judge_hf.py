"""`patchdb judge --judge-backend hf`: grader prompts through a local model, no network, no key."""

import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli
from judge_server import make_store
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
                               prompt_tokens > 100, completion_tokens FROM judgments""").fetchall()
        config = conn.execute("SELECT model, reasoning, backend FROM judge_configs").fetchall()
    assert len(rows) == 2 * n
    assert config[0][1:] == ("none", "hf")
    # a random-init model writes garbage: its replies are kept, and mostly have no verdict
    assert all(r[2] is not None and r[3] is None and r[4] == 1 and r[5] == 0.0 for r in rows)
    assert all(r[6] == 1 and 0 <= r[7] <= 24 for r in rows)
    unparsed = sum(1 for r in rows if r[1] is None)
    assert unparsed >= n
    status = run_cli("status", "--db", db_path)
    total = [line for line in status.output.splitlines() if line.startswith("total")][0]
    judged_field = total.split()[-3]
    assert judged_field.startswith(f"{2 * n - unparsed}/")  # judged counts parsed verdicts only
    assert total.split()[-2:] == [str(unparsed), "0"]
    again = run_cli("judge", "--db", db_path, "--judge-backend", "hf", "--judge-model",
                    tiny_model)
    assert "Judged 0 calls" in again.output


def test_hf_backend_needs_a_model(db_path: Path) -> None:
    make_store(db_path)
    result = run_cli("judge", "--db", db_path, "--judge-backend", "hf")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: --judge-backend hf needs --judge-model (a path, hub id or alias)")
