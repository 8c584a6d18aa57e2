"""The readouts in the exported JSON layout: one more file per experiment beside
`all_layer_scores.json`, `all_layer_readouts.json` = {"<layer>": {key: readout}, "baseline":
{target: readout}, "random_vector": {target: readout}}, where a readout is {"p_yes", "p_no",
"entropy", "yes_bias"} (null where absent) and keys are written as in the scores file. Scripts
written for the original layout ignore it."""

import json
import os
from pathlib import Path
from typing import Any

from patchdb.experiments import BASELINE_FOLDER, NO_STEERING_LABEL
from patchdb.report.export import inside, write_json
from patchdb.report.readouts import ExperimentReadouts, readouts_json

READOUTS_FILE = "all_layer_readouts.json"
REPORT_READOUTS_FILE = "readouts.json"  # report --json, beside rates.json


def readout_layers(er: ExperimentReadouts) -> dict[str, dict[str, Any]]:
    """The file's content: each patch layer's keys, then the unpatched and random-vector units."""
    data: dict[str, dict[str, Any]] = {}
    for i, layer in enumerate(er.layers):
        row = {k.label: k.points[i].as_dict() for k in er.keys
               if any(v is not None for v in k.points[i].as_dict().values())}
        if row:
            data[str(layer)] = row
    if er.baselines:
        data[BASELINE_FOLDER] = {w or NO_STEERING_LABEL: p.as_dict()
                                 for w, p in er.baselines.items()}
    if er.random_vector:
        data["random_vector"] = {w: p.as_dict() for w, p in er.random_vector.items()}
    return data


def export_readouts(er: ExperimentReadouts, base: Path) -> list[Path]:
    """Write the experiment's readout file under base/<experiment>/ (none without readouts)."""
    if er.empty:
        return []
    return [write_json(inside(base, base / er.name / READOUTS_FILE), readout_layers(er))]


def write_readouts_json(out_dir: Path, readouts: list[ExperimentReadouts]) -> Path | None:
    """`report --json`'s readouts.json beside rates.json: every readout the report shows
    (patchdb.report.readouts.readouts_json), or nothing when the sweep has none."""
    if not readouts:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_READOUTS_FILE
    tmp = path.with_name(path.name + ".tmp")
    document = {"format": "patchdb-readouts/1", "experiments": readouts_json(readouts)}
    tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path
