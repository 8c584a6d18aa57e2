"""A non-editable install carries its migrations: it can create and migrate a store."""

import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_creates_and_migrates_a_store(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(wheel_dir.glob("patchdb-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    assert (target / "patchdb" / "migrations" / "versions" / "0001_initial_schema.py").exists()
    db = tmp_path / "x.sqlite"
    # Run from an empty folder with the installed copy first on the path, not the checkout.
    probe = (
        "import patchdb, patchdb.store.migrate as m, sys;"
        "print(patchdb.__file__); print(m.migrations_dir());"
        "sys.argv=['patchdb','init','--db',sys.argv[1]];"
        "from patchdb.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(db)],
        cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith(str(target)) and second.startswith(str(target))
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert {"sweeps", "rollouts", "judgments", "layer_rates"} <= tables
