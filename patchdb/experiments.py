"""The four experiments (docs/science.md) and the keys each one expects.

A key is (source word, target word). "No steering" is stored as the sentinel
NO_STEERING (the empty string) so that unique constraints still hold: SQL
treats NULLs as distinct. The views show it as "(none)".
"""

from dataclasses import dataclass, replace
from typing import Literal

Steering = Literal["positive", "negative", "none"]
Grader = Literal["coherence", "detection", "detection_identification"]

NO_STEERING = ""
NO_STEERING_LABEL = "(none)"
# A baseline (a target condition generated with no patch) is stored at this patch layer with
# source word NO_STEERING; layer_rates leaves it out and baseline_rates shows it.
BASELINE_LAYER = -1
BASELINE_FOLDER = "baseline"  # the JSON layout's folder for them, beside the layer_<L> folders
# The random-vector control (patchdb.controls): unpatched like a baseline, at this patch layer.
RANDOM_VECTOR_LAYER = -2
RANDOM_VECTOR_FOLDER = "random_vector"
GRADERS: tuple[Grader, ...] = ("coherence", "detection", "detection_identification")


@dataclass(frozen=True)
class ExperimentDef:
    name: str
    source: Steering
    target: Steering
    pairs: bool
    detection_grader: Grader
    baseline: bool = False  # the experiment's baselines: keys are target words (see key_label)


EXPERIMENTS: dict[str, ExperimentDef] = {
    d.name: d
    for d in (
        ExperimentDef("failure_to_success", "negative", "positive", True, "detection_identification"),
        ExperimentDef("success_to_failure", "positive", "negative", True, "detection_identification"),
        ExperimentDef("steered_to_unsteered", "positive", "none", False, "detection"),
        ExperimentDef("unsteered_to_steered", "none", "positive", False, "detection"),
    )
}


def words_for(steering: Steering, positive: list[str], negative: list[str]) -> list[str]:
    """The words a side of an experiment ranges over ([NO_STEERING] for no steering)."""
    if steering == "positive":
        return list(positive)
    if steering == "negative":
        return list(negative)
    return [NO_STEERING]


def experiment_keys(
    exp: ExperimentDef, positive: list[str], negative: list[str]
) -> list[tuple[str, str]]:
    """Every (source word, target word) key the experiment expects at each layer."""
    sources = words_for(exp.source, positive, negative)
    targets = words_for(exp.target, positive, negative)
    if exp.pairs:
        return [(s, t) for s in sources for t in targets]
    if exp.source == "none":
        return [(NO_STEERING, t) for t in targets]
    return [(s, NO_STEERING) for s in sources]


def baseline_targets(exp: ExperimentDef, positive: list[str], negative: list[str]) -> list[str]:
    """The target conditions of an experiment, one baseline each: its target words, or
    [NO_STEERING] (the no-injection control) when its target is unsteered."""
    return words_for(exp.target, positive, negative)


def at_layer(exp: ExperimentDef, patch_layer: int) -> ExperimentDef:
    """The experiment as its rows at this patch layer are keyed: its baselines (and the
    random-vector control, also unpatched) by target."""
    unpatched = patch_layer in (BASELINE_LAYER, RANDOM_VECTOR_LAYER)
    return replace(exp, baseline=True) if unpatched else exp


def layer_folder(patch_layer: int) -> str:
    """The JSON layout's folder for a patch layer: layer_<L>, BASELINE_FOLDER or
    RANDOM_VECTOR_FOLDER."""
    if patch_layer == BASELINE_LAYER:
        return BASELINE_FOLDER
    return RANDOM_VECTOR_FOLDER if patch_layer == RANDOM_VECTOR_LAYER else f"layer_{patch_layer}"


def key_label(exp: ExperimentDef, source: str, target: str) -> str:
    """The key as the JSON layout writes it: "Source_to_Target" or the bare word; a baseline's
    key is its target word, or "(none)" for the no-injection control."""
    if exp.baseline:
        return target if target != NO_STEERING else NO_STEERING_LABEL
    if exp.pairs:
        return f"{source}_to_{target}"
    return source if source != NO_STEERING else target


def judged_word(source: str, target: str) -> str:
    """The word a detection+identification grader looks for: the target's, else the source's."""
    return target if target != NO_STEERING else source
