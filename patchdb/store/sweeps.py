"""Registering sweeps and looking them up: the rows every stage starts from."""

import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig, config_from_json
from patchdb.errors import ConfigError, UnknownNameError
from patchdb.experiments import EXPERIMENTS, ExperimentDef, experiment_keys
from patchdb.store.models import Experiment, Sweep


@dataclass(frozen=True)
class ExpectedUnit:
    """One unit of work: a key of an experiment at one patch layer, all its samples."""

    experiment: str
    experiment_id: int
    patch_layer: int
    source_word: str
    target_word: str


def register_sweep(session: Session, config: SweepConfig) -> tuple[Sweep, bool]:
    """Insert the sweep and its experiments; return (sweep, created).

    Registering the same config again is a no-op. A different config under an existing
    name is refused, so two machines cannot silently disagree about one sweep.
    """
    existing = session.scalar(select(Sweep).where(Sweep.name == config.name))
    if existing is not None:
        if json.loads(existing.config_json) != json.loads(config.to_json()):
            raise ConfigError(
                f"sweep {config.name!r} already exists with a different config; "
                "choose another name"
            )
        return existing, False
    sweep = Sweep(
        name=config.name,
        model=config.model,
        model_revision=config.model_revision,
        dtype=config.dtype,
        steer_layer=config.steer_layer,
        strength=config.strength,
        samples=config.samples,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        config_json=config.to_json(),
    )
    session.add(sweep)
    session.flush()
    for name in config.experiments:
        d = EXPERIMENTS[name]
        session.add(
            Experiment(
                sweep_id=sweep.id,
                name=d.name,
                source_steering=d.source,
                target_steering=d.target,
                pairs=d.pairs,
                detection_grader=d.detection_grader,
            )
        )
    session.flush()
    return sweep, True


def get_sweep(session: Session, name: str | None) -> Sweep:
    """The named sweep; with no name, the only sweep in the store."""
    if name is not None:
        sweep = session.scalar(select(Sweep).where(Sweep.name == name))
        if sweep is None:
            known = session.scalars(select(Sweep.name).order_by(Sweep.name)).all()
            raise UnknownNameError(
                f"no sweep named {name!r} in the store (known: {', '.join(known) or 'none'})"
            )
        return sweep
    sweeps = session.scalars(select(Sweep).order_by(Sweep.id)).all()
    if not sweeps:
        raise UnknownNameError("the store has no sweep yet; run `patchdb init` first")
    if len(sweeps) > 1:
        names = ", ".join(s.name for s in sweeps)
        raise UnknownNameError(f"the store has several sweeps ({names}); choose one with --sweep")
    return sweeps[0]


def sweep_config(sweep: Sweep) -> SweepConfig:
    return config_from_json(sweep.config_json)


def get_experiments(session: Session, sweep: Sweep, names: list[str] | None = None) -> list[Experiment]:
    """The sweep's experiments in config order, narrowed to `names` (unknown names are errors)."""
    rows = session.scalars(
        select(Experiment).where(Experiment.sweep_id == sweep.id).order_by(Experiment.id)
    ).all()
    if names is None:
        return list(rows)
    by_name = {e.name: e for e in rows}
    for name in names:
        if name not in by_name:
            raise UnknownNameError(
                f"unknown experiment {name!r} in sweep {sweep.name!r} "
                f"(known: {', '.join(by_name)})"
            )
    return [by_name[n] for n in names]


def experiment_def(exp: Experiment) -> ExperimentDef:
    return EXPERIMENTS[exp.name]


def expected_units(
    config: SweepConfig,
    experiments: list[Experiment],
    layers: list[int] | None = None,
    words: list[str] | None = None,
) -> list[ExpectedUnit]:
    """Every unit the sweep expects, narrowed by layers and words (a key matches if either
    of its words is listed). Unknown layers or words are errors."""
    all_layers = config.layers
    if layers is not None:
        bad = [layer for layer in layers if layer not in all_layers]
        if bad:
            raise UnknownNameError(
                f"layer {bad[0]} is not a patch layer of sweep {config.name!r} "
                f"(patch layers: {config.patch_layers})"
            )
    if words is not None:
        check_sweep_words(config, words)
    units: list[ExpectedUnit] = []
    for exp in experiments:
        keys = experiment_keys(experiment_def(exp), config.positive_words, config.negative_words)
        for layer in layers if layers is not None else all_layers:
            for source, target in keys:
                if words is not None and source not in words and target not in words:
                    continue
                units.append(ExpectedUnit(exp.name, exp.id, layer, source, target))
    return units


def _named(items: list[str], limit: int, quote: bool) -> str:
    """'a', 'b' and 3 more: a list for one error line, however long the list is."""
    shown = [repr(w) if quote else w for w in items[:limit]]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(shown) + more


def check_sweep_words(config: SweepConfig, words: list[str], where: str = "") -> None:
    """Refuse words that are not the sweep's (`generate --words`, `vectors`), naming them all
    (at most 10, and at most 20 of the sweep's words) in one line."""
    known = set(config.positive_words) | set(config.negative_words)
    unknown = [w for w in dict.fromkeys(words) if w not in known]
    if not unknown:
        return
    noun = "word" if len(unknown) == 1 else "words"
    raise UnknownNameError(
        f"{where}unknown {noun} {_named(unknown, 10, True)} "
        f"(sweep words: {_named(sorted(known), 20, False)})"
    )
