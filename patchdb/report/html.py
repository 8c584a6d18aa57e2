"""The HTML report: a static folder per sweep, report.html with the plots, rate tables and
findings, and one small page of rollouts per experiment and patch layer that it links to
(patchdb.report.rollout_pages).

Every page works from a file:// URL with no server and no network: CSS and JS are inline, plots
are base64 PNG data URIs, and a rollout page carries its rollouts as JSON in a
`<script type="application/json">` tag. Rollout pages hold a few samples per key and layer;
each says how many of its layer's rollouts it holds.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from patchdb.experiments import EXPERIMENTS, GRADERS
from patchdb.report.aggregate import ExperimentRates, JudgeChoice, sweep_rates
from patchdb.report.bands import DEFAULT_CI_METHOD, check_method, legend_method, line_band
from patchdb.report.calibration_html import calibration_section
from patchdb.report.gc_pause import without_cyclic_gc
from patchdb.report.html_assets import CSS, png_data_uri
from patchdb.report.layer_findings import decide, layer_test_html
from patchdb.report.layer_test import LayerTest
from patchdb.report.plots import sweep_figure
from patchdb.report.readout_html import readout_section
from patchdb.report.readouts import sweep_readouts
from patchdb.report.rollout_pages import (
    RolloutPage,
    browser_rollouts,
    layer_name,
    page_path,
    rollout_counts,
    write_rollout_pages,
)
from patchdb.report.tables import control_line, row_baseline_band, unpatched
from patchdb.store import Store, utcnow
from patchdb.store.baselines import baseline_units
from patchdb.store.readouts import random_vector_units
from patchdb.store.sweeps import expected_units, get_experiments, get_sweep, sweep_config

if TYPE_CHECKING:
    from patchdb.report import Report

REPORT_FILE = "report.html"
DEFAULT_SAMPLES_PER_KEY = 3


def percent(rate: float) -> str:
    """A rate as the terminal's tables print it: whole percent, no sign (patchdb.report.tables)."""
    return f"{round(100 * rate)}"


@without_cyclic_gc  # patchdb.report.gc_pause: many objects that live till the end
def write_html_report(
    store: Store,
    sweep_name: str | None,
    out_dir: Path,
    *,
    samples_per_key: int = DEFAULT_SAMPLES_PER_KEY,
    judge_config_id: int | None = None,
    ci_method: str = DEFAULT_CI_METHOD,
    report: "Report | None" = None,
) -> Path:
    """Write `<out_dir>/report.html` and its rollout pages for the sweep; return its path.

    The rollout pages (`<out_dir>/rollouts/<experiment>/<layer>.html`) hold at most
    `samples_per_key` samples (lowest sample index first) of every key at every patch layer;
    rates and plots always cover every rollout. The verdicts shown are those of
    `judge_config_id`, by default the judge config that judged most samples. Plots and tables
    carry each bold line's 95% band (over words, or over samples with `ci_method` "samples";
    patchdb.report.bands). `report`: the same sweep's `build_report` result, whose rates are
    used rather than counted again when they are the plain rates of every experiment under the
    same judge config.
    """
    if samples_per_key < 1:
        raise ValueError("samples_per_key must be >= 1")
    check_method(ci_method)
    with store.read() as session:
        sweep = get_sweep(session, sweep_name)
        config = sweep_config(sweep)
        experiments = get_experiments(session, sweep)
        expected = len(baseline_units(config, experiments)
                       + random_vector_units(config, experiments)
                       + expected_units(config, experiments)) * config.samples
        names = [e.name for e in experiments]
        if report is not None and reusable(report, sweep.name, names, judge_config_id):
            judge, rates = report.judge, [e.rates for e in report.experiments]
        else:
            judge, rates = sweep_rates(session, sweep, config, names, judge_config_id)
        counts = rollout_counts(session, sweep.id)
        total = sum(counts.values())
        calibration = calibration_section(session, sweep)
        readouts = sweep_readouts(session, sweep.name, config, names)
    facts = [
        ("Model", config.model + (f" @ {config.model_revision}" if config.model_revision else "")),
        ("Injection", f"layer {config.steer_layer}, strength {config.strength:g}"),
        ("Patch layers", config.patch_layers),
        ("Generation", f"{config.samples} samples per key, temperature {config.temperature:g}, "
                       f"{config.max_new_tokens} new tokens, {config.dtype}"),
        ("Positive words", ", ".join(config.positive_words)),
        ("Negative words", ", ".join(config.negative_words)),
        ("Rollouts", f"{total:,} of {expected:,} expected"),
        ("Judge", judge.why),
    ]
    title = f"{{}} (sweep {sweep.name}, steer layer {config.steer_layer})"
    decided = {r.name: d for r in rates if (d := decide(r))}  # each experiment's layer test
    # The rollouts' query runs in a thread beside the drawing: the database works without
    # holding the GIL, so on two cores the query costs no time of its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        picked = (pool.submit(read_rollouts, store, sweep.id, judge.id, samples_per_key)
                  if shared_across_threads(store) else None)
        plots = {r.name: figure_png(r, title.format(r.name), ci_method,
                                    decided[r.name][0] if r.name in decided else None)
                 for r in rates if any_scored(r)}
        rollouts = (picked.result() if picked is not None else
                    read_rollouts(store, sweep.id, judge.id, samples_per_key))
    out_dir.mkdir(parents=True, exist_ok=True)
    pages = write_rollout_pages(out_dir, sweep.name, rollouts, counts, graders_of(names),
                                samples_per_key)
    page = render_page(sweep.name, facts, judge, rates, plots, pages, total, samples_per_key,
                       ci_method, {name: layer_test_html(*d) for name, d in decided.items()})
    readout = readout_section(readouts, title)
    page = page.replace('<section id="browser">', calibration + readout + '<section id="browser">',
                        1)
    path = out_dir / REPORT_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(page, encoding="utf-8", errors="replace")  # a lone surrogate becomes "?"
    os.replace(partial, path)
    return path


def read_rollouts(store: Store, sweep_id: int, judge_id: int | None,
                  cap: int) -> list[dict[str, Any]]:
    """The rollout pages' rollouts, read in a session of their own (for a thread)."""
    with store.read() as session:
        return browser_rollouts(session, sweep_id, judge_id, cap)


def shared_across_threads(store: Store) -> bool:
    """False for an in-memory SQLite store, where each thread would open a database of its own."""
    url = store.engine.url
    return url.get_backend_name() != "sqlite" or url.database not in (None, "", ":memory:")


def reusable(report: "Report", sweep: str, experiments: list[str],
             judge_config_id: int | None) -> bool:
    """Whether `build_report`'s rates are the ones this page draws: the same sweep, every
    experiment in order, no --net, the same judge config (asked for, or chosen the same way)."""
    return (report.sweep == sweep and not report.net
            and [e.name for e in report.experiments] == experiments
            and (judge_config_id is None or report.judge.id == judge_config_id))


def graders_of(experiments: list[str]) -> dict[str, list[str]]:
    """The graders each experiment's answers go to: coherence and its detection grader."""
    return {
        name: [g for g in GRADERS if g in ("coherence", EXPERIMENTS[name].detection_grader)]
        for name in experiments
    }


def any_scored(rates: ExperimentRates) -> bool:
    return any(n for line in rates.keys for n in line.n_scored)


def figure_png(rates: ExperimentRates, title: str,
               ci_method: str = DEFAULT_CI_METHOD, decided: LayerTest | None = None) -> str:
    """The report's sweep plot of one experiment with its 95% bands and the layers its layer
    test flags shaded (patchdb.report.plots) as a PNG data URI."""
    return png_data_uri(sweep_figure(rates, title, ci=True, ci_method=ci_method,
                                     decided=decided))


def _band_text(lower: float, upper: float) -> str:
    if math.isnan(lower) or math.isnan(upper):
        return '<span class="band">n/a</span>'
    return f'<span class="band">{percent(lower)}-{percent(upper)}</span>'


def rate_table(rates: ExperimentRates, ci_method: str = DEFAULT_CI_METHOD) -> str:
    """Rows are patch layers; columns are the target words (pairs: mean over source words) or
    the steered words and their mean; rates in whole percent, as the terminal prints them. A
    cell is blank where nothing was scored, and links to its rollouts' page (filtered to its
    word); a bold line's cell also holds its 95% band, named below the table."""
    columns = rates.groups if rates.pairs else rates.keys + rates.groups
    bands = {id(g): line_band(rates, g, ci_method) for g in rates.groups}
    head = "".join(f"<th>{escape(c.label)}</th>" for c in columns)
    lines = [f'<table class="rates"><thead><tr><th>Layer</th>{head}</tr></thead><tbody>']
    for i, layer in enumerate(rates.layers):
        cells = []
        for column in columns:
            rate = column.rates[i]
            if math.isnan(rate):
                cells.append('<td title="nothing scored"></td>')
                continue
            shade = f"background: rgba(31, 122, 58, {0.08 + 0.6 * rate:.2f})"
            word = column.target_word or column.source_word
            link = escape(page_path(rates.name, layer)
                          + (f"#{urlencode({'word': word})}" if word else ""))
            band = bands.get(id(column))
            extra = "" if band is None else _band_text(band.lower[i], band.upper[i])
            cells.append(f'<td title="{column.n_scored[i]} samples scored; click for the '
                         f'rollouts" style="{shade}"><a href="{link}">{percent(rate)}</a>{extra}</td>')
        lines.append(f"<tr><th>{layer}</th>{''.join(cells)}</tr>")
    if rates.baselines:  # the same target conditions with no patch
        cells = []
        for column in columns:
            b = unpatched(rates, column)
            ref = row_baseline_band(rates, column, ci_method) if id(column) in bands else None
            extra = "" if ref is None else _band_text(ref.lower, ref.upper)
            cells.append(f"<td>{'' if math.isnan(b) else percent(b)}{extra}</td>")
        lines.append(f'<tr class="baseline"><th title="the same target condition with no '
                     f'patch">unpatched</th>{"".join(cells)}</tr>')
    lines.append("</tbody></table>")
    if bands:
        lines.append(f'<p class="muted">Small figures: the 95% band of a mean line '
                     f"({escape(legend_method(list(bands.values())))}).</p>")
    control = control_line(rates, ci_method)
    if control is not None:
        lines.append(f'<p class="note">{escape(control)}</p>')
    return "\n".join(lines)


def render_page(
    sweep: str,
    facts: list[tuple[str, str]],
    judge: JudgeChoice,
    rates: list[ExperimentRates],
    plots: dict[str, str],
    pages: list[RolloutPage],
    total: int,
    cap: int,
    ci_method: str = DEFAULT_CI_METHOD,
    layer_tests: dict[str, str] | None = None,
) -> str:
    """The whole page as one string; every piece of store text passes through escape().
    `pages`: the rollout pages it links to; `layer_tests`: each experiment's layer test as HTML
    (patchdb.report.layer_findings)."""
    generated = utcnow().strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>patchdb report: {escape(sweep)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Sweep {escape(sweep)}</h1>",
        f'<p class="muted">Written by patchdb on {generated}.</p>',
        '<dl class="facts">',
        *(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts),
        "</dl>",
    ]
    if judge.n_configs > 1:
        out.append(f'<p class="note">This sweep has judgments from {judge.n_configs} judge '
                   f"configs; this page shows {escape(judge.description)}.</p>")
    out.append("<nav>" + "".join(f'<a href="#rates-{escape(r.name)}">{escape(r.name)}</a>'
                                 for r in rates) + '<a href="#browser">Rollouts</a></nav>')
    for r in rates:
        out.append(f'<section id="rates-{escape(r.name)}"><h2>{escape(r.name)}</h2>')
        if r.name not in plots:
            why = escape(r.missing or "nothing scored yet")
            out.append(f'<p class="note missing">No rates: {why}</p></section>')
            continue
        out.append(f'<div class="result"><figure><img alt="rate against patch layer, '
                   f'{escape(r.name)}" src="{plots[r.name]}"></figure>')
        what = "target word, averaged over source words" if r.pairs else "steered word"
        gaps = (f'<p class="note missing">Not all scored: {escape(r.missing)}</p>'
                if r.missing else "")
        out.append(f'<div class="table-wrap"><h3>Rate (%) per patch layer and {what}</h3>'
                   f"{rate_table(r, ci_method)}{gaps}"
                   f"{(layer_tests or {}).get(r.name, '')}</div></div></section>")
    out += [pages_index(pages, total, cap, [r.name for r in rates]), "</body></html>"]
    return "\n".join(out)


def pages_index(pages: list[RolloutPage], total: int, cap: int, order: list[str]) -> str:
    """The Rollouts section: what the rollout pages hold, and a table of links to them (rows:
    experiments, in `order`; columns: patch layers, the unpatched ones first; a cell: how many
    rollouts its page holds)."""
    shown = sum(p.shown for p in pages)
    if shown == total:
        note = f"All {total:,} rollouts are in the rollout pages, one page per experiment and layer."
    else:
        note = (f"The rollout pages hold {shown:,} of the {total:,} rollouts: at most {cap} "
                "samples (lowest sample index first) of each key at each patch layer, one page "
                "per experiment and layer. Rates and plots above use every rollout; query the "
                "store for the rest (view rollouts_readable).")
    out = ['<section id="browser"><h2>Rollouts</h2>', f'<p class="note" id="cap-note">{note}</p>']
    if pages:
        layers = sorted({p.layer for p in pages})
        at = {(p.experiment, p.layer): p for p in pages}
        head = "".join(f"<th>{layer}</th>" if layer >= 0 else
                       f"<th>{escape(layer_name(layer).removesuffix(' (no patch)'))}</th>"
                       for layer in layers)
        out.append('<div class="table-wrap"><table class="rates pages"><caption>Rollouts on '
                   "each page; a column per patch layer</caption><thead><tr>"
                   f"<th>Experiment</th>{head}</tr></thead><tbody>")
        for experiment in dict.fromkeys([*order, *(p.experiment for p in pages)]):
            if not any(e == experiment for e, _ in at):
                continue
            cells = "".join(
                "<td></td>" if (page := at.get((experiment, layer))) is None else
                f'<td title="{page.shown:,} of the {page.total:,} rollouts here">'
                f'<a href="{escape(page.path)}">{page.shown:,}</a></td>' for layer in layers)
            out.append(f"<tr><th>{escape(experiment)}</th>{cells}</tr>")
        out.append("</tbody></table></div>")
    out.append("</section>")
    return "\n".join(out)
