"""The HTML report: one self-contained page per sweep (plots, rate tables, a rollout browser).

The page works from a file:// URL with no server and no network: CSS and JS are inline, plots
are base64 PNG data URIs, and the rollouts are JSON in a `<script type="application/json">` tag.
A big sweep is capped to a few samples per key and layer; the page says how many it holds.
"""

import base64
import io
import json
import math
import os
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from patchdb.experiments import EXPERIMENTS, GRADERS, at_layer, key_label
from patchdb.report.aggregate import ExperimentRates, JudgeChoice, sweep_rates
from patchdb.report.bands import DEFAULT_CI_METHOD, check_method, legend_method, line_band
from patchdb.report.calibration_html import calibration_section
from patchdb.report.html_assets import CSS, JS
from patchdb.report.layer_findings import decide, layer_test_html
from patchdb.report.layer_test import LayerTest
from patchdb.report.plots import sweep_figure
from patchdb.report.readout_html import readout_section
from patchdb.report.readouts import sweep_readouts
from patchdb.report.tables import control_line, row_baseline_band, unpatched
from patchdb.store import Experiment, Rollout, Store, utcnow
from patchdb.store.baselines import baseline_units
from patchdb.store.readouts import random_vector_units
from patchdb.store.sweeps import expected_units, get_experiments, get_sweep, sweep_config

REPORT_FILE = "report.html"
DEFAULT_SAMPLES_PER_KEY = 3


def write_html_report(
    store: Store,
    sweep_name: str | None,
    out_dir: Path,
    *,
    samples_per_key: int = DEFAULT_SAMPLES_PER_KEY,
    judge_config_id: int | None = None,
    ci_method: str = DEFAULT_CI_METHOD,
) -> Path:
    """Write `<out_dir>/report.html` for the sweep and return its path.

    The rollout browser embeds at most `samples_per_key` samples (lowest sample index first) of
    every key at every patch layer; rates and plots always cover every rollout. The verdicts
    shown are those of `judge_config_id`, by default the judge config that judged most samples.
    Plots and tables carry each bold line's 95% band (over words, or over samples with
    `ci_method` "samples"; patchdb.report.bands).
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
        judge, rates = sweep_rates(session, sweep, config, names, judge_config_id)
        total = count_rollouts(session, sweep.id)
        rollouts = browser_rollouts(session, sweep.id, judge.id, samples_per_key)
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
    graders = graders_of([e.name for e in experiments])
    browser = {
        "experiments": [e.name for e in experiments],
        # Imported or merged rollouts may sit outside the config; keep them reachable.
        "layers": sorted(set(config.layers) | {r["layer"] for r in rollouts}),
        "words": list(dict.fromkeys(config.positive_words + config.negative_words + sorted(
            {w for r in rollouts for w in (r["source"], r["target"]) if w}))),
        "graders": [g for g in GRADERS if any(g in gs for gs in graders.values())],
        "rollout_graders": graders,
        "rollouts": rollouts,
    }
    title = f"{{}} (sweep {sweep.name}, steer layer {config.steer_layer})"
    decided = {r.name: d for r in rates if (d := decide(r))}  # each experiment's layer test
    plots = {r.name: figure_png(r, title.format(r.name), ci_method,
                                decided[r.name][0] if r.name in decided else None)
             for r in rates if any_scored(r)}
    page = render_page(sweep.name, facts, judge, rates, plots, browser, total, samples_per_key,
                       ci_method, {name: layer_test_html(*d) for name, d in decided.items()})
    readout = readout_section(readouts, title)
    page = page.replace('<section id="browser">', calibration + readout + '<section id="browser">',
                        1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(page, encoding="utf-8", errors="replace")  # a lone surrogate becomes "?"
    os.replace(partial, path)
    return path


# The first `cap` samples (by sample index) of every key at every layer. Numbering reads only the
# rollouts' unique index; the score comes from sample_scores one rollout at a time, because
# joining the whole view would materialise it.
PICKED_CTE = """
WITH numbered AS (
    SELECT r.id, ROW_NUMBER() OVER (PARTITION BY r.experiment_id, r.patch_layer, r.source_word,
                                                 r.target_word ORDER BY r.sample_index) AS nth
    FROM rollouts r
    WHERE r.experiment_id IN (SELECT id FROM experiments WHERE sweep_id = :sweep_id)
), picked AS (SELECT id FROM numbered WHERE nth <= :cap)
"""
PICKED_ROLLOUTS_SQL = PICKED_CTE + """
SELECT r.id, e.name AS experiment, r.patch_layer, r.source_word, r.target_word, r.sample_index,
       r.answer, r.n_tokens, r.finish_reason,
       (SELECT ss.score FROM sample_scores ss
        WHERE ss.rollout_id = r.id AND ss.judge_config_id = :judge) AS score
FROM picked p
JOIN rollouts r ON r.id = p.id
JOIN experiments e ON e.id = r.experiment_id
ORDER BY e.id, r.patch_layer, r.source_word, r.target_word, r.sample_index
"""
PICKED_JUDGMENTS_SQL = PICKED_CTE + """
SELECT j.rollout_id, j.grader, j.verdict, j.raw_reply, j.error
FROM picked p JOIN judgments j ON j.rollout_id = p.id
WHERE j.judge_config_id = :judge
"""


def count_rollouts(session: Session, sweep_id: int) -> int:
    return session.scalar(
        select(func.count(Rollout.id))
        .join(Experiment, Experiment.id == Rollout.experiment_id)
        .where(Experiment.sweep_id == sweep_id)
    ) or 0


def browser_rollouts(
    session: Session, sweep_id: int, judge_id: int | None, cap: int
) -> list[dict[str, Any]]:
    """At most `cap` rollouts per key and layer, each with its verdicts and judge replies."""
    params = {"sweep_id": sweep_id, "judge": judge_id, "cap": cap}
    rows: dict[int, dict[str, Any]] = {}
    for r in session.execute(text(PICKED_ROLLOUTS_SQL), params):
        rows[r.id] = {
            "id": r.id,
            "experiment": r.experiment,
            "layer": r.patch_layer,
            "key": key_label(at_layer(EXPERIMENTS[r.experiment], r.patch_layer), r.source_word,
                             r.target_word),
            "source": r.source_word,
            "target": r.target_word,
            "sample": r.sample_index,
            "answer": r.answer,
            "n_tokens": r.n_tokens,
            "finish_reason": r.finish_reason,
            "score": None if r.score is None else int(r.score),
            "judgments": {},
        }
    for j in session.execute(text(PICKED_JUDGMENTS_SQL), params):
        verdict = None if j.verdict is None else bool(j.verdict)
        rows[j.rollout_id]["judgments"][j.grader] = {
            "verdict": verdict, "reply": j.raw_reply, "error": j.error,
        }
    return list(rows.values())


def graders_of(experiments: list[str]) -> dict[str, list[str]]:
    """The graders each experiment's answers go to: coherence and its detection grader."""
    return {
        name: [g for g in GRADERS if g in ("coherence", EXPERIMENTS[name].detection_grader)]
        for name in experiments
    }


def any_scored(rates: ExperimentRates) -> bool:
    return any(n for line in rates.keys for n in line.n_scored)


def figure_png(rates: ExperimentRates, title: str,
               ci_method: str = DEFAULT_CI_METHOD, decided: LayerTest | None = None) -> bytes:
    """The report's sweep plot of one experiment with its 95% bands and the layers its layer
    test flags shaded (patchdb.report.plots) as PNG bytes."""
    buffer = io.BytesIO()
    sweep_figure(rates, title, ci=True, ci_method=ci_method, decided=decided).savefig(
        buffer, format="png", dpi=90)
    return buffer.getvalue()


def json_for_script(value: Any) -> str:
    """JSON that cannot end its <script> tag early: '<', '>' and '&' become \\u escapes."""
    dumped = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return dumped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _band_text(lower: float, upper: float) -> str:
    if math.isnan(lower) or math.isnan(upper):
        return '<span class="band">n/a</span>'
    return f'<span class="band">{lower:.2f}-{upper:.2f}</span>'


def rate_table(rates: ExperimentRates, ci_method: str = DEFAULT_CI_METHOD) -> str:
    """Rows are patch layers; columns are the target words (pairs: mean over source words) or
    the steered words and their mean. A cell is blank where nothing was scored; a bold line's
    cell also holds its 95% band, named below the table."""
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
            query = {"experiment": rates.name, "layer": layer, **({"word": word} if word else {})}
            link = escape("#" + urlencode(query))
            band = bands.get(id(column))
            extra = "" if band is None else _band_text(band.lower[i], band.upper[i])
            cells.append(f'<td title="{column.n_scored[i]} samples scored; click for the '
                         f'rollouts" style="{shade}"><a href="{link}">{rate:.2f}</a>{extra}</td>')
        lines.append(f"<tr><th>{layer}</th>{''.join(cells)}</tr>")
    if rates.baselines:  # the same target conditions with no patch
        cells = []
        for column in columns:
            b = unpatched(rates, column)
            ref = row_baseline_band(rates, column, ci_method) if id(column) in bands else None
            extra = "" if ref is None else _band_text(ref.lower, ref.upper)
            cells.append(f"<td>{'' if math.isnan(b) else f'{b:.2f}'}{extra}</td>")
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
    plots: dict[str, bytes],
    browser: dict[str, Any],
    total: int,
    cap: int,
    ci_method: str = DEFAULT_CI_METHOD,
    layer_tests: dict[str, str] | None = None,
) -> str:
    """The whole page as one string; every piece of store text passes through escape().
    `layer_tests`: each experiment's layer test as HTML (patchdb.report.layer_findings)."""
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
        png = base64.b64encode(plots[r.name]).decode("ascii")
        out.append(f'<div class="result"><figure><img alt="rate against patch layer, {escape(r.name)}" '
                   f'src="data:image/png;base64,{png}"></figure>')
        what = "target word, averaged over source words" if r.pairs else "steered word"
        gaps = (f'<p class="note missing">Not all scored: {escape(r.missing)}</p>'
                if r.missing else "")
        out.append(f'<div class="table-wrap"><h3>Rate per patch layer and {what}</h3>'
                   f"{rate_table(r, ci_method)}{gaps}"
                   f"{(layer_tests or {}).get(r.name, '')}</div></div></section>")
    n_embedded = len(browser["rollouts"])
    if n_embedded == total:
        cap_note = f"All {total:,} rollouts are embedded."
    else:
        cap_note = (f"This page embeds {n_embedded:,} of the {total:,} rollouts: at most {cap} "
                    "samples (lowest sample index first) of each key at each patch layer. "
                    "Rates and plots above use every rollout; query the store for the rest "
                    "(view rollouts_readable).")
    out += [
        '<section id="browser"><h2>Rollouts</h2>',
        f'<p class="note" id="cap-note">{escape(cap_note)}</p>',
        '<noscript><p class="note">The rollout browser needs JavaScript.</p></noscript>',
        '<div id="filters">',
        *(f'<label>{label}<select id="f-{name}"><option value="">all</option></select></label>'
          for name, label in (("experiment", "Experiment"), ("layer", "Patch layer"),
                              ("key", "Key"), ("word", "Word"), ("verdict", "Verdict"))),
        '<label>Answer contains<input id="f-text" type="search"></label>',
        '<label class="inline"><input id="f-open" type="checkbox">expand judge replies</label>',
        '<button id="clear" type="button">Clear filters</button>',
        "</div>",
        '<p id="match-count"></p><div id="rows"></div>',
        '<button id="more" type="button" hidden>Show more</button></section>',
        f'<script type="application/json" id="rollout-data">{json_for_script(browser)}</script>',
        f"<script>{JS}</script>",
        "</body></html>",
    ]
    return "\n".join(out)
