"""Baselines: each target condition of a sweep generated with no patch (docs/science.md).

A baseline unit is an ExpectedUnit at patch layer BASELINE_LAYER with source word NO_STEERING,
one per target word of an experiment (its steering kept), or one for "no steering" in an
experiment whose target is unsteered: that one is the no-injection control.
"""

from patchdb.config import SweepConfig
from patchdb.experiments import BASELINE_LAYER, NO_STEERING, baseline_targets
from patchdb.store.models import Experiment
from patchdb.store.sweeps import ExpectedUnit, check_sweep_words, experiment_def


def baseline_units(
    config: SweepConfig, experiments: list[Experiment], words: list[str] | None = None
) -> list[ExpectedUnit]:
    """Every baseline unit of the experiments, narrowed to target words in `words`; the
    control, whose target is no word, is the reference of every word and always stays in."""
    if words is not None:
        check_sweep_words(config, words)
    units: list[ExpectedUnit] = []
    for exp in experiments:
        for target in baseline_targets(experiment_def(exp), config.positive_words,
                                       config.negative_words):
            if words is not None and target != NO_STEERING and target not in words:
                continue
            units.append(ExpectedUnit(exp.name, exp.id, BASELINE_LAYER, NO_STEERING, target))
    return units


def is_baseline(patch_layer: int) -> bool:
    """Whether a rollout's patch layer marks a baseline rather than a patch layer."""
    return patch_layer == BASELINE_LAYER
