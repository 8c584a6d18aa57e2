"""The HTML report's rollout pages: one small static page per experiment and patch layer.

report.html holds the rates, plots and findings and links here; each page under
`rollouts/<experiment>/<layer folder>.html` embeds its own rollouts (at most a few samples per
key, lowest sample index first) as JSON with the filter code inline, so every page opens from
disk (file://) with no server: plain links between pages, no fetch() of local files.
"""

import json
import os
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from patchdb.controls import RANDOM_VECTOR_LAYER
from patchdb.experiments import BASELINE_LAYER, EXPERIMENTS, at_layer, key_label, layer_folder
from patchdb.report.export import safe_component
from patchdb.report.html_assets import CSS, JS
from patchdb.store import Experiment, Rollout

PAGES_DIR = "rollouts"

# The first `cap` samples (by sample index) of every key at every layer, each with the chosen
# judge's judgments (one row per judgment). Each key's cut-off (its `cap`-th lowest sample index)
# is a short walk of the rollouts' unique index, and the rollouts up to it are a range of that
# index: no numbering of every rollout of the sweep (a window over them took twice as long). The
# score comes from sample_scores one rollout at a time, because joining the whole view would
# materialise it.
PICKED_ROLLOUTS_SQL = """
WITH keys AS (
    SELECT DISTINCT experiment_id, patch_layer, source_word, target_word
    FROM rollouts
    WHERE experiment_id IN (SELECT id FROM experiments WHERE sweep_id = :sweep_id)
), cut AS (
    SELECT k.experiment_id, k.patch_layer, k.source_word, k.target_word,
           (SELECT MAX(f.sample_index) FROM (
                SELECT r2.sample_index FROM rollouts r2
                WHERE r2.experiment_id = k.experiment_id AND r2.patch_layer = k.patch_layer
                  AND r2.source_word = k.source_word AND r2.target_word = k.target_word
                ORDER BY r2.sample_index LIMIT :cap) f) AS last_index
    FROM keys k
)
SELECT r.id, e.name AS experiment, r.patch_layer, r.source_word, r.target_word, r.sample_index,
       r.answer, r.n_tokens, r.finish_reason,
       (SELECT ss.score FROM sample_scores ss
        WHERE ss.rollout_id = r.id AND ss.judge_config_id = :judge) AS score,
       j.grader, j.verdict, j.raw_reply, j.error
FROM cut
JOIN rollouts r ON r.experiment_id = cut.experiment_id AND r.patch_layer = cut.patch_layer
               AND r.source_word = cut.source_word AND r.target_word = cut.target_word
               AND r.sample_index <= cut.last_index
JOIN experiments e ON e.id = r.experiment_id
LEFT JOIN judgments j ON j.rollout_id = r.id AND j.judge_config_id = :judge
ORDER BY e.id, r.patch_layer, r.source_word, r.target_word, r.sample_index, j.grader
"""


def json_for_script(value: Any) -> str:
    """JSON that cannot end its <script> tag early: '<', '>' and '&' become \\u escapes."""
    dumped = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return dumped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def layer_name(layer: int) -> str:
    """How a page names a patch layer: the unpatched ones by what they are."""
    if layer == BASELINE_LAYER:
        return "baseline (no patch)"
    return "random vector (no patch)" if layer == RANDOM_VECTOR_LAYER else f"layer {layer}"


def page_path(experiment: str, layer: int) -> str:
    """The page of one experiment at one patch layer, relative to the report folder."""
    return f"{PAGES_DIR}/{safe_component(experiment)}/{layer_folder(layer)}.html"


def rollout_counts(session: Session, sweep_id: int) -> dict[tuple[str, int], int]:
    """(experiment, patch layer) -> how many rollouts the store holds there."""
    rows = session.execute(
        select(Experiment.name, Rollout.patch_layer, func.count(Rollout.id))
        .join(Experiment, Experiment.id == Rollout.experiment_id)
        .where(Experiment.sweep_id == sweep_id)
        .group_by(Experiment.id, Experiment.name, Rollout.patch_layer))
    return {(name, layer): n for name, layer, n in rows}


def browser_rollouts(
    session: Session, sweep_id: int, judge_id: int | None, cap: int
) -> list[dict[str, Any]]:
    """At most `cap` rollouts per key and layer, each with its verdicts and judge replies."""
    params = {"sweep_id": sweep_id, "judge": judge_id, "cap": cap}
    rows: dict[int, dict[str, Any]] = {}
    # rows unpacked by position, all fetched at once: attribute lookups on each Row, fetched
    # one at a time, were most of this loop
    for (rid, experiment, layer, source, target, sample, answer, n_tokens, finish_reason, score,
         grader, verdict, reply, error) in session.execute(text(PICKED_ROLLOUTS_SQL),
                                                          params).all():
        row = rows.get(rid)
        if row is None:
            row = rows[rid] = {
                "id": rid,
                "experiment": experiment,
                "layer": layer,
                "key": key_label(at_layer(EXPERIMENTS[experiment], layer), source, target),
                "source": source,
                "target": target,
                "sample": sample,
                "answer": answer,
                "n_tokens": n_tokens,
                "finish_reason": finish_reason,
                "score": None if score is None else int(score),
                "judgments": {},
            }
        if grader is not None:
            row["judgments"][grader] = {"verdict": None if verdict is None else bool(verdict),
                                        "reply": reply, "error": error}
    return list(rows.values())


@dataclass(frozen=True)
class RolloutPage:
    """One written page: where it is (relative to the report folder) and what it holds."""

    experiment: str
    layer: int
    path: str
    shown: int
    total: int


def _page(sweep: str, experiment: str, layer: int, rollouts: list[dict[str, Any]],
          graders: list[str], siblings: list[int], total: int, cap: int) -> str:
    """One page: a way back, the experiment's other layers, the filters and the data."""
    here = escape(layer_name(layer))
    links = " ".join(
        f"<strong>{escape(layer_name(other))}</strong>" if other == layer else
        f'<a href="{escape(layer_folder(other))}.html">{escape(layer_name(other))}</a>'
        for other in siblings)
    note = (f"All {total:,} rollouts of this experiment at this layer are here." if
            len(rollouts) == total else
            f"This page holds {len(rollouts):,} of the {total:,} rollouts of this experiment at "
            f"this layer: at most {cap} samples (lowest sample index first) of each key. The "
            "report's rates and plots use every rollout; query the store for the rest (view "
            "rollouts_readable).")
    data = {"experiment": experiment, "layer": layer, "layer_name": layer_name(layer),
            "graders": graders, "rollouts": rollouts,
            "words": list(dict.fromkeys(w for r in rollouts for w in (r["source"], r["target"])
                                        if w))}
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>patchdb rollouts: {escape(sweep)}, {escape(experiment)}, {here}</title>",
        f"<style>{CSS}</style></head><body>",
        '<p><a href="../../report.html">Back to the report</a></p>',
        f"<h1>{escape(experiment)}, {here}</h1>",
        f'<p class="muted layers">Sweep {escape(sweep)}. Layers: {links}</p>',
        f'<section id="browser"><p class="note" id="cap-note">{escape(note)}</p>',
        '<noscript><p class="note">The rollout filters need JavaScript.</p></noscript>',
        '<div id="filters">',
        *(f'<label>{label}<select id="f-{name}"><option value="">all</option></select></label>'
          for name, label in (("key", "Key"), ("word", "Word"), ("verdict", "Verdict"))),
        '<label>Answer contains<input id="f-text" type="search"></label>',
        '<label class="inline"><input id="f-open" type="checkbox">expand judge replies</label>',
        '<button id="clear" type="button">Clear filters</button>',
        "</div>",
        '<p id="match-count"></p><div id="rows"></div>',
        '<button id="more" type="button" hidden>Show more</button></section>',
        f'<script type="application/json" id="rollout-data">{json_for_script(data)}</script>',
        f"<script>{JS}</script>",
        "</body></html>",
    ])


def write_rollout_pages(out_dir: Path, sweep: str, rollouts: list[dict[str, Any]],
                        counts: dict[tuple[str, int], int], graders: dict[str, list[str]],
                        cap: int) -> list[RolloutPage]:
    """Write one page per experiment and patch layer that has rollouts; remove the pages an
    earlier report wrote that this one does not (a layer no longer in the store)."""
    by_page: dict[tuple[str, int], list[dict[str, Any]]] = {key: [] for key in counts}
    for r in rollouts:
        by_page.setdefault((r["experiment"], r["layer"]), []).append(r)
    layers_of: dict[str, list[int]] = {}
    for experiment, layer in sorted(by_page):
        layers_of.setdefault(experiment, []).append(layer)
    written: list[RolloutPage] = []
    for (experiment, layer), rows in by_page.items():
        path = page_path(experiment, layer)
        total = counts.get((experiment, layer), len(rows))
        page = _page(sweep, experiment, layer, rows, graders.get(experiment, []),
                     layers_of[experiment], total, cap)
        target = out_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(page, encoding="utf-8", errors="replace")  # a lone surrogate: "?"
        os.replace(partial, target)
        written.append(RolloutPage(experiment, layer, path, len(rows), total))
    keep = {out_dir / p.path for p in written}
    for stale in (out_dir / PAGES_DIR).glob("*/*.html"):
        if stale not in keep:
            stale.unlink()
    return written
