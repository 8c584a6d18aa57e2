"""Run history and run-level checks: stage_runs grows only for runs that did something, and
`generate --gpus` refuses a machine without the GPUs it asks for."""

import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import file_digest, run_cli
from judge_server import fault_server
from test_generate_stage import init_store, model_dir  # noqa: F401  (fixture)


def stage_runs(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT stage, status FROM stage_runs ORDER BY id").fetchall()


def test_a_rerun_with_nothing_to_do_adds_no_stage_run(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    db = init_store(tmp_path, model_dir, patch_layers="2", samples=1, max_new_tokens=2)
    first = run_cli("generate", "--db", db, "--quiet")
    assert first.exit_code == 0, first.output
    assert stage_runs(db) == [("generate", "finished")]
    again = run_cli("generate", "--db", db, "--quiet")
    assert again.exit_code == 0 and "Nothing to generate" in again.output
    assert stage_runs(db) == [("generate", "finished")]

    with fault_server() as server:
        judge = ["judge", "--db", db, "--base-url", server.base_url, "--no-progress"]
        assert run_cli(*judge).exit_code == 0
        assert server.stats.requests == 16  # 8 keys x 1 layer x 1 sample, two graders each
        idle = run_cli(*judge)
    assert idle.exit_code == 0 and "nothing to judge" in idle.output
    assert stage_runs(db) == [("generate", "finished"), ("judge", "finished")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpus_without_cuda_is_refused_in_one_line(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    db = init_store(tmp_path, model_dir)
    before = file_digest(db)
    result = run_cli("generate", "--db", db, "--gpus", "2")
    assert result.exit_code == 1
    assert result.output == ("Error: --gpus 2 needs CUDA GPUs, but CUDA is not available here; "
                             "run without --gpus to generate on the CPU\n")
    assert file_digest(db) == before
    assert stage_runs(db) == []
