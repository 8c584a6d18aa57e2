"""A small sweep in the plan's own JSON layout, written by `write_plan_tree` from hand-chosen values.

    <root>/<experiment>/layer_<L>/rollouts.json             {key: [answer, ...]}
    <root>/<experiment>/layer_<L>/judgments_detection.json  {key: [true|false|null, ...]}
    <root>/<experiment>/layer_<L>/judgments_coherence.json  {key: [true|false|null, ...]}
    <root>/<experiment>/layer_<L>/judge_scores.json         {key: rate}
    <root>/<experiment>/all_layer_scores.json               {"40": {key: rate}, ...}

Files are written with json.dump(..., indent=4), as the original scripts write them. In the
plan's naming a pair experiment's judgments_detection.json holds the detection+identification
verdicts. `naming="split"` writes them to judgments_detection_identification.json instead (the
later judge's naming); `naming="both"` also writes plain detection verdicts to
judgments_detection.json beside it. Layer 42 has rollouts only, as if judging had not reached it.

RATES holds every key's rate worked out by hand from the verdicts below: a sample counts only
where both verdicts are true/false; the rate is the share of counted samples with both true.
"""

import json
from pathlib import Path
from typing import Any

T, F, N = True, False, None
LAYERS = (40, 41, 42)
JUDGED_LAYERS = (40, 41)
SAMPLES = 4
NEGATIVE = ["Dust", "Milk"]
POSITIVE = ["Bread", "Trees"]
# The original scripts write failure_to_success target first: each target word's sources together.
PAIR_KEYS = ["Dust_to_Bread", "Milk_to_Bread", "Dust_to_Trees", "Milk_to_Trees"]
SINGLE_KEYS = ["Bread", "Trees"]
ODD_ANSWERS = [
    "I notice an injected thought about bread \u2014 warm loaves.",
    "",
    "Je d\u00e9tecte une pens\u00e9e : \u00ab arbres \u00bb \U0001f332",
    'Yes. It is about "quotes" and\nnew lines.',
]

COHERENCE: dict[str, dict[int, dict[str, list[bool | None]]]] = {
    "failure_to_success": {
        40: {"Dust_to_Bread": [T, T, T, F], "Dust_to_Trees": [T, N, T, T],
             "Milk_to_Bread": [N, N, N, N], "Milk_to_Trees": [F, F, T, T]},
        41: {"Dust_to_Bread": [T, T, T, T], "Dust_to_Trees": [T, T, F, N],
             "Milk_to_Bread": [T, T, T, T], "Milk_to_Trees": [T, F, T, T]},
    },
    "unsteered_to_steered": {
        40: {"Bread": [T, T, T, F], "Trees": [T, T, T, T]},
        41: {"Bread": [T, N, T, T], "Trees": [F, F, F, F]},
    },
}
# The verdicts the score uses: detection+identification for pairs, detection otherwise.
SCORED: dict[str, dict[int, dict[str, list[bool | None]]]] = {
    "failure_to_success": {
        40: {"Dust_to_Bread": [T, F, T, T], "Dust_to_Trees": [F, T, T, T],
             "Milk_to_Bread": [T, T, T, T], "Milk_to_Trees": [T, T, F, F]},
        41: {"Dust_to_Bread": [T, T, T, F], "Dust_to_Trees": [N, T, T, T],
             "Milk_to_Bread": [F, F, F, F], "Milk_to_Trees": [T, T, T, T]},
    },
    "unsteered_to_steered": {
        40: {"Bread": [T, T, F, T], "Trees": [T, T, T, T]},
        41: {"Bread": [F, F, F, T], "Trees": [T, T, T, T]},
    },
}
# Plain detection verdicts of the pair experiment, written only with naming="both"; they differ
# from SCORED, so reading them as the scored verdicts would change the rates.
PLAIN_DETECTION = {
    40: {"Dust_to_Bread": [T, T, T, T], "Dust_to_Trees": [T, T, T, T],
         "Milk_to_Bread": [F, F, F, F], "Milk_to_Trees": [T, F, T, F]},
    41: {"Dust_to_Bread": [T, T, T, T], "Dust_to_Trees": [T, T, T, T],
         "Milk_to_Bread": [T, T, T, T], "Milk_to_Trees": [T, T, T, T]},
}
RATES: dict[str, dict[int, dict[str, float | None]]] = {
    "failure_to_success": {
        40: {
            "Dust_to_Bread": 2 / 4,  # TT, TF, TT, FT
            "Dust_to_Trees": 2 / 3,  # TF, (null), TT, TT
            "Milk_to_Bread": None,  # no coherence verdict parsed
            "Milk_to_Trees": 0 / 4,  # FT, FT, TF, TF
        },
        41: {
            "Dust_to_Bread": 3 / 4,  # TT, TT, TT, TF
            "Dust_to_Trees": 1 / 2,  # (null), TT, FT, (null)
            "Milk_to_Bread": 0 / 4,  # TF x4
            "Milk_to_Trees": 3 / 4,  # TT, FT, TT, TT
        },
    },
    "unsteered_to_steered": {
        40: {"Bread": 2 / 4, "Trees": 4 / 4},  # Bread: TT, TT, TF, FT
        41: {"Bread": 1 / 3, "Trees": 0 / 4},  # Bread: TF, (null), TF, TT
    },
}


def dump(path: Path, data: Any) -> None:
    """Write a file as the original scripts do: `json.dump(data, f, indent=4)`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(data, f, indent=4)


def answers(key: str, layer: int) -> list[str]:
    """Odd answers (empty, non-ASCII, quotes, new lines), a different mix per key and layer."""
    shift = len(key) + layer
    return [ODD_ANSWERS[(shift + i) % len(ODD_ANSWERS)] for i in range(SAMPLES)]


def write_plan_tree(root: Path, naming: str = "plan") -> Path:
    """Write the tree under root (one folder per experiment) and return root; every file
    lists its keys in the order of PAIR_KEYS or SINGLE_KEYS."""
    for experiment, keys in (("failure_to_success", PAIR_KEYS),
                             ("unsteered_to_steered", SINGLE_KEYS)):
        folder = root / experiment
        pairs = experiment == "failure_to_success"

        def ordered(data: dict[str, Any], keys: list[str] = keys) -> dict[str, Any]:
            return {key: data[key] for key in keys}

        for layer in LAYERS:
            dump(folder / f"layer_{layer}" / "rollouts.json",
                 {key: answers(key, layer) for key in keys})
            if layer not in JUDGED_LAYERS:
                continue
            layer_dir = folder / f"layer_{layer}"
            dump(layer_dir / "judgments_coherence.json", ordered(COHERENCE[experiment][layer]))
            scored_name = "judgments_detection.json"
            if pairs and naming in ("split", "both"):
                scored_name = "judgments_detection_identification.json"
            dump(layer_dir / scored_name, ordered(SCORED[experiment][layer]))
            if pairs and naming == "both":
                dump(layer_dir / "judgments_detection.json", ordered(PLAIN_DETECTION[layer]))
            dump(layer_dir / "judge_scores.json", ordered(RATES[experiment][layer]))
        dump(folder / "all_layer_scores.json",
             {str(layer): ordered(RATES[experiment][layer]) for layer in JUDGED_LAYERS})
    return root


def json_files(root: Path) -> dict[str, bytes]:
    """Every JSON file under root by relative path, as bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json"))}
