"""The comparison page: one self-contained HTML file (inline CSS, figures as data URIs) with
what each compared sweep is, the settings in which they differ, and per experiment the
comparison figure and its rate table."""

import base64
import math
import os
from html import escape
from pathlib import Path

from patchdb.report.bands import DEFAULT_CI_METHOD
from patchdb.report.compare import Comparison, describe, member_settings, rows_of, shared_layers
from patchdb.report.html import percent
from patchdb.report.html_assets import CSS
from patchdb.report.tables import control_line, unpatched
from patchdb.store import utcnow

COMPARE_FILE = "compare.html"


def _table(comparison: Comparison, experiment: str, ci_method: str = DEFAULT_CI_METHOD) -> str:
    """Rows: word then sweep; columns: the shared patch layers; rates in whole percent, as the
    terminal prints them; blank where nothing is scored."""
    layers = shared_layers(comparison, experiment)
    members = [m for m in comparison.members if experiment in m.rates]
    with_base = any(m.rates[experiment].baselines for m in members)
    head = ('<th title="the same target condition with no patch">Unpatched</th>'
            if with_base else "") + "".join(f"<th>{layer}</th>" for layer in layers)
    out = [f'<table class="rates"><thead><tr><th>Word</th><th>Sweep</th>{head}</tr></thead><tbody>']
    rows: dict[str, list[str]] = {}
    for m in members:
        rates = m.rates[experiment]
        for line in rows_of(rates):
            at = dict(zip(rates.layers, line.rates, strict=True))
            values = ([unpatched(rates, line)] if with_base else []) + [
                at.get(layer, math.nan) for layer in layers]
            cells = ["<td></td>" if math.isnan(rate) else
                     f'<td style="background: rgba(31, 122, 58, {0.08 + 0.6 * rate:.2f})">'
                     f"{percent(rate)}</td>" for rate in values]
            rows.setdefault(line.label, []).append(
                f"<th>{escape(line.label)}</th><th>{escape(m.label)}</th>{''.join(cells)}")
    out += [f"<tr>{row}</tr>" for entries in rows.values() for row in entries]
    out.append("</tbody></table>")
    for m in members:
        control = control_line(m.rates[experiment], ci_method)
        if control is not None:
            out.append(f'<p class="muted">{escape(m.label)}: {escape(control)}</p>')
    return "\n".join(out)


def write_compare_html(comparison: Comparison, figures: dict[str, bytes], out_dir: Path,
                       reports: dict[str, Path] | None = None,
                       ci_method: str = DEFAULT_CI_METHOD) -> Path:
    """Write `<out_dir>/compare.html` from the comparison and its PNG figures; return its path.
    `reports` maps a member's label to its own report page, linked from the settings table."""
    lines = describe(comparison)
    settings = [member_settings(m) for m in comparison.members]
    shown = ["model", "steer layer", "strength", "prompt", "judge"] + [
        name for name, _ in comparison.differences
        if name not in ("model", "steer layer", "strength", "prompt", "judge")]
    links = {label: Path(os.path.relpath(page, out_dir)).as_posix()
             for label, page in (reports or {}).items() if page.exists()}
    head = "".join(f'<th><a href="{escape(links[m.label])}">{escape(m.label)}</a></th>'
                   if m.label in links else f"<th>{escape(m.label)}</th>"
                   for m in comparison.members)
    body = "".join(
        f"<tr><th>{escape(name)}</th>"
        + "".join(f"<td>{escape(s[name])}</td>" for s in settings) + "</tr>"
        for name in shown)
    title = " vs ".join(m.label for m in comparison.members)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>patchdb comparison: {escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Comparison: {escape(title)}</h1>",
        f'<p class="muted">Written by patchdb on {utcnow().strftime("%Y-%m-%d %H:%M UTC")}.</p>',
        *(f'<p class="note">{escape(line)}</p>' for line in lines),
        '<div class="table-wrap" style="margin-bottom: 12px">'
        f'<table class="rates settings"><thead><tr><th>Setting</th>{head}'
        f"</tr></thead><tbody>{body}</tbody></table></div>",
        "<nav>" + "".join(f'<a href="#compare-{escape(e)}">{escape(e)}</a>'
                          for e in comparison.experiments) + "</nav>",
    ]
    for experiment in comparison.experiments:
        out.append(f'<section id="compare-{escape(experiment)}"><h2>{escape(experiment)}</h2>')
        if experiment in figures:
            png = base64.b64encode(figures[experiment]).decode("ascii")
            out.append(f'<div class="result"><figure><img alt="comparison of rate against patch '
                       f'layer, {escape(experiment)}" src="data:image/png;base64,{png}"></figure>')
            out.append(f'<div class="table-wrap"><h3>Rate (%) per patch layer</h3>'
                       f"{_table(comparison, experiment, ci_method)}</div></div>")
        else:
            out.append('<p class="note missing">No rates in any compared sweep yet.</p>')
        out.append("</section>")
    out.append("</body></html>")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / COMPARE_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(out), encoding="utf-8", errors="replace")
    os.replace(partial, path)
    return path
