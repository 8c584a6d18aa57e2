"""Generate, two judges and report on one store at once, as real processes, on SQLite and on
PostgreSQL (where one is available; tests/pg.py).

No "database is locked" reaches the user, no row is lost and none is written twice.
"""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from judge_server import FaultServer, fault_server
from pg import query
from tiny_models import save_tiny_llama

ROLLOUTS = 44  # (4 experiments x 2 keys x 2 patch layers + 6 baselines) x 2 samples
GRADERS_PER_ROLLOUT = 2  # coherence and the experiment's detection grader


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server(latency_s=0.01) as srv:
        yield srv


def test_generate_two_judges_and_report_at_once(tmp_path: Path, server: FaultServer,
                                                store_db: str) -> None:
    model = save_tiny_llama(tmp_path / "m")
    config = tmp_path / "sweep.toml"
    config.write_text(f"""[sweep]
name = "tiny"
model = "{model}"
dtype = "float32"
steer_layer = 1
patch_layers = "2-3"
samples = 2
max_new_tokens = 4
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
""")
    db = store_db
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHDB_JUDGE")}
    env.update(PATCHDB_DB=str(db), PATCHDB_JUDGE_BASE_URL=server.base_url,
               PATCHDB_JUDGE_API_KEY="sk-test", PATCHDB_JUDGE_POLL="0.2",
               PATCHDB_JUDGE_PROGRESS="0")
    patchdb = [sys.executable, "-m", "patchdb"]

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*patchdb, *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    generate = start("generate", "--quiet", "--batch-size", "2")
    deadline = time.monotonic() + 120
    while not query(db, "SELECT 1 FROM stage_runs WHERE stage = 'generate'"):
        assert generate.poll() is None, generate.communicate()
        assert time.monotonic() < deadline, "generate did not start"
        time.sleep(0.05)
    judges = [start("judge", "--follow", "--concurrency", "4") for _ in range(2)]
    reports: list[subprocess.CompletedProcess[str]] = []
    while generate.poll() is None or any(j.poll() is None for j in judges):
        reports.append(subprocess.run([*patchdb, "report", "--out", str(tmp_path / "report")],
                                      env=env, text=True, capture_output=True, timeout=120))
    outputs = {"generate": generate.communicate(timeout=60)}
    outputs.update({f"judge {i}": j.communicate(timeout=60) for i, j in enumerate(judges)})
    outputs.update({f"report {i}": (r.stdout, r.stderr) for i, r in enumerate(reports)})

    assert [p.returncode for p in (generate, *judges)] == [0, 0, 0], outputs
    assert reports and all(r.returncode == 0 for r in reports), outputs
    for name, (stdout, stderr) in outputs.items():
        assert "locked" not in (stdout + stderr).lower(), (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)

    assert query(db, "SELECT count(*) FROM rollouts") == [(ROLLOUTS,)]
    assert query(db, """SELECT count(*) FROM (SELECT experiment_id, patch_layer, source_word,
        target_word, sample_index FROM rollouts GROUP BY 1, 2, 3, 4, 5 HAVING count(*) > 1) AS d""") == [(0,)]
    assert query(db, "SELECT count(*) FROM judgments") == [(ROLLOUTS * GRADERS_PER_ROLLOUT,)]
    assert query(db, """SELECT count(*) FROM (SELECT rollout_id, grader, judge_config_id
        FROM judgments GROUP BY 1, 2, 3 HAVING count(*) > 1) AS d""") == [(0,)]
    assert query(db, "SELECT count(*) FROM judgments WHERE error IS NOT NULL") == [(0,)]
    assert query(db, "SELECT count(*) FROM judge_configs") == [(1,)]
    assert sorted(query(db, "SELECT stage, status FROM stage_runs")) == [
        ("generate", "finished"), ("judge", "finished"), ("judge", "finished")]
    final = run_cli("report", "--db", db, "--out", tmp_path / "report")
    assert final.exit_code == 0 and "Traceback" not in final.output
