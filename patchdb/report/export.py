"""`report --export-json`: the JSON layout users' scripts already read (the plan's layout).

    <out>/<experiment>/all_layer_scores.json          {"40": {key: rate}}
    <out>/<experiment>/layer_<L>/rollouts.json        {key: [answer, ...]}  (by sample index)
    <out>/<experiment>/layer_<L>/judgments_<g>.json   {key: [true|false|null, ...]}
    <out>/<experiment>/layer_<L>/judge_scores.json    {key: rate}
    <out>/<experiment>/layer_<L>/labels_<grader>.json  human labels (see patchdb.label.transfer)
    <out>/<experiment>/baseline/...                   the same files for the baselines (no patch),
                                                      keyed by target word ("(none)": the control)

Verdict files take the plan's names: a pair experiment's detection+identification verdicts go
to judgments_detection.json. Only at a layer where a pair experiment also holds plain detection
verdicts (imported from a tree of the later naming) is the later naming written instead
(judgments_detection.json plain, judgments_detection_identification.json beside it), so that
importing the export reads every file as the grader it came from.

Keys come in the order the original scripts wrote them: failure_to_success target first
(every source of the first target word, then the next target word), the others source first.
A key whose samples were never scored keeps its place with rate null, where the original
scripts wrote 0.0: null keeps "nothing scored" apart from a measured 0. A judgments file is
written for each grader with at least one judgment at that layer; null is an unparsed (or
missing) verdict.
A layer with no judgment at all gets rollouts.json only and no entry in all_layer_scores.json,
as when the old judge script had not reached it.
Files are written like `json.dump(data, f, indent=4)`: ASCII with \\u escapes, no trailing newline.
"""

import json
import os
import re
from itertools import groupby
from json.encoder import encode_basestring_ascii
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.errors import PatchdbError
from patchdb.experiments import (
    BASELINE_LAYER,
    EXPERIMENTS,
    GRADERS,
    ExperimentDef,
    at_layer,
    baseline_targets,
    experiment_keys,
    key_label,
    layer_folder,
)
from patchdb.label.transfer import export_labels
from patchdb.report.aggregate import ExperimentRates
from patchdb.store.models import Experiment

_UNSAFE = re.compile(r"[^\w.-]+")


def safe_component(name: str) -> str:
    """A user-chosen name made safe as one path component (no separators, no '..')."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "_"
    return cleaned


def inside(base: Path, path: Path) -> Path:
    """Refuse a path that would land outside `base` (a guard for every file we write)."""
    if not path.resolve().is_relative_to(base.resolve()):
        raise PatchdbError(f"refusing to write {path}: it is outside {base}")
    return path


_SCALARS = {True: "true", False: "false", None: "null"}


def _scalar(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return _SCALARS[value]
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    return json.dumps(value)


INDENT = 4  # the original scripts write json.dump(..., indent=4)


def dumps(data: Any) -> str:
    """Exactly `json.dumps(data, indent=INDENT)`, fast for {key: [scalar, ...]}: with an indent
    the json module falls back to pure Python, which costs seconds on a full sweep's answers."""
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, list) for v in data.values()):
        return json.dumps(data, indent=INDENT)
    one, two = " " * INDENT, " " * (2 * INDENT)
    entries = []
    for key, values in data.items():
        if not isinstance(key, str):
            return json.dumps(data, indent=INDENT)
        items = f",\n{two}".join(map(_scalar, values))
        body = f"[\n{two}{items}\n{one}]" if values else "[]"
        entries.append(f"{one}{encode_basestring_ascii(key)}: {body}")
    return "{\n" + ",\n".join(entries) + "\n}"


def write_json(path: Path, data: Any) -> Path:
    """Write JSON the way the old scripts did, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(data), encoding="ascii")
    os.replace(tmp, path)
    return path


def layer_scores(rates: ExperimentRates) -> dict[int, dict[str, float | None]]:
    """{layer: {key: rate}} for every key with rollouts at that layer."""
    result: dict[int, dict[str, float | None]] = {}
    for i, layer in enumerate(rates.layers):
        scores = {line.label: line.rate_at(i) for line in rates.keys if line.present[i]}
        if scores:
            result[layer] = scores
    return result


def original_key_order(exp: ExperimentDef, positive: list[str],
                       negative: list[str]) -> list[tuple[str, str]]:
    """The experiment's keys in the order the original scripts wrote them: a pair experiment
    whose target words are the positive ones (failure_to_success) target first, e.g.
    Dust_to_Bread, Milk_to_Bread, Dust_to_Trees; every other experiment source first."""
    keys = experiment_keys(exp, positive, negative)
    if exp.pairs and exp.target == "positive":
        return sorted(keys, key=lambda key: positive.index(key[1]))  # stable: sources in order
    return keys


def file_names(exp: ExperimentDef, graders: set[str]) -> dict[str, str]:
    """{grader: <name> of its judgments_<name>.json} for the graders judged at one layer: the
    plan's names, which the importer's `file_grader` reads back to the same graders."""
    names: dict[str, str] = {g: g for g in GRADERS if g in graders}
    if exp.pairs and "detection" not in graders and "detection_identification" in graders:
        names["detection_identification"] = "detection"
    return names


_VERDICT_COLUMNS = "".join(
    f", {g}.id IS NOT NULL AS has_{g}, {g}.verdict AS {g}" for g in GRADERS)
_VERDICT_JOINS = "".join(
    f" LEFT JOIN judgments {g} ON {g}.rollout_id = r.id AND {g}.grader = '{g}'"
    f" AND {g}.judge_config_id = :jc" for g in GRADERS)
# One row per rollout with its verdict per grader under the chosen judge config. Each join is
# one lookup in the judgments' unique key, and the ORDER BY is the rollouts' unique key: no sort.
ROLLOUT_VERDICTS_SQL = f"""
SELECT r.patch_layer, r.source_word, r.target_word, r.answer{_VERDICT_COLUMNS}
FROM rollouts r{_VERDICT_JOINS}
WHERE r.experiment_id = :experiment_id
ORDER BY r.experiment_id, r.patch_layer, r.source_word, r.target_word, r.sample_index
"""


def _verdict(value: Any) -> bool | None:
    return None if value is None else bool(value)


def export_experiment(
    session: Session,
    experiment: Experiment,
    config: SweepConfig,
    rates: ExperimentRates,
    judge_config_id: int | None,
    out_dir: Path,
) -> list[Path]:
    """Write one experiment's JSON files under out_dir/<experiment>/; return their paths."""
    exp = EXPERIMENTS[experiment.name]
    folder = inside(out_dir, out_dir / experiment.name)
    words = (config.positive_words, config.negative_words)
    rank = {key_label(exp, *key): i for i, key in enumerate(original_key_order(exp, *words))}
    rank |= {key_label(at_layer(exp, BASELINE_LAYER), "", t): i
             for i, t in enumerate(baseline_targets(exp, *words))}
    scores = layer_scores(rates)
    if rates.baselines:  # written to baseline/judge_scores.json, never to all_layer_scores.json
        scores[BASELINE_LAYER] = {key_label(at_layer(exp, BASELINE_LAYER), "", t):
                                  (None if b.n_scored == 0 else b.rate)
                                  for t, b in rates.baselines.items()}

    def ordered(data: dict[str, Any]) -> dict[str, Any]:
        return {k: data[k] for k in sorted(data, key=lambda k: (rank.get(k, len(rank)), k))}

    written: list[Path] = []
    judged_layers: list[int] = []
    rows = session.execute(text(ROLLOUT_VERDICTS_SQL),
                           {"jc": judge_config_id, "experiment_id": experiment.id})
    # Rows come sorted by layer, key and sample index: each group is one list of a file.
    for layer, layer_rows in groupby(rows, key=itemgetter(0)):
        answers: dict[str, list[str]] = {}
        verdicts: dict[str, dict[str, list[bool | None]]] = {g: {} for g in GRADERS}
        for (source, target), key_rows in groupby(layer_rows, key=itemgetter(1, 2)):
            samples = list(key_rows)
            key = key_label(at_layer(exp, layer), source, target)
            answers[key] = [r[3] for r in samples]
            for g, grader in enumerate(GRADERS):
                has, verdict = 4 + 2 * g, 5 + 2 * g
                if any(r[has] for r in samples):
                    verdicts[grader][key] = [_verdict(r[verdict]) for r in samples]
        layer_dir = inside(folder, folder / layer_folder(int(layer)))
        written.append(write_json(layer_dir / "rollouts.json", ordered(answers)))
        names = file_names(exp, {g for g, by_key in verdicts.items() if by_key})
        for judged, name in names.items():
            written.append(write_json(layer_dir / f"judgments_{name}.json",
                                      ordered(verdicts[judged])))
        if any(verdicts.values()):
            if layer >= 0:  # not a baseline or a control (their own folders only)
                judged_layers.append(layer)
            written.append(write_json(layer_dir / "judge_scores.json",
                                      ordered(scores.get(layer, {}))))
    written += export_labels(session, experiment, folder, write_json)
    written.append(write_json(folder / "all_layer_scores.json", {
        str(layer): ordered(scores.get(layer, {})) for layer in judged_layers}))
    return written
