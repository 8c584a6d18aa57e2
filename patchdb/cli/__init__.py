"""The `patchdb` command. Each subcommand lives in its own module and is loaded on demand,
so `patchdb status` does not pay for importing torch."""

import importlib
import sys
from typing import Any

import click

from patchdb import __version__
from patchdb.errors import PatchdbError

# name -> ("module:function", summary). The summary is the start of the command's own help
# (a test keeps them in step) so `patchdb --help` lists commands without importing any of them.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("patchdb.cli.init_cmd:init", "Create or upgrade the store and register a sweep."),
    "status": ("patchdb.cli.status_cmd:status",
               "Show expected vs present rollouts and judgments per experiment and layer"),
    "db": ("patchdb.cli.db_cmd:db", "Inspect and migrate the store's schema."),
    "generate": ("patchdb.cli.generate_cmd:generate",
                 "Generate every missing rollout of the sweep (steered, patched target runs)."),
    "vectors": ("patchdb.cli.vectors_cmd:vectors",
                "Compute the concept vectors a sweep steers with, and store them for later runs."),
    "judge": ("patchdb.cli.judge_cmd:judge",
              "Judge rollouts: coherence for every answer, plus detection or "
              "detection+identification as the experiment needs."),
    "report": ("patchdb.cli.report_cmd:report",
               "Plot rate against patch layer for each experiment, print a rate table per "
               "experiment"),
    "import-json": ("patchdb.cli.import_cmd:import_json",
                    "Import FOLDER, which holds one sub-folder per experiment"),
    "merge": ("patchdb.cli.merge_cmd:merge",
              "Copy sweeps, experiments, concept vectors, stage runs, rollouts, judge configs, "
              "judgments and judge cache entries from OTHER stores"),
    "sweep": ("patchdb.cli.sweep_cmd:sweep", "Run generate, judge and report in order."),
    "label": ("patchdb.cli.label_cmd:label",
              "Label answers YES or NO by hand, one grader question at a time"),
    "verify": ("patchdb.cli.verify_cmd:verify",
               "Check that steering, patching, batching, the fast decode and the first-token "
               "readout do what docs/science.md says"),
    "calibrate": ("patchdb.cli.calibrate_cmd:calibrate",
                  "Measure each judge config against the human labels of `patchdb label`"),
    "sweeps": ("patchdb.cli.sweeps_cmd:sweeps", "List the store's sweeps, or remove an empty one."),
}


def one_line(exc: click.UsageError) -> click.ClickException:
    """A usage error (unknown option, bad value, missing argument) as one `Error: ...` line with
    exit code 1, like every other mistake, instead of click's usage block and exit code 2."""
    names, ctx = [], exc.ctx
    while ctx is not None and ctx.parent is not None:  # the root is `patchdb`, however started
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    where = " ".join(["patchdb", *reversed(names)])
    return click.ClickException(f"{exc.format_message()} (see {where} --help)")


class PatchdbGroup(click.Group):
    """Loads commands lazily and turns domain errors into one line and exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands from their summaries: importing them all would load torch."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr = entry[0].split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # `patchdb` alone prints the help
        except click.UsageError as exc:
            raise one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise  # `patchdb db` alone prints its help
        except click.UsageError as exc:
            raise one_line(exc) from None
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
