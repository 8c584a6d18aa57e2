"""The GPU set, through the stage: `patchdb generate` on CUDA (graphed decode, Triton attention,
shared prefix, compiled) over a two-strength dose series with its baselines writes every unit a
hand count expects, and at temperature 0 the same answers, key for key, as the eager decode on
the CPU (a second, independent computation). With two GPUs, `--gpus 2` (one process per card,
each taking a disjoint share) over the same series writes the same rows again. Skipped without
CUDA."""

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

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
name = "g"
model = "./m"
dtype = "float32"
steer_layer = 1
strength = [4.0, 8.0]
patch_layers = "2,3"
samples = 2
max_new_tokens = 12
temperature = 0
positive_words = ["Bread", "Trees"]
negative_words = ["Dust", "Milk"]
"""

# Units per sweep, counted by hand: (experiment, baseline?) -> units. Two positive words P and
# two negative words N, two patch layers; a baseline is one unit per target condition.
UNITS = {
    ("failure_to_success", False): 2 * 2 * 2,  # N sources x P targets x layers
    ("success_to_failure", False): 2 * 2 * 2,
    ("steered_to_unsteered", False): 2 * 2,  # P sources x layers, target unsteered
    ("unsteered_to_steered", False): 2 * 2,  # P targets x layers, source unsteered
    ("failure_to_success", True): 2,  # the P targets, unpatched
    ("success_to_failure", True): 2,
    ("steered_to_unsteered", True): 1,  # no steering: the no-injection control
    ("unsteered_to_steered", True): 2,
}
SAMPLES = 2


def answers(db: Path) -> dict[tuple[Any, ...], str]:
    with sqlite3.connect(db) as conn:
        return {tuple(key): answer for *key, answer in conn.execute("""
            SELECT s.name, e.name, r.patch_layer, r.source_word, r.target_word, r.sample_index,
                   r.answer
            FROM rollouts r JOIN experiments e ON e.id = r.experiment_id
            JOIN sweeps s ON s.id = e.sweep_id""")}


@pytest.fixture
def series(db_path: Path) -> Path:
    model = real_shape_model("cpu")
    model.save_pretrained("m")
    tiny_tokenizer().save_pretrained("m")
    Path("g.toml").write_text(CONFIG)
    result = run_cli("init", "--config", "g.toml", "--db", db_path)
    assert result.exit_code == 0, result.output
    return db_path


def test_cuda_stage_writes_every_unit_and_the_cpu_eager_answers(series: Path) -> None:
    cpu, cuda = series.with_name("cpu.sqlite"), series.with_name("cuda.sqlite")
    shutil.copy(series, cpu)
    shutil.copy(series, cuda)
    on_gpu = run_cli("generate", "--db", cuda, "--sweep", "g-*", "--device", "cuda:0",
                     "--compile", "--quiet")
    assert on_gpu.exit_code == 0, on_gpu.output
    on_cpu = run_cli("generate", "--db", cpu, "--sweep", "g-*", "--device", "cpu", "--quiet")
    assert on_cpu.exit_code == 0, on_cpu.output

    got = answers(cuda)
    counts: dict[tuple[str, str, bool], int] = {}
    for sweep, experiment, layer, *_ in got:
        key = (sweep, experiment, layer == -1)
        counts[key] = counts.get(key, 0) + 1
    assert counts == {(s, e, b): n * SAMPLES for s in ("g-strength4", "g-strength8")
                      for (e, b), n in UNITS.items()}
    assert len(set(got.values())) > 10, "the answers are nearly all alike"
    assert got == answers(cpu)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_over_a_series_write_the_one_gpu_rows(series: Path) -> None:
    one, two = series.with_name("one.sqlite"), series.with_name("two.sqlite")
    shutil.copy(series, one)
    shutil.copy(series, two)
    assert run_cli("generate", "--db", one, "--sweep", "g-*", "--device", "cuda:0",
                   "--quiet").exit_code == 0
    done = subprocess.run([sys.executable, "-m", "patchdb", "generate", "--db", str(two),
                           "--sweep", "g-*", "--gpus", "2", "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert answers(two) == answers(one)
