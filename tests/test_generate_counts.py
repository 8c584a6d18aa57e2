"""What `generate` says it wrote is what it wrote, on SQLite and PostgreSQL, also when another
process wrote part of a unit while this one decoded it (psycopg reports a rowcount of -1 for
INSERT ... ON CONFLICT, which printed "Wrote -6 rollouts").

The tiny sweep of test_generate_stage: 22 units of 2 samples, 44 rollouts.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import run_cli
from pg import execute, query
from test_generate_stage import (  # noqa: F401  (model_dir is a fixture)
    ALL_ROLLOUTS,
    init_store,
    model_dir,
    rollouts,
    wait_until_stopped,
)


def test_the_written_count_is_the_rows_written(tmp_path: Path, model_dir: Path,  # noqa: F811
                                               store_db: str) -> None:
    db = init_store(tmp_path, model_dir, db=store_db)
    first = run_cli("generate", "--db", db, "--quiet", "--layers", "3")
    assert first.exit_code == 0, first.output
    # layer 3: 8 keys; the baselines: 6 target conditions; 2 samples each
    assert "Wrote 28 rollouts in 14 units (14/14 units present)" in first.output, first.output
    execute(db, "DELETE FROM rollouts WHERE patch_layer = 3 AND sample_index = 1", {})
    second = run_cli("generate", "--db", db, "--quiet")
    assert second.exit_code == 0, second.output
    # layer 2 whole (8 units, 16 rollouts) and layer 3's 8 second samples
    assert "Wrote 24 rollouts in 16 units (22/22 units present)" in second.output, second.output
    assert len(rollouts(db)) == ALL_ROLLOUTS


def test_samples_another_process_wrote_meanwhile_are_kept_and_not_counted(
        tmp_path: Path, model_dir: Path, store_db: str) -> None:  # noqa: F811
    """The run stops itself after decoding its first batch; meanwhile another run writes the
    first sample of every unit. Each unit then gets only its second sample from this run."""
    other = init_store(tmp_path, model_dir, name="other.sqlite")
    assert run_cli("generate", "--db", other, "--quiet").exit_code == 0
    db = init_store(tmp_path, model_dir, db=store_db)
    env = dict(os.environ, PATCHDB_FAULT="generate.batch_decoded:1:STOP")
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchdb", "generate", "--db", str(db), "--batch-size", "2",
         "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until_stopped(proc.pid)
        ids = dict(query(db, "SELECT name, id FROM experiments"))
        execute(db, "INSERT INTO rollouts (experiment_id, patch_layer, source_word, target_word, "
                "sample_index, answer, n_tokens, finish_reason, seed, created_at) VALUES (:e, :l, "
                ":s, :t, :i, :a, :n, :f, :seed, CURRENT_TIMESTAMP)",
                [dict(e=ids[exp], l=layer, s=src, t=tgt, i=i, a=f"elsewhere: {answer}", n=n,
                      f=reason, seed=seed)
                 for (exp, layer, src, tgt, i), (answer, n, reason, seed) in
                 rollouts(other).items() if i == 0])
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "Wrote 22 rollouts in 22 units (22/22 units present)" in out, out
    got = rollouts(db)
    assert len(got) == ALL_ROLLOUTS
    assert all(answer.startswith("elsewhere: ") == (key[4] == 0)
               for key, (answer, *_) in got.items())
    assert query(db, "SELECT COUNT(*) FROM rollouts WHERE stage_run_id IS NOT NULL") == [(22,)]
