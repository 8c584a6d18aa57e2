"""Ctrl-C as a user gives it, at exact places: the process under test sends itself SIGINT, or
stops itself (SIGSTOP) at a named point so the test can send the signal while it waits there
(patchdb/faults.py). Nothing is timed: every count below is exact.

The first Ctrl-C says at once that the stage stops after the current batch and that a second
Ctrl-C stops now; a second one stops now and keeps every finished unit; `patchdb sweep` stops
with exit 130 and runs no later stage.
"""

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from judge_server import fault_server, make_store
from test_generate_stage import init_store, model_dir  # noqa: F401  (fixture)

FIRST = ("Ctrl-C: stopping after the current batch; every finished unit is kept. "
         "Press Ctrl-C again to stop now.")
SECOND = "Ctrl-C again: stopping now; the batch in progress is dropped."
SAVED = "Interrupted: every finished unit is saved; run again to resume."
SAMPLES = 2  # init_store's sweep: 16 units and 6 baselines of 2 samples
# Ctrl-C just before batch 2 decodes, then a stop at the start of step 3 of its 6 decode steps
# (batch 1 passes decode_step 6 times).
STOP_IN_BATCH_2 = "generate.batch_started:2:INT,generate.decode_step:9:STOP"


def generate(db: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "patchdb", "generate", "--db", str(db), "--quiet", *args]


def env_with(fault: str) -> dict[str, str]:
    return dict(os.environ, PATCHDB_FAULT=fault, PYTHONUNBUFFERED="1")


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db, timeout=60) as conn:
        return conn.execute(sql).fetchall()


def units_present(db: Path) -> int:
    sizes = query(db, """SELECT count(*) FROM rollouts
        GROUP BY experiment_id, patch_layer, source_word, target_word""")
    assert {n for (n,) in sizes} <= {SAMPLES}  # whole units only
    return len(sizes)


def wait_until_stopped(proc: subprocess.Popen[str], err: Path) -> None:
    """Block until the child has stopped itself at its fault point (no polling, no sleep)."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), (status, err.read_text())


@contextmanager
def stopping_generate(db: Path, err: Path, fault: str) -> Iterator[subprocess.Popen[str]]:
    """`generate --batch-size 4` (two units a batch) with stderr in a file; killed if the test
    fails while it is stopped."""
    with err.open("w") as stderr:
        proc = subprocess.Popen(generate(db, "--batch-size", "4"), stdout=subprocess.DEVNULL,
                                stderr=stderr, text=True, env=env_with(fault))
        try:
            yield proc
        finally:
            if proc.poll() is None and proc.returncode is None:
                proc.kill()
            proc.wait(timeout=300)


def test_first_ctrl_c_says_so_at_once_and_the_batch_is_finished(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    """Ctrl-C arrives before batch 2 decodes (two units a batch): the message is on stderr while
    batch 2 is still decoding, batch 2 is finished and written, then the run stops (exit 130)."""
    db = init_store(tmp_path, model_dir, max_new_tokens=6)
    err = tmp_path / "stderr.txt"
    with stopping_generate(db, err, STOP_IN_BATCH_2) as proc:
        wait_until_stopped(proc, err)
        assert FIRST in err.read_text()
        assert units_present(db) == 2  # batch 1 only: batch 2 is still decoding
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=300)
    text = err.read_text()
    assert proc.returncode == 130, text
    assert units_present(db) == 4
    assert SECOND not in text and text.strip().splitlines()[-1] == SAVED
    assert query(db, "SELECT status FROM stage_runs") == [("interrupted",)]


def test_a_second_ctrl_c_stops_the_decode_now_and_keeps_finished_units(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    """First Ctrl-C before batch 2 decodes, the second in the middle of that decode: batch 2 is
    dropped, batch 1's units stay, and a rerun fills the rest."""
    db = init_store(tmp_path, model_dir, max_new_tokens=6)
    err = tmp_path / "stderr.txt"
    with stopping_generate(db, err, STOP_IN_BATCH_2) as proc:
        wait_until_stopped(proc, err)
        assert FIRST in err.read_text() and SECOND not in err.read_text()
        os.kill(proc.pid, signal.SIGINT)  # pending until the process runs again
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=300)
    text = err.read_text()
    assert proc.returncode == 130, text
    assert SECOND in text and "Traceback" not in text and text.strip().splitlines()[-1] == SAVED
    assert units_present(db) == 2
    assert query(db, "SELECT status FROM stage_runs") == [("interrupted",)]
    rerun = subprocess.run(generate(db), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert units_present(db) == 22


def test_a_second_ctrl_c_while_units_are_written_keeps_the_whole_batch(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    """Both Ctrl-Cs come after batch 1 decoded (two units): the second, right after the first
    unit's commit, still lets the second finished unit be written before stopping."""
    db = init_store(tmp_path, model_dir)
    proc = subprocess.run(
        generate(db, "--batch-size", "4"), capture_output=True, text=True, timeout=300,
        env=env_with("generate.batch_decoded:1:INT,generate.unit_written:1:INT"))
    assert proc.returncode == 130, proc.stderr
    assert FIRST in proc.stderr and SECOND in proc.stderr
    assert units_present(db) == 2


def test_judge_says_at_once_what_ctrl_c_does(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    n = make_store(db)
    with fault_server() as server:
        proc = subprocess.run(
            [sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--base-url",
             server.base_url, "--concurrency", "1", "--no-progress"],
            capture_output=True, text=True, timeout=120, env=env_with("judge.reply:3:INT"))
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == ("Ctrl-C: no new calls; waiting up to 10 s for the calls in flight, and "
                        "what finished is saved. Press Ctrl-C again to stop now.")
    assert lines[-1] == "Interrupted; what finished is saved. Run again to resume."
    saved = query(db, "SELECT count(*) FROM judgments")[0][0]
    assert 3 <= saved < 2 * n


def sweep_toml(path: Path, model: Path, base_url: str | None) -> Path:
    """The tiny sweep; base_url None leaves the default remote judge (OpenRouter)."""
    url = "" if base_url is None else f'base_url = "{base_url}"\n'
    path.write_text(f"""[sweep]
name = "tiny"
model = "{model}"
dtype = "float32"
steer_layer = 1
patch_layers = "2-3"
samples = 2
max_new_tokens = 4
temperature = 0.0
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]

[judge]
{url}concurrency = 2
""")
    return path


def test_ctrl_c_during_generate_stops_the_sweep(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    """A remote judge follows generate in a second process: Ctrl-C in generate stops the sweep
    with exit 130 and the reason, stops the follower, and neither the sweep's own judge pass nor
    the report runs."""
    db = tmp_path / "store.sqlite"
    with fault_server() as server:
        config = sweep_toml(tmp_path / "sweep.toml", model_dir, server.base_url)
        proc = subprocess.Popen(
            [sys.executable, "-m", "patchdb", "sweep", "--config", str(config), "--db", str(db),
             "--out", str(tmp_path / "report")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env_with("generate.unit_written:1:INT"))
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert FIRST in stderr and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "Interrupted during generate: what finished is saved and no later stage ran; run "
        "`patchdb sweep` again to resume.")
    assert not (tmp_path / "report").exists()
    runs = query(db, "SELECT stage, status, pid FROM stage_runs ORDER BY id")
    # the sweep's own process ran generate only; a judge run, if any, is the follower's
    assert [(stage, status) for stage, status, pid in runs if pid == proc.pid] == [
        ("generate", "interrupted")]
    assert all(status in ("interrupted", "finished") for _, status, _ in runs), runs


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failing_generate_is_the_error_a_sweep_reports(
    tmp_path: Path, model_dir: Path  # noqa: F811
) -> None:
    """Generate fails (a CUDA device on a machine without one) while the judge beside it fails
    too (no API key for the default remote judge, and rollouts to judge): the user is told the
    first cause, not the follower's exit code."""
    db = tmp_path / "store.sqlite"
    config = sweep_toml(tmp_path / "sweep.toml", model_dir, None)
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    assert run_cli("generate", "--db", db, "--layers", "2", "--quiet").exit_code == 0
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENROUTER_API_KEY", "OPENAI_API_KEY") and not k.startswith("PATCHDB_")}
    proc = subprocess.run(
        [sys.executable, "-m", "patchdb", "sweep", "--config", str(config), "--db", str(db),
         "--device", "cuda:0"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: device 'cuda:0' asked for, but CUDA is not available")
