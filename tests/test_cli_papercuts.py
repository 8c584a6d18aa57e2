"""What misled a newcomer at the CLI (issue #27): another store's report overwritten, an empty
sweep nobody could remove, slow subcommand help, four-line option errors with exit code 2."""

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import file_digest, run_cli
from sqlalchemy.orm import Session
from word_store import import_sweep, write_sweep

from patchdb.store import StageRun, open_store, utcnow
from patchdb.store.sweeps import get_sweep

MINI = """\
[sweep]
name = "mini"
model = "{model}"
steer_layer = 18
patch_layers = "20-21"
samples = 2
positive_words = ["Bread"]
negative_words = ["Dust"]
experiments = ["steered_to_unsteered", "unsteered_to_steered"]
"""


def _init(tmp_path: Path, db: Path, model: str) -> str:
    config = tmp_path / f"{model}.toml"
    config.write_text(MINI.format(model=model))
    return run_cli("init", "--config", config, "--db", db).output


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


# 1. The report folder of a sweep named like another store's


def test_report_refuses_the_folder_of_another_stores_sweep(tmp_path: Path) -> None:
    first, second = tmp_path / "first.sqlite", tmp_path / "second.sqlite"
    for db in (first, second):
        assert run_cli("init", "--config", "demo", "--db", db).exit_code == 0
    assert run_cli("report", "--db", first).exit_code == 0
    folder = tmp_path / "patchdb_report" / "demo"
    files, store_before = _tree_digest(folder), file_digest(second)
    assert "unsteered_to_steered/sweep_plot.png" in files

    refused = run_cli("report", "--db", second)
    assert refused.exit_code == 1
    assert refused.output == (
        f"Error: patchdb_report/demo holds the report of sweep 'demo' from another store "
        f"({first}); give this one its own folder with --out, or delete patchdb_report/demo "
        "first\n")
    assert _tree_digest(folder) == files  # the first store's report is untouched
    assert file_digest(second) == store_before

    elsewhere = run_cli("report", "--db", second, "--out", "second_report")
    assert elsewhere.exit_code == 0 and (tmp_path / "second_report" / "unsteered_to_steered"
                                         / "sweep_plot.png").exists()
    assert run_cli("report", "--db", first).exit_code == 0  # the same store again: as today
    moved = tmp_path / "moved.sqlite"  # the same sweep in a moved store is still its own
    shutil.copy(first, moved)
    assert run_cli("report", "--db", moved).exit_code == 0


# 2. Removing a sweep registered by mistake


def test_a_misspelled_model_id_can_be_removed_and_registered_again(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    _init(tmp_path, db, "smollm2-135n")  # the typo
    config = tmp_path / "fixed.toml"
    config.write_text(MINI.format(model="smollm2-135m"))
    before = file_digest(db)
    again = run_cli("init", "--config", config, "--db", db)
    assert again.exit_code == 1
    assert again.output == (
        "Error: sweep 'mini' already exists with a different config (model 'smollm2-135n' in "
        "the store, 'smollm2-135m' in this config); it holds no results: remove it with "
        "`patchdb sweeps rm mini` and run init again, or choose another name\n")
    assert file_digest(db) == before

    listed = run_cli("sweeps", "ls", "--db", db)
    assert listed.exit_code == 0
    lines = listed.output.splitlines()
    assert lines[0].split() == ["sweep", "model", "experiments", "rollouts", "readouts",
                                "registered"]
    assert lines[1].split()[:5] == ["mini", "smollm2-135n", "2", "0", "0"]

    removed = run_cli("sweeps", "rm", "mini", "--db", db)
    assert removed.exit_code == 0
    assert removed.output == f"Removed sweep 'mini' from {db} (2 experiments; it held no results).\n"
    assert _rows(db, "SELECT count(*) FROM sweeps") == [(0,)]
    assert _rows(db, "SELECT count(*) FROM experiments") == [(0,)]
    registered = run_cli("init", "--config", config, "--db", db)
    assert registered.exit_code == 0 and "'mini' registered" in registered.output


def test_sweeps_rm_removes_the_stage_runs_and_leaves_other_sweeps(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    _init(tmp_path, db, "smollm2-135n")
    assert run_cli("init", "--config", "demo", "--db", db).exit_code == 0
    store = open_store(str(db))
    try:  # a generate that failed loading the misspelled model left its run behind
        def add_run(session: Session) -> None:
            mini = get_sweep(session, "mini")
            session.add(StageRun(stage="generate", sweep_id=mini.id, arguments="{}",
                                 host="elsewhere", pid=1, status="failed",
                                 error="model not found"))
        store.transact(add_run)
    finally:
        store.close()
    removed = run_cli("sweeps", "rm", "mini", "--db", db)
    assert removed.output == (f"Removed sweep 'mini' from {db} (2 experiments and 1 stage run; "
                              "it held no results).\n")
    assert _rows(db, "SELECT name FROM sweeps") == [("demo",)]
    assert _rows(db, "SELECT count(*) FROM experiments") == [(4,)]  # the demo's four
    assert _rows(db, "SELECT count(*) FROM stage_runs") == [(0,)]


def _assert_refused(db: Path, args: list[str], line: str) -> None:
    before = file_digest(db)
    result = run_cli(*args)
    assert result.exit_code == 1
    assert result.output == line
    assert file_digest(db) == before


def test_sweeps_rm_refuses_a_sweep_with_results_or_a_live_run(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    tree = write_sweep(tmp_path / "tree", {"unsteered_to_steered": {40: {"Bread": (1, 3)}}})
    import_sweep(db, tree, "old")  # 3 rollouts, each judged
    _assert_refused(db, ["sweeps", "rm", "old", "--db", str(db)],
                    "Error: sweep 'old' holds 3 rollouts; `patchdb sweeps rm` removes only a "
                    "sweep with no results (register the new config under another name)\n")
    _assert_refused(db, ["sweeps", "rm", "olde", "--db", str(db)],
                    "Error: no sweep named 'olde' in the store (known: old)\n")

    _init(tmp_path, db, "smollm2-135n")
    store = open_store(str(db))
    try:  # a generate still loading the model: running, fresh heartbeat, this live process
        def add_run(session: Session) -> None:
            mini = get_sweep(session, "mini")
            session.add(StageRun(stage="generate", sweep_id=mini.id, arguments="{}",
                                 host=socket.gethostname(), pid=os.getpid(), status="running",
                                 heartbeat_at=utcnow()))
        store.transact(add_run)
    finally:
        store.close()
    _assert_refused(db, ["sweeps", "rm", "mini", "--db", str(db)],
                    f"Error: sweep 'mini' has a generate running on it (pid {os.getpid()} on "
                    f"{socket.gethostname()}); stop it first\n")


# 3. Subcommand help without the heavy imports

HELP_PROBE = """
import sys
from patchdb.cli import cli
for args in {commands!r}:
    try:
        cli.main(args, standalone_mode=False)
    except SystemExit:
        pass
print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'sqlalchemy', 'numpy')
             if m in sys.modules))
"""

# store-free help: nothing heavier than click and patchdb's small modules
LIGHT = [["init", "--help"], ["status", "--help"], ["db", "--help"], ["db", "check", "--help"],
         ["generate", "--help"], ["vectors", "--help"], ["verify", "--help"], ["merge", "--help"],
         ["import-json", "--help"], ["calibrate", "--help"], ["sweep", "--help"],
         ["sweeps", "--help"], ["sweeps", "rm", "--help"], ["report", "--help"],
         ["label", "--help"]]
# its option choices live in modules that read the store (sqlalchemy), never torch
REST = [["judge", "--help"]]


def _imported_by_help(commands: list[list[str]], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE.format(commands=commands)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_subcommand_help_imports_no_heavy_module(tmp_path: Path) -> None:
    assert _imported_by_help(LIGHT, tmp_path) == "[]"
    rest = _imported_by_help(REST, tmp_path)
    assert all(m not in rest for m in ("torch", "transformers", "matplotlib")), rest


# 4. Option errors: one line, exit code 1


def test_option_errors_are_one_line_with_exit_code_1(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    assert run_cli("init", "--config", "demo", "--db", db).exit_code == 0
    cases = {
        ("report", "--db", str(db), "--format", "gif"):
            "Error: Invalid value for '--format': 'gif' is not one of 'png', 'svg', 'pdf'. "
            "(see patchdb report --help)",
        ("report", "--db", str(db), "--formt", "svg"):
            "Error: No such option '--formt'. (Did you mean one of: '--format', '--out'?) "
            "(see patchdb report --help)",
        ("merge", "--db", str(db)): "Error: Missing argument 'OTHER...'. (see patchdb merge --help)",
        ("status", "--db", str(db), "--judge-config", "x"):
            "Error: Invalid value for '--judge-config': 'x' is not a valid integer. "
            "(see patchdb status --help)",
        ("generate", "--db", str(db), "--layers", "20-x"):
            "Error: Invalid value for '--layers': invalid range '20-x': cannot read '20-x' "
            "(expected e.g. '40-60', '40,42,44' or '40-60:2') (see patchdb generate --help)",
        ("sweeps", "rm", "--db", str(db)):
            "Error: Missing argument 'NAME'. (see patchdb sweeps rm --help)",
        ("db", "upgrad"):
            "Error: No such command 'upgrad'. Did you mean 'upgrade'? (see patchdb db --help)",
        ("reprot",): "Error: No such command 'reprot'. (see patchdb --help)",
        ("--quiet", "status"): "Error: No such option '--quiet'. (see patchdb --help)",
    }
    before = file_digest(db)
    for args, line in cases.items():
        result = run_cli(*args)
        assert (result.exit_code, result.output) == (1, line + "\n"), args
    assert file_digest(db) == before


def test_the_entry_point_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    """Through `patchdb` itself (main(), not click's standalone mode): stderr, one line."""
    for args, line in ((["--bogus"], "Error: No such option '--bogus'. (see patchdb --help)"),
                       (["report", "--ci-method", "bootstrap"],
                        "Error: Invalid value for '--ci-method': 'bootstrap' is not one of "
                        "'words', 'samples'. (see patchdb report --help)")):
        proc = subprocess.run([sys.executable, "-m", "patchdb", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", line + "\n")
