"""The readouts and `patchdb verify` on CUDA (marked gpu; run with scripts/test_gpu.sh): a sweep
with both controls, generated on the GPU (compiled, rollouts and readouts) and read out on the
CPU (`--readout-only`), gives the same readouts key for key; verify passes every check on CUDA."""

import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_gpu import real_shape_model
from tiny_models import tiny_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = """
[sweep]
name = "r"
model = "./m"
dtype = "float32"
steer_layer = 1
patch_layers = "2,3"
samples = 2
max_new_tokens = 8
temperature = 0
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
controls = ["random_vector", "unrelated_questions"]
"""


def readouts(db: Path) -> dict[tuple[object, ...], tuple[float, float, float]]:
    with sqlite3.connect(db) as conn:
        return {tuple(r[:5]): tuple(r[5:]) for r in conn.execute(
            "SELECT experiment_id, patch_layer, source_word, target_word, question, p_yes, "
            "p_no, entropy FROM readouts")}


def test_cuda_readouts_equal_the_cpu_readout_pass_and_verify_passes(db_path: Path) -> None:
    real_shape_model("cpu").save_pretrained("m")
    tiny_tokenizer().save_pretrained("m")
    Path("r.toml").write_text(CONFIG)
    assert run_cli("init", "--config", "r.toml", "--db", db_path).exit_code == 0
    cpu = db_path.with_name("cpu.sqlite")
    cpu.write_bytes(db_path.read_bytes())

    on_gpu = run_cli("generate", "--db", db_path, "--device", "cuda:0", "--compile", "--quiet")
    assert on_gpu.exit_code == 0, on_gpu.output
    # 16 patched units, 6 baselines, 5 random-vector units; 20 questions x (27 units + 3 arms)
    assert "Wrote 54 rollouts in 27 units" in on_gpu.output
    assert "Wrote 627 readouts (627/627 present)" in on_gpu.output
    on_cpu = run_cli("generate", "--db", cpu, "--device", "cpu", "--readout-only", "--quiet")
    assert on_cpu.exit_code == 0, on_cpu.output
    got, want = readouts(db_path), readouts(cpu)
    assert got.keys() == want.keys() and len(got) == 627
    for key, values in got.items():
        assert values == pytest.approx(want[key], abs=2e-4, rel=1e-4), key

    checked = run_cli("verify", "--db", db_path, "--device", "cuda:0", "--tokens", "12")
    assert checked.exit_code == 0, checked.output
    assert "5 checks: 5 passed, 0 skipped, 0 failed" in checked.output
    assert "CUDA graphs, compiled against eager" in checked.output
