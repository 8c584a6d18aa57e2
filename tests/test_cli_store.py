"""The CLI's store commands: happy paths, and every error as one line with the store unchanged."""

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import file_digest, run_cli

from patchdb.store.migrate import head_revision

MINI = """
[sweep]
name = "mini"
model = "smollm2-135m"
dtype = "float32"
steer_layer = 18
patch_layers = "20-21"
samples = 2
max_new_tokens = 8
positive_words = ["Bread", "Trees"]
negative_words = ["Dust"]
experiments = ["steered_to_unsteered", "success_to_failure"]

[judge]
model = "local"
concurrency = 4
"""


def _config(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_init_default_then_status(db_path: Path) -> None:
    result = run_cli("init", "--db", db_path)
    assert result.exit_code == 0, result.output
    assert "Sweep 'default' registered" in result.output
    again = run_cli("init", "--db", db_path)
    assert "already registered" in again.output
    status = run_cli("status", "--db", db_path, "--json")
    data = json.loads(status.output)
    assert data["sweep"] == "default"
    # 236,544 patched rollouts and 27 baselines x 64 samples (8 + 10 + 1 + 8 target conditions)
    assert data["totals"]["rollouts_expected"] == 236_544 + 1_728
    assert data["totals"]["judgments_expected"] == 473_088 + 3_456
    assert data["totals"]["rollouts_present"] == 0
    text_status = run_cli("status", "--db", db_path)
    assert "failure_to_success" in text_status.output and "0/5120" in text_status.output


def test_init_with_config_and_sqlite_tables(tmp_path: Path, db_path: Path) -> None:
    result = run_cli("init", "--config", _config(tmp_path, MINI), "--db", db_path)
    assert result.exit_code == 0, result.output
    data = json.loads(run_cli("status", "--db", db_path, "--json").output)
    # steered_to_unsteered: 2 words; success_to_failure: 2x1 pairs; 2 layers x 2 samples; and a
    # baseline each for the control and Dust, 2 samples
    assert data["totals"]["rollouts_expected"] == (2 + 2) * 2 * 2 + 2 * 2
    con = sqlite3.connect(db_path)
    row = con.execute("SELECT name, steer_layer, samples FROM sweeps").fetchone()
    exps = [r[0] for r in con.execute("SELECT name FROM experiments ORDER BY id")]
    assert row == ("mini", 18, 2)
    assert exps == ["steered_to_unsteered", "success_to_failure"]


def newest_migration() -> str:
    """The head of the migration chain, read from the files' revision lines: the one revision
    that no other file names as its down_revision."""
    versions = Path(__file__).resolve().parents[1] / "migrations" / "versions"
    revisions, parents = set(), set()
    for path in versions.glob("[0-9]*_*.py"):
        text = path.read_text(encoding="utf-8")
        revisions.add(re.search(r'^revision: str = "(\w+)"', text, re.M).group(1))  # type: ignore[union-attr]
        parent = re.search(r'^down_revision: str \| None = "(\w+)"', text, re.M)
        if parent:
            parents.add(parent.group(1))
    [head] = revisions - parents
    return head


def test_db_commands(db_path: Path) -> None:
    run_cli("init", "--db", db_path)
    head = newest_migration()
    assert head_revision() == head
    current = run_cli("db", "current", "--db", db_path)
    assert current.exit_code == 0
    # the store is named by its path (SQLite) or its URL with the driver (PostgreSQL)
    where = str(db_path).replace("postgresql://", "postgresql+psycopg://", 1)
    assert current.output.strip() == f"{where}: schema {head}, head {head}"
    upgrade = run_cli("db", "upgrade", "--db", db_path)
    assert upgrade.exit_code == 0
    assert upgrade.output.strip() == f"{where} is at schema {head} (head)"
    check = run_cli("db", "check", "--db", db_path)
    assert check.exit_code == 0
    assert check.output.strip().splitlines()[-1] == f"{where}: schema matches the models"


def test_env_var_names_the_store(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHDB_DB", str(db_path))
    result = run_cli("init")
    assert result.exit_code == 0
    # the default sweep: Gemma-3-27B, the four experiments, patch layers 40 to 60
    assert result.output.strip() == (
        f"Sweep 'default' registered in {db_path}: model google/gemma-3-27b-it, 4 experiments, "
        "21 patch layers (40-60).")
    assert db_path.exists()
    again = run_cli("status")
    assert again.exit_code == 0
    assert again.output.splitlines()[0] == "Sweep default (model google/gemma-3-27b-it)"


def test_every_command_has_an_example() -> None:
    for args in (["init"], ["status"], ["db"], ["db", "upgrade"], ["db", "current"],
                 ["db", "check"]):
        assert "Example:" in run_cli(*args, "--help").output, args


def _assert_one_line_error(result, expected: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[sweep]\npatch_layers = "40-"\n', "invalid range '40-'"),
        ('[sweep]\npatch_layers = "60-40"\n', "ends before it starts"),
        ('[sweep]\nsteer_layers = 3\n', "unknown key 'steer_layers' in [sweep]"),
        ('[judge]\nmodle = "x"\n', "unknown key 'modle' in [judge]"),
        ('[sweep]\nexperiments = ["success_to_nowhere"]\n', "unknown experiment 'success_to_nowhere'"),
        ('[sweep]\nprompt_trial = "Trial 1: anything?"\n', "blank line"),
        ('[sweep\nname = 1\n', "invalid TOML"),
        ('[sweep]\nsamples = "many"\n', "[sweep] samples must be an integer"),
    ],
)
def test_config_errors_leave_store_unchanged(
    tmp_path: Path, db_path: Path, body: str, expected: str
) -> None:
    run_cli("init", "--db", db_path)
    before = file_digest(db_path)
    result = run_cli("init", "--config", _config(tmp_path, body, "bad.toml"), "--db", db_path)
    _assert_one_line_error(result, expected)
    assert file_digest(db_path) == before


def test_config_file_missing(db_path: Path) -> None:
    _assert_one_line_error(run_cli("init", "--config", "nope.toml", "--db", db_path),
                           "config file not found")
    assert not db_path.exists()


def test_same_name_different_config_is_refused(tmp_path: Path, db_path: Path) -> None:
    run_cli("init", "--config", _config(tmp_path, MINI), "--db", db_path)
    before = file_digest(db_path)
    changed = MINI.replace("samples = 2", "samples = 3")
    result = run_cli("init", "--config", _config(tmp_path, changed, "b.toml"), "--db", db_path)
    _assert_one_line_error(result, "already exists with a different config")
    assert file_digest(db_path) == before


def test_not_a_sqlite_file(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("these are my notes, not a database\n" * 10)
    before = file_digest(bogus)
    for args in (["status"], ["init"], ["db", "upgrade"]):
        _assert_one_line_error(run_cli(*args, "--db", bogus), "is not a SQLite database")
    assert file_digest(bogus) == before


def test_truncated_store(db_path: Path) -> None:
    run_cli("init", "--db", db_path)
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = db_path.read_bytes()
    db_path.write_bytes(data[: len(data) // 2 + 100])
    before = file_digest(db_path)
    _assert_one_line_error(run_cli("status", "--db", db_path), "truncated")
    assert file_digest(db_path) == before


def test_store_from_a_newer_patchdb(db_path: Path) -> None:
    run_cli("init", "--db", db_path)
    con = sqlite3.connect(db_path)
    con.execute("UPDATE alembic_version SET version_num = '9999_future'")
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before = file_digest(db_path)
    for args in (["status"], ["init"], ["db", "upgrade"]):
        _assert_one_line_error(run_cli(*args, "--db", db_path), "newer patchdb")
    assert file_digest(db_path) == before


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.commit()
    con.close()
    _assert_one_line_error(run_cli("status", "--db", other), "not a patchdb store")


def test_status_without_store(db_path: Path) -> None:
    _assert_one_line_error(run_cli("status", "--db", db_path), "no store at")
    assert not db_path.exists()


def test_real_process_prints_one_line(tmp_path: Path) -> None:
    """The console entry point, not just CliRunner: one line on stderr, exit 1."""
    bogus = tmp_path / "x.sqlite"
    bogus.write_bytes(b"\x00" * 4096)
    proc = subprocess.run([sys.executable, "-m", "patchdb", "status", "--db", str(bogus)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("Error: ")


def test_status_counts_one_judge_config(tmp_path: Path, db_path: Path) -> None:
    """With two judge configs, status counts the one that judged the most, never the sum."""
    from patchdb.store import Experiment, JudgeConfig, Judgment, Rollout, open_store

    run_cli("init", "--config", _config(tmp_path, MINI), "--db", db_path)
    store = open_store(str(db_path))

    def fill(session) -> int:  # type: ignore[no-untyped-def]
        exp = session.query(Experiment).filter_by(name="success_to_failure").one()
        rollout = Rollout(experiment_id=exp.id, patch_layer=20, source_word="Bread",
                          target_word="Dust", sample_index=0, answer="a")
        big = JudgeConfig(model="big", reasoning="medium", template_version="v", backend="openai")
        small = JudgeConfig(model="small", reasoning="medium", template_version="v", backend="hf")
        session.add_all([rollout, big, small])
        session.flush()
        for grader in ("coherence", "detection_identification"):
            session.add(Judgment(rollout_id=rollout.id, grader=grader, judge_config_id=big.id,
                                 verdict=True, attempts=1, cost=0.5))
        session.add(Judgment(rollout_id=rollout.id, grader="coherence", judge_config_id=small.id,
                             verdict=None, attempts=1))
        return big.id

    big_id = store.transact(fill)
    store.close()
    data = json.loads(run_cli("status", "--db", db_path, "--json").output)
    assert data["counted_judge_config"] == big_id
    assert data["totals"]["judged"] == 2 and data["totals"]["unparsed"] == 0
    assert data["judge_configs"] == 2 and data["judge_cost"] == 1.0


def test_entry_point_keeps_a_commands_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    import patchdb.cli as cli_module

    monkeypatch.setitem(cli_module.COMMANDS, "bye", ("exit_probe:bye", "Exit with code 3."))
    monkeypatch.setattr(sys, "argv", ["patchdb", "bye"])
    with pytest.raises(SystemExit) as stopped:
        cli_module.main()
    assert stopped.value.code == 3
