"""Start-up: commands that need no model import neither torch nor transformers (nor matplotlib for
--help), a model load says what it is doing, and `patchdb --help` lists every command's own help."""

import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import run_cli
from tiny_models import save_tiny_llama

from patchdb.cli import COMMANDS, cli

HEAVY = ("torch", "transformers", "matplotlib")

# Runs the real entry point in a fresh interpreter, then names the heavy modules it imported.
PROBE = """
import sys
sys.argv = ["patchdb", *sys.argv[1:]]
from patchdb.cli import main
try:
    main()
except SystemExit as stop:
    code = stop.code
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), "EXIT=" + str(code))
"""


def heavy_modules(*args: str, cwd: Path) -> list[str]:
    """The heavy modules that `patchdb ARGS` imported, in a fresh interpreter; asserts exit 0."""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("EXIT=0"), proc.stdout + proc.stderr
    names = last.split()[0].removeprefix("HEAVY=")
    return names.split(",") if names else []


@pytest.mark.parametrize("args", [
    ["--help"], ["init", "--help"], ["status", "--help"], ["report", "--help"], ["db", "--help"],
    ["merge", "--help"], ["import-json", "--help"], ["sweep", "--help"], ["generate", "--help"],
])
def test_help_imports_no_heavy_module(args: list[str], tmp_path: Path) -> None:
    assert heavy_modules(*args, cwd=tmp_path) == []


def test_init_status_and_db_on_a_store_import_no_model_code(tmp_path: Path) -> None:
    db = str(tmp_path / "s.sqlite")
    assert heavy_modules("init", "--config", "demo", "--db", db, cwd=tmp_path) == []
    # status may draw nothing, so even matplotlib stays out
    assert heavy_modules("status", "--db", db, cwd=tmp_path) == []
    assert heavy_modules("db", "upgrade", "--db", db, cwd=tmp_path) == []


def test_group_help_summaries_are_the_commands_own_help() -> None:
    """`patchdb --help` lists commands without importing them, from summaries kept here; each
    must be the start of the command's own help so the two cannot drift apart."""
    ctx = click.Context(cli)
    for name, (_, summary) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None and command.help is not None
        own = " ".join(command.help.split())
        assert own.startswith(" ".join(summary.split())), name
    listed = run_cli("--help").output
    for name in COMMANDS:
        assert f"\n  {name} " in listed


def test_loading_a_model_says_what_it_does(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from patchdb.generate.loading import load_model

    model_dir = save_tiny_llama(tmp_path / "m", n_layers=2)
    capsys.readouterr()  # saving draws its own bar
    load_model(str(model_dir), "float32", "cpu")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"Loading model {model_dir} (dir) on cpu in float32..."
    assert lines[1].startswith(f"Loaded {model_dir} in ") and lines[1].endswith(" s.")
    assert len(lines) == 2
    load_model(str(model_dir), "float32", "cpu", announce=False)
    assert capsys.readouterr().err == ""
