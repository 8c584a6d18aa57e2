"""Writing a comparison: its figures, its tables and its page, above the modules that build
(compare.py) and draw (compare_plot.py, compare_html.py) it, so those never import each other."""

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchdb.report import DEFAULT_REPORT_DIR, default_out_dir
from patchdb.report.bands import DEFAULT_CI_METHOD, check_method
from patchdb.report.compare import (
    Comparison,
    any_scored,
    build_comparison,
    compare_table,
    default_compare_dir,
)
from patchdb.report.compare_html import write_compare_html
from patchdb.report.compare_plot import compare_figure
from patchdb.report.export import inside
from patchdb.report.html import REPORT_FILE
from patchdb.report.plots import save_figure
from patchdb.report.rates_json import sweep_rows, write_rates_json


@dataclass
class CompareReport:
    """What `report --compare` wrote: the comparison, its figures and (optionally) its page."""

    comparison: Comparison
    out_dir: Path
    plots: dict[str, Path]
    tables: dict[str, str]
    html: Path | None = None
    rates_json: Path | None = None


def run_compare(store: Any, texts: list[str], experiments: list[str] | None = None,
                out_dir: Path | None = None, fmt: str = "png", html: bool = False,
                reports: dict[str, Path] | None = None, *, ci: bool = False,
                ci_method: str = DEFAULT_CI_METHOD, rates_json: bool = False) -> CompareReport:
    """Build the comparison and write one figure per experiment with any scored rate under
    `<out_dir>/<experiment>/compare_plot.<fmt>` (each member's 95% bands with `ci`), and
    `<out_dir>/compare.html` with `html` (linking each member's own report page: from
    `reports`, else its default folder's) and `<out_dir>/rates.json` with `rates_json`."""
    check_method(ci_method)
    with store.read() as session:
        comparison = build_comparison(session, texts, experiments)
    base = out_dir if out_dir is not None else default_compare_dir(
        DEFAULT_REPORT_DIR, [m.label for m in comparison.members])
    report = CompareReport(comparison, base, {}, {})
    figures: dict[str, bytes] = {}
    for experiment in comparison.experiments:
        report.tables[experiment] = compare_table(comparison, experiment, ci_method)
        if not any_scored(comparison, experiment):
            continue
        figure = compare_figure(comparison, experiment, ci, ci_method)
        report.plots[experiment] = save_figure(
            figure, inside(base, base / experiment / f"compare_plot.{fmt}"))
        if html:
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=90)
            figures[experiment] = buffer.getvalue()
    if html:
        pages = {m.label: default_out_dir(m.sweep) / REPORT_FILE for m in comparison.members}
        report.html = write_compare_html(comparison, figures, base, {**pages, **(reports or {})},
                                         ci_method)
    if rates_json:
        rows = [row for m in comparison.members
                for row in sweep_rows(m.sweep, m.judge.id, list(m.rates.values()), ci_method)]
        report.rates_json = write_rates_json(base, rows, ci_method)
    return report
