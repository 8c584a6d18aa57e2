"""The readouts in the exported JSON layout: one more file per experiment beside
`all_layer_scores.json`, `all_layer_readouts.json` = {"<layer>": {key: readout}, "baseline":
{target: readout}, "random_vector": {target: readout}}, where a readout is {"p_yes", "p_no",
"entropy", "yes_bias"} (null where absent) and keys are written as in the scores file. Scripts
written for the original layout ignore it."""

from pathlib import Path
from typing import Any

from patchdb.experiments import BASELINE_FOLDER, NO_STEERING_LABEL
from patchdb.report.export import inside, write_json
from patchdb.report.readouts import ExperimentReadouts

READOUTS_FILE = "all_layer_readouts.json"


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
