"""Several processes under torchrun split the missing units disjointly (here on the CPU)."""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_generate_stage import init_store, model_dir  # noqa: F401  (fixture)

from patchdb.generate.distributed import rank_options, torchrun_command
from patchdb.generate.stage import GenerateOptions, in_shard
from patchdb.store.sweeps import ExpectedUnit


def _units() -> list[ExpectedUnit]:
    return [ExpectedUnit("failure_to_success", 1, layer, s, t)
            for layer in range(40, 61) for s in ("Dust", "Milk", "Rubber") for t in ("Bread", "Trees")]


@pytest.mark.parametrize("shard", [None, (1, 3)])
def test_ranks_split_a_shard_disjointly_and_completely(
    shard: tuple[int, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = 4
    taken: list[set[ExpectedUnit]] = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        options = rank_options(GenerateOptions(shard=shard, device="cpu"))
        taken.append({u for u in _units() if in_shard(u, options.shard)})
    union = set().union(*taken)
    assert sum(len(t) for t in taken) == len(union)  # disjoint
    assert union == {u for u in _units() if in_shard(u, shard)}  # exactly the shard's units


def test_without_torchrun_options_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    options = GenerateOptions(shard=(0, 2))
    assert rank_options(options) is options


def test_gpus_flag_becomes_a_torchrun_command() -> None:
    cmd = torchrun_command(2, ["generate", "--gpus", "2", "--layers", "40-44", "--gpus=2"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in cmd
    assert cmd[-4:] == ["patchdb", "generate", "--layers", "40-44"]


def test_two_processes_under_torchrun_fill_the_sweep_once(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    db = init_store(tmp_path, model_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "patchdb", "generate", "--db", str(db), "--gpus", "2",
         "--device", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    con = sqlite3.connect(db)
    # 2 + 2 pair keys, 2 + 2 single-word keys; 2 layers, 2 samples; and 6 baselines
    assert con.execute("SELECT count(*) FROM rollouts").fetchone()[0] == 8 * 2 * 2 + 6 * 2
    runs = con.execute("SELECT pid, status FROM stage_runs WHERE stage = 'generate'").fetchall()
    assert len(runs) == 2 and len({pid for pid, _ in runs}) == 2
    assert all(status == "finished" for _, status in runs)
    made_by = con.execute(
        "SELECT count(DISTINCT stage_run_id) FROM rollouts").fetchone()[0]
    assert made_by == 2


def test_model_copies_spread_over_cards_take_consecutive_groups() -> None:
    from patchdb.generate.distributed import rank_device

    assert [rank_device(r, 1, True) for r in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [rank_device(r, 2, True) for r in range(3)] == ["cuda:0", "cuda:2", "cuda:4"]
    assert rank_device(1, 2, False) == "cpu"
    cmd = torchrun_command(4, ["generate", "--gpus", "4", "--gpus-per-model", "2"], 2)
    assert "--nproc-per-node=2" in cmd and cmd[-3:] == ["generate", "--gpus-per-model", "2"]


NO_CUDA = [] if torch.cuda.is_available() else [
    # checked before the process makes the card its own
    (["--device", "cuda:0"], "device 'cuda:0' asked for, but CUDA is not available"),
]


@pytest.mark.parametrize("args,message", [
    (["--gpus", "3", "--gpus-per-model", "2"], "--gpus 3 is not a multiple of --gpus-per-model 2"),
    (["--gpus-per-model", "2", "--device", "cpu"], "--gpus-per-model 2 needs CUDA GPUs"),
    *NO_CUDA,
])
def test_bad_gpu_choices_are_one_line_and_leave_the_store_alone(
    tmp_path: Path, model_dir: Path, args: list[str], message: str  # noqa: F811
) -> None:
    db = init_store(tmp_path, model_dir)
    before = db.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "patchdb", "generate", "--db", str(db), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert db.read_bytes() == before
