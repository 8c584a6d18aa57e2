"""`patchdb sweep` with a dose series: every sweep of the series in turn, then the comparison.

The series is registered first, all or none. Each sweep then runs as `patchdb sweep` runs one
(its own report folder, its own summary); the comparison figure and page come last, in
./patchdb_report/<series name> (or --out, where each sweep gets a sub-folder).
"""

from pathlib import Path

import click

from patchdb.config import ConfigSeries, SweepConfig
from patchdb.report import DEFAULT_REPORT_DIR, default_out_dir
from patchdb.report.export import safe_component
from patchdb.store import open_store
from patchdb.store.sweeps import register_sweeps

MEMBER = "patchdb.series_member"  # ctx.meta key: the sweep of the series this run is for


def series_member(series: ConfigSeries) -> SweepConfig | None:
    """The series' sweep the current `patchdb sweep` run is for; None: run the whole series."""
    name = click.get_current_context().meta.get(MEMBER)
    if not series.is_series:
        return series.configs[0]
    return next((c for c in series.configs if c.name == name), None)


def run_series(series: ConfigSeries, db: str, out_dir: Path | None, html: bool,
               experiments: list[str] | None) -> None:
    """Register the series, run `patchdb sweep` for each of its sweeps, then compare them."""
    from patchdb.report.compare import describe
    from patchdb.report.compare_run import run_compare
    from patchdb.report.html import REPORT_FILE

    store = open_store(db, create=True)
    try:
        store.transact(lambda s: register_sweeps(s, series.configs))
    finally:
        store.close()
    ctx = click.get_current_context()
    assert ctx.command.callback is not None
    reports: dict[str, Path] = {}
    for config in series.configs:
        click.echo(f"== sweep {config.name}")
        ctx.meta[MEMBER] = config.name
        own = None if out_dir is None else out_dir / safe_component(config.name)
        ctx.invoke(ctx.command.callback, **{**ctx.params, "out_dir": own})
        reports[config.name] = (own or default_out_dir(config.name)) / REPORT_FILE
        click.echo("")
    ctx.meta.pop(MEMBER, None)
    base = out_dir if out_dir is not None else DEFAULT_REPORT_DIR / safe_component(series.name)
    store = open_store(db)
    try:
        result = run_compare(store, [c.name for c in series.configs], experiments, base,
                             html=html, reports=reports)
    finally:
        store.close()
    click.echo(f"== series {series.name}: {len(series.configs)} sweeps compared")
    for line in describe(result.comparison):
        click.echo(line)
    for path in result.plots.values():
        click.echo(f"  {path}")
    if result.html is not None:
        click.echo(f"Compare: {result.html}")
