"""A non-editable install carries its migrations, every command module and the packaged configs:
it can create and migrate a store, and `init --config demo` works from any folder."""

import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_creates_and_migrates_a_store(tmp_path: Path) -> None:
    # Build from a clean copy: setuptools' build/ folder in the checkout keeps files of earlier
    # builds, which would hide a package that setup.cfg leaves out.
    source = tmp_path / "source"
    for name in ("patchdb", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(source)],
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
    # -S: no .pth files, so the checkout's editable-install finder cannot supply what the wheel
    # lacks; the dependencies come from site-packages, after the installed copy.
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    # Run from an empty folder with the installed copy first on the path, not the checkout.
    probe = (
        "import patchdb, patchdb.store.migrate as m, sys;"
        "print(patchdb.__file__); print(m.migrations_dir());"
        "sys.argv=['patchdb','init','--db',sys.argv[1]];"
        "from patchdb.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(db)],
        cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first.startswith(str(target)) and second.startswith(str(target))
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert {"sweeps", "rollouts", "judgments", "layer_rates"} <= tables

    # every command module imports from the installed copy (a sub-package left out of setup.cfg
    # would fail here), and a packaged config name works with init from an empty folder
    probe = (
        "import importlib, sys; from patchdb.cli import COMMANDS;"
        "[importlib.import_module(t.split(':')[0]) for t, _ in COMMANDS.values()];"
        "sys.argv=['patchdb','init','--config','demo','--db',sys.argv[1]];"
        "from patchdb.cli import main; main()"
    )
    demo_db = tmp_path / "demo.sqlite"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(demo_db)],
        cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Sweep 'demo' registered in ")
    names = sqlite3.connect(demo_db).execute("SELECT name FROM sweeps").fetchall()
    assert names == [("demo",)]


def _packaged_names() -> list[str]:
    """The packaged config names, read from the folder (not from the code under test)."""
    return sorted(p.stem for p in (ROOT / "patchdb" / "configs").glob("*.toml"))


def test_init_takes_a_packaged_config_name(db_path: Path) -> None:
    result = run_cli("init", "--config", "demo", "--db", db_path)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Sweep 'demo' registered in {db_path}: model smollm2-135m")
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT name, model, steer_layer FROM sweeps").fetchall() == [
            ("demo", "smollm2-135m", 18)]


def test_a_file_path_still_works_and_wins_over_a_name(tmp_path: Path, db_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "patchdb" / "configs" / "demo.toml").read_text().replace(
        'name = "demo"', 'name = "mine"')
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text(text)  # a file named like the packaged config is what the user means
    result = run_cli("init", "--config", "demo", "--db", db_path)
    assert result.exit_code == 0, result.output
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT name FROM sweeps").fetchall() == [("mine",)]


@pytest.mark.parametrize("command", ["init", "sweep"])
def test_an_unknown_config_is_one_error_line_naming_the_packaged_ones(
        command: str, db_path: Path) -> None:
    result = run_cli(command, "--config", "demoo", "--db", db_path)
    assert result.exit_code == 1
    assert result.output == (f"Error: config file not found: demoo (packaged configs: "
                             f"{', '.join(_packaged_names())})\n")
    assert not db_path.exists()


@pytest.mark.parametrize("command", ["init", "sweep"])
def test_config_help_lists_the_packaged_names(command: str) -> None:
    text = " ".join(run_cli(command, "--help").output.split())
    assert f"or a packaged config: {', '.join(_packaged_names())} " in text
