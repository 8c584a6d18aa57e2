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


# A sweep with three words a side, 100 samples per key, every count chosen by hand:
# negative words Dust, Milk, Rubber; positive words Bread, Trees, Origami; layers 40 and 41.
N = 100
PAIR_COUNTS = {  # failure_to_success: target -> per source (Dust, Milk, Rubber), per layer
    "Bread": {40: (20, 10, 0), 41: (60, 80, 40)},
    "Trees": {40: (0, 0, 0), 41: (10, 20, 30)},
    "Origami": {40: (50, 70, 90), 41: (100, 100, 100)},
}
SOURCES = ("Dust", "Milk", "Rubber")
SINGLE_COUNTS = {  # unsteered_to_steered: word -> per layer
    "Bread": {40: 10, 41: 60}, "Trees": {40: 0, 41: 90}, "Origami": {40: 25, 41: 30}}
STEERED_COUNTS = {"Bread": {40: 5, 41: 0}, "Trees": {40: 15, 41: 0}, "Origami": {40: 40, 41: 0}}
BASELINES = {
    "failure_to_success": {"Bread": (30, N), "Trees": (0, N), "Origami": (80, N)},
    "unsteered_to_steered": {"Bread": (20, N), "Trees": (50, N), "Origami": (10, N)},
    # the false-positive rate: 29/100, where 0.29 * 100 is 28.999999999999996 in floating point
    "steered_to_unsteered": {"(none)": (29, N)},
}


def hand_sweep(root: Path, layers: tuple[int, ...] = (40, 41)) -> Path:
    """The hand-counted sweep above as a JSON tree (optionally on other patch layers, the
    counts of 40 and 41 moved to them in order)."""
    moved = dict(zip((40, 41), layers, strict=True))
    pairs = {moved[layer]: {f"{s}_to_{t}": (by_layer[layer][i], N)
                            for t, by_layer in PAIR_COUNTS.items()
                            for i, s in enumerate(SOURCES)} for layer in (40, 41)}
    single = {moved[layer]: {w: (c[layer], N) for w, c in SINGLE_COUNTS.items()}
              for layer in (40, 41)}
    steered = {moved[layer]: {w: (c[layer], N) for w, c in STEERED_COUNTS.items()}
               for layer in (40, 41)}
    return write_sweep(root, {"failure_to_success": pairs, "steered_to_unsteered": steered,
                              "unsteered_to_steered": single}, BASELINES)
