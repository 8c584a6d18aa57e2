"""Stores with hand-chosen counts for the interval tests: a JSON tree in the layout users have,
brought into a real SQLite store with `patchdb import-json`.

Every answer is coherent; a key's detection verdicts are `k` YES then `n - k` NO, so each rate
is exactly k/n. `experiments` maps an experiment to {patch layer: {key: (k, n)}} with keys as the
layout writes them ("Source_to_Target" or the word); `baselines` maps an experiment to
{target word or "(none)": (k, n)}.
"""

import json
from pathlib import Path

from conftest import run_cli

from patchdb.experiments import EXPERIMENTS

Counts = tuple[int, int]
STEER_LAYER = 10


def _dump(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4), encoding="utf-8")


def _write_folder(folder: Path, keys: dict[str, Counts], grader: str) -> None:
    _dump(folder / "rollouts.json", {key: [f"answer {i}" for i in range(n)]
                                     for key, (_, n) in keys.items()})
    _dump(folder / "judgments_coherence.json", {key: [True] * n for key, (_, n) in keys.items()})
    _dump(folder / f"judgments_{grader}.json",
          {key: [True] * k + [False] * (n - k) for key, (k, n) in keys.items()})


def write_sweep(root: Path, experiments: dict[str, dict[int, dict[str, Counts]]],
                baselines: dict[str, dict[str, Counts]] | None = None) -> Path:
    """Write the tree under root and return root."""
    for name, layers in experiments.items():
        grader = EXPERIMENTS[name].detection_grader
        for layer, keys in layers.items():
            _write_folder(root / name / f"layer_{layer}", keys, grader)
        if baselines and name in baselines:
            _write_folder(root / name / "baseline", baselines[name], grader)
    return root


def import_sweep(db: Path, root: Path, name: str) -> None:
    """`patchdb import-json` the tree as sweep `name`."""
    result = run_cli("import-json", str(root), "--db", str(db), "--sweep", name,
                     "--steer-layer", str(STEER_LAYER))
    assert result.exit_code == 0, result.output
