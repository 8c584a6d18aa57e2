"""Option sets shared by several commands, as decorators. Every option has an env variable."""

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

from patchdb.errors import RangeError
from patchdb.ranges import parse_range

F = TypeVar("F", bound=Callable[..., Any])


class FiniteRange(click.FloatRange):
    """click's FloatRange, refusing NaN and infinity (NaN passes every range check: with it
    `--max-cost nan` was no limit at all)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def db_option(fn: F) -> F:
    return click.option(
        "--db",
        envvar="PATCHDB_DB",
        default="patchdb.sqlite",
        show_default=True,
        help="Store: a SQLite file path or any SQLAlchemy URL (env PATCHDB_DB).",
    )(fn)


def sweep_option(fn: F) -> F:
    return click.option(
        "--sweep",
        envvar="PATCHDB_SWEEP",
        default=None,
        help="Sweep name; may be left out when the store holds one sweep (env PATCHDB_SWEEP).",
    )(fn)


def split_list(value: str | None) -> list[str] | None:
    """'a,b , c' -> ['a', 'b', 'c']; None stays None."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def layers_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return parse_range(value)
    except RangeError as exc:
        raise click.BadParameter(str(exc)) from None


def list_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return split_list(value)


def layers_option(fn: F) -> F:
    return click.option(
        "--layers",
        callback=layers_callback,
        envvar="PATCHDB_LAYERS",
        help="Patch layers to work on, e.g. 40-60, 40,42 or 40-60:2 (default: all).",
    )(fn)


def experiments_option(fn: F) -> F:
    return click.option(
        "--experiments",
        callback=list_callback,
        envvar="PATCHDB_EXPERIMENTS",
        help="Comma-separated experiment names (default: all of the sweep's).",
    )(fn)


def narrowing_options(fn: F) -> F:
    """--words, --samples and --max-new-tokens: what generate (and sweep) fill now."""
    fn = click.option("--max-new-tokens", type=click.IntRange(min=1), envvar="PATCHDB_MAX_NEW_TOKENS",
                      help="Override the sweep's max_new_tokens for the rollouts written now.")(fn)
    fn = click.option("--samples", type=click.IntRange(min=1), envvar="PATCHDB_SAMPLES",
                      help="Generate only sample indexes 0..N-1 (N at most the sweep's samples).")(fn)
    return click.option("--words", callback=list_callback, envvar="PATCHDB_WORDS",
                        help="Only keys with one of these words as source or target, "
                             "e.g. Bread,Trees.")(fn)


def device_option(fn: F) -> F:
    return click.option("--device", envvar="PATCHDB_DEVICE",
                        help="Torch device, e.g. cuda:0 or cpu (default: cuda:0 when available).")(fn)


def judge_config_option(fn: F) -> F:
    """--judge-config: which judge config's verdicts to read (report, status)."""
    return click.option(
        "--judge-config", "judge_config", type=int, envvar="PATCHDB_JUDGE_CONFIG",
        help="Judge config id to read (default: the one with the most scored samples, the "
             "newest on ties; env PATCHDB_JUDGE_CONFIG).",
    )(fn)
