"""What misled a newcomer about the judge (issue 27): Ctrl-C of the in-process judge keeps every
finished reply, --base-url picks the API judge and --dry-run says which judge it would use,
progress lines off a terminal, and a dry run that does not import torch.

Interrupts are placed with fault points (patchdb/faults.py), never timed; expected replies come
from an uninterrupted run of the same greedy judge on a copy of the store.
"""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import file_digest, run_cli
from judge_server import fault_server, make_store
from tiny_models import save_tiny_llama

FIRST = ("Ctrl-C: no new batches; the batch in flight gets up to {grace} s, then stops at its "
         "next token; every finished reply is saved. Press Ctrl-C again to stop now.")
SECOND = "Ctrl-C again: stopping the batch at its next token; every finished reply is saved."
SAVED = "Interrupted; what finished is saved. Run again to resume."


def hf_store(db: Path, model: str, **sweep: object) -> int:
    """make_store's sweep, its config naming the in-process judge with `model`; the call count
    (two graders a rollout)."""
    n = make_store(db, patch_layers="2", samples=1, experiments=["steered_to_unsteered"], **sweep)
    conn = sqlite3.connect(db)
    try:
        with conn:
            (text,) = conn.execute("SELECT config_json FROM sweeps").fetchone()
            config = json.loads(text)
            config["judge"] = {**config.get("judge", {}), "backend": "hf", "model": model,
                               "batch_size": 2, "max_new_tokens": 12}
            conn.execute("UPDATE sweeps SET config_json = ?",
                         (json.dumps(config, sort_keys=True),))
    finally:
        conn.close()
    return 2 * n


def copy_store(db: Path, copy: Path) -> None:
    """A copy of the store with what its write-ahead log holds (sqlite's backup)."""
    source, target = sqlite3.connect(db), sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def judgments(db: Path) -> dict[tuple[int, str], tuple]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("""SELECT rollout_id, grader, verdict, raw_reply, p_yes, cut_off,
                               completion_tokens FROM judgments""").fetchall()
    return {(r[0], r[1]): r[2:] for r in rows}


def judge_process(db: Path, fault: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATCHDB_FAULT=fault, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "patchdb", "judge", "--db", str(db), "--no-progress", *args],
        capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return save_tiny_llama(tmp_path / "m")


@pytest.fixture
def reference(tmp_path: Path, tiny_model: Path) -> tuple[Path, dict[tuple[int, str], tuple]]:
    """A store of 2 x 5 calls for the tiny model (logprobs verdicts), and every judgment an
    uninterrupted run stores in a copy of it."""
    db = tmp_path / "store.sqlite"
    calls = hf_store(db, str(tiny_model))
    copy = tmp_path / "copy.sqlite"
    copy_store(db, copy)
    whole = run_cli("judge", "--db", copy, "--verdict", "logprobs", "--no-progress")
    assert whole.exit_code == 0, whole.output
    done = judgments(copy)
    assert len(done) == calls
    return db, done


def test_ctrl_c_as_a_batch_ends_keeps_that_batch(reference: tuple[Path, dict]) -> None:
    """Ctrl-C the moment batch 2 has decoded, with no grace: the run still stores batch 2 (its
    replies were finished), makes no third call, exits 130; a rerun completes the rest exactly
    as an uninterrupted run. The old code dropped the batch it was computing P(YES) for."""
    db, done = reference
    proc = judge_process(db, "judge.hf_generated:2:INT", "--verdict", "logprobs", "--grace", "0")
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert FIRST.format(grace=0) in lines and lines[-1] == SAVED
    kept = judgments(db)
    assert len(kept) == 4  # two batches of two
    assert all(kept[key] == done[key] for key in kept)
    again = run_cli("judge", "--db", db, "--verdict", "logprobs", "--no-progress")
    assert again.exit_code == 0, again.output
    assert f"Judged {len(done) - 4} calls" in again.output
    assert judgments(db) == done


def test_second_ctrl_c_stops_the_batch_and_keeps_only_finished_replies(
        reference: tuple[Path, dict]) -> None:
    """A first Ctrl-C at decode step 2 of the first batch waits (a long grace); a second at
    step 4 stops the batch at its next step: exit 130, and whatever is stored is a finished
    reply, identical to the uninterrupted run's (no reply cut short by the stop)."""
    db, done = reference
    proc = judge_process(db, "judge.hf_step:2:INT,judge.hf_step:4:INT", "--verdict",
                         "logprobs", "--grace", "600")
    assert proc.returncode == 130, proc.stderr
    assert FIRST.format(grace=600) in proc.stderr and SECOND in proc.stderr
    kept = judgments(db)
    assert len(kept) <= 2  # at most the first batch's replies that ended before the stop
    assert all(kept[key] == done[key] for key in kept)


def test_abort_stops_an_hf_judge_before_its_next_batch(tiny_model: Path) -> None:
    from patchdb.judge.backend_hf import HfJudge

    judge = HfJudge(str(tiny_model), batch_size=2, max_new_tokens=6)
    first = judge.generate(["Is the sky blue?", "Is grass red?"])
    assert all(r is not None for r in first) and 1 <= judge.steps <= 6
    steps = judge.steps
    judge.abort()
    assert judge.generate(["Is water wet?", "Is fire cold?"]) == [None, None]
    assert judge.steps == steps  # no decode step ran


def test_abort_between_verdict_chunks_keeps_the_chunks_read(tiny_model: Path) -> None:
    """Logprobs mode reads P(YES) 4 replies a pass: aborted before the verdict pass of 6
    finished replies, the first 4 are read (the same values as unaborted), the last 2 are
    None (judged by the next run)."""
    from patchdb.judge.backend_hf import P_YES_CHUNK, HfJudge

    assert P_YES_CHUNK == 4
    judge = HfJudge(str(tiny_model), batch_size=6, max_new_tokens=4, verdict="logprobs")
    prompts = [f"Is {n} even? Answer YES or NO." for n in range(6)]
    replies = judge.generate(prompts)
    assert all(r is not None and r.p_yes is not None for r in replies)
    read = [r.p_yes for r in replies if r is not None]
    for r in replies:
        assert r is not None
        r.p_yes = None
    judge.abort()
    judge._read_p_yes(prompts, replies)
    assert [r is None for r in replies] == [False] * 4 + [True] * 2
    assert [r.p_yes for r in replies[:4] if r is not None] == read[:4]


def test_base_url_selects_the_api_judge(db_path: Path) -> None:
    """The sweep's config names an in-process judge whose model is not on this machine:
    --base-url judges through the API anyway."""
    calls = hf_store(db_path, "./no-such-judge-model")
    with fault_server() as server:
        result = run_cli("judge", "--db", db_path, "--base-url", server.base_url,
                         "--judge-model", "m", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"Judged {calls} calls" in result.output
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT model, backend FROM judge_configs").fetchall() == [
            ("m", "openai")]


@pytest.mark.parametrize(("args", "error"), [
    (("--base-url", "http://127.0.0.1:9/v1"),
     "Error: the API judge (--base-url or --judge-backend openai) needs --judge-model: the "
     "sweep's judge model './no-such-judge-model' is for the in-process judge"),
    (("--base-url", "http://127.0.0.1:9/v1", "--judge-backend", "hf", "--judge-model", "m"),
     "Error: --base-url is for the API judge; --judge-backend hf runs the judge in this "
     "process: give one of them"),
])
def test_base_url_refusals_are_one_line(db_path: Path, args: tuple[str, ...], error: str) -> None:
    hf_store(db_path, "./no-such-judge-model")
    before = file_digest(db_path)
    result = run_cli("judge", "--db", db_path, *args)
    assert result.exit_code == 1
    assert result.output.strip() == error
    assert file_digest(db_path) == before


def test_dry_run_says_which_judge_it_would_use(db_path: Path, tiny_model: Path) -> None:
    hf_store(db_path, str(tiny_model))
    hf = run_cli("judge", "--db", db_path, "--dry-run")
    assert hf.exit_code == 0, hf.output
    assert hf.output.splitlines()[0] == (
        f"Judge: in-process (--judge-backend hf), model {tiny_model.resolve()}, "
        "verdict last-word.")
    api = run_cli("judge", "--db", db_path, "--dry-run", "--judge-model", "q",
                  "--base-url", "http://user:secret@127.0.0.1:9/v1")
    assert api.exit_code == 0, api.output
    assert api.output.splitlines()[0] == (
        "Judge: API at http://127.0.0.1:9 with no key, model q, reasoning medium, "
        "verdict last-word.")
    assert "secret" not in api.output


def test_progress_lines_when_stderr_is_not_a_terminal(db_path: Path) -> None:
    """Off a terminal, a plain line at each 5% of the calls: with --limit 20 one a call, the
    last at 20/20 (100%). --no-progress prints none."""
    make_store(db_path, patch_layers="2", samples=1, experiments=["steered_to_unsteered"])
    make_store(db_path.with_name("big.sqlite"), samples=2)
    big = db_path.with_name("big.sqlite")
    with fault_server() as server:
        shown = run_cli("judge", "--db", big, "--base-url", server.base_url,
                        "--concurrency", "1", "--graders", "coherence", "--limit", "20")
        quiet = run_cli("judge", "--db", db_path, "--base-url", server.base_url,
                        "--no-progress")
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.stderr.splitlines() if line.startswith("judge: ")]
    counts = [line.split()[1] for line in lines]
    assert counts == [f"{k}/20" for k in range(1, 21)]
    assert lines[-1].startswith("judge: 20/20 calls (100%), $")
    assert lines[0].startswith("judge: 1/20 calls (5%), $")
    assert quiet.exit_code == 0 and "judge: " not in quiet.stderr


def test_dry_run_does_not_import_torch(db_path: Path, tiny_model: Path) -> None:
    """The dry run of a store whose judge is in-process loads neither torch nor transformers."""
    hf_store(db_path, str(tiny_model))
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from patchdb.cli import cli\n"
        f"result = CliRunner().invoke(cli, ['judge', '--db', {str(db_path)!r}, '--dry-run'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
