"""The `patchdb` command. Each subcommand lives in its own module and is loaded on demand,
so `patchdb status` does not pay for importing torch."""

import importlib
import sys
from typing import Any

import click

from patchdb import __version__
from patchdb.errors import PatchdbError

# name -> "module:function". One line per command.
COMMANDS = {
    "init": "patchdb.cli.init_cmd:init",
    "status": "patchdb.cli.status_cmd:status",
    "db": "patchdb.cli.db_cmd:db",
    "generate": "patchdb.cli.generate_cmd:generate",
    "vectors": "patchdb.cli.vectors_cmd:vectors",
    "judge": "patchdb.cli.judge_cmd:judge",
    "report": "patchdb.cli.report_cmd:report",
    "import-json": "patchdb.cli.import_cmd:import_json",
    "merge": "patchdb.cli.merge_cmd:merge",
    "sweep": "patchdb.cli.sweep_cmd:sweep",
    "label": "patchdb.cli.label_cmd:label",
    "calibrate": "patchdb.cli.calibrate_cmd:calibrate",
}


class PatchdbGroup(click.Group):
    """Loads commands lazily and turns domain errors into one line and exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PatchdbError as exc:
            from patchdb.redact import redact_text

            raise click.ClickException(redact_text(str(exc))) from None


@click.group(cls=PatchdbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="patchdb")
def cli() -> None:
    """patchdb: a store and resumable stages for activation-patching layer sweeps.

    \b
    Example:
      patchdb init --config sweep.toml
      patchdb generate --layers 40-60
      patchdb judge --only-missing
      patchdb report --export-json
    """


def main() -> None:
    """Console entry point: Ctrl-C exits 130 with one line, never a traceback."""
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except OSError as exc:
        click.echo(f"Error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(1)
    # Without standalone mode, click returns the code a command passed to ctx.exit().
    sys.exit(code if isinstance(code, int) else 0)
