"""The project documents itself: the README, docs/*.md and every --help text name only files that
exist in the repository, and docs/cli.md holds each command's current --help text.

`.venv/bin/python tests/test_docs.py --write` regenerates docs/cli.md's command sections."""

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"
START, END = "<!-- generated: start -->\n", "<!-- generated: end -->\n"

# Something that looks like a file name: a path or bare name with one of these extensions.
FILE_NAME = re.compile(r"(?<![\w./-])([\w.-][\w./-]*\.(?:md|py|toml|sh|json|txt|cfg|ini))(?![\w-])")
# A relative markdown link target (no scheme, no bare anchor).
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
# Names a user writes or a command produces, used as examples: they are not repository files.
USER_FILES = {
    "sweep.toml", "my_prompts.toml", "prompts.toml",
    "all_layer_scores.json", "rollouts.json", "judge_scores.json", "judgments_coherence.json",
    "judgments_detection.json", "judgments_detection_identification.json", "rates.json",
    "readouts.json", "all_layer_readouts.json",
    "config.json", "generation_config.json",  # files of a model directory
}


def repository_files() -> set[str]:
    """Every tracked or untracked-but-not-ignored path, relative to the repository root."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def missing_names(text: str, where: Path, files: set[str]) -> list[str]:
    """The file names and relative links in `text` that name no file of the repository.

    A name with a folder must exist relative to the repository root or to `where` (the folder of
    the document); a bare name must be the name of some file in the repository."""
    basenames = {f.rsplit("/", 1)[-1] for f in files}
    folders = {str(Path(f).parent) for f in files}
    found = set(FILE_NAME.findall(text)) | {t for t in LINK.findall(text) if "://" not in t}
    missing = []
    for name in sorted(found):
        name = name.rstrip(".")
        if name in USER_FILES:
            continue
        if "/" not in name:
            if name not in basenames and name not in folders:
                missing.append(name)
            continue
        candidates = {name.strip("/"), str((where / name).resolve().relative_to(ROOT))
                      if (where / name).resolve().is_relative_to(ROOT) else ""}
        if not any(c in files or c in folders for c in candidates if c):
            missing.append(name)
    return missing


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_name_only_files_that_exist(doc: Path) -> None:
    assert missing_names(doc.read_text(encoding="utf-8"), doc.parent, repository_files()) == []


def all_commands() -> list[list[str]]:
    """Every command path of the CLI, the group first, sub-commands after their group."""
    from patchdb.cli import COMMANDS, cli

    ctx = click.Context(cli)
    paths: list[list[str]] = [[]]
    for name in sorted(COMMANDS):
        paths.append([name])
        command = cli.get_command(ctx, name)
        if isinstance(command, click.Group):
            paths += [[name, sub] for sub in sorted(command.commands)]
    return paths


def help_text(args: list[str]) -> str:
    from patchdb.cli import cli

    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=100, prog_name="patchdb")
    assert result.exit_code == 0, result.output
    return result.output.rstrip()


def test_help_texts_name_only_files_that_exist() -> None:
    files = repository_files()
    bad = {" ".join(["patchdb", *args]): missing_names(help_text(args), ROOT, files)
           for args in all_commands()}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_catches_a_missing_file() -> None:
    files = repository_files()
    text = ("See docs/science.md, [schema](schema.md), README.md and scripts/test.sh; "
            "sweep.toml is the user's. Gone: SPEC.md, docs/nowhere.md, [x](../nope/a.md), "
            "tests/test_missing_thing.py.")
    assert missing_names(text, ROOT / "docs", files) == [
        "../nope/a.md", "SPEC.md", "docs/nowhere.md", "tests/test_missing_thing.py"]


def render_cli_reference() -> str:
    """docs/cli.md's generated part: each command's --help text under a heading."""
    parts = []
    for args in all_commands():
        level = "###" if len(args) > 1 else "##"
        parts.append(f"{level} {' '.join(['patchdb', *args])}\n\n```text\n{help_text(args)}\n```\n")
    return "\n".join(parts)


def test_cli_reference_is_each_commands_current_help() -> None:
    text = CLI_DOC.read_text(encoding="utf-8")
    generated = text.split(START, 1)[1].split(END, 1)[0]
    assert generated.rstrip() == render_cli_reference().rstrip(), (
        "docs/cli.md is out of date: run `.venv/bin/python tests/test_docs.py --write`")


def write_cli_reference() -> None:
    """Replace docs/cli.md's generated part with the current --help texts."""
    text = CLI_DOC.read_text(encoding="utf-8")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    CLI_DOC.write_text(before + START + render_cli_reference().rstrip() + "\n" + END + after,
                       encoding="utf-8")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    write_cli_reference()
