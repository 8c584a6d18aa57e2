"""A command that asks click for exit code 3, for testing the console entry point."""

import click


@click.command()
@click.pass_context
def bye(ctx: click.Context) -> None:
    ctx.exit(3)
