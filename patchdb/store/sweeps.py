"""Registering sweeps and looking them up: the rows every stage starts from."""

import fnmatch
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig, config_from_json, science_differences
from patchdb.errors import ConfigError, UnknownNameError
from patchdb.experiments import EXPERIMENTS, ExperimentDef, experiment_keys
from patchdb.store.models import Experiment, Rollout, Sweep
from patchdb.store.sweep_removal import results_held


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

    Registering the same science again is a no-op (the stored config stays; [judge] settings
    do not define a sweep). Different science under an existing name is refused, naming each
    differing key, so two machines cannot silently disagree about one sweep.
    """
    existing = session.scalar(select(Sweep).where(Sweep.name == config.name))
    if existing is not None:
        differ = science_differences(
            sweep_config(existing), config, "in the store", "in this config"
        )
        if differ is not None:
            way_out = "choose another name"
            if not results_held(session, existing.id):  # nothing lost by removing it
                way_out = (f"it holds no results: remove it with `patchdb sweeps rm "
                           f"{config.name}` and run init again, or {way_out}")
            raise ConfigError(
                f"sweep {config.name!r} already exists with a different config ({differ}); "
                f"{way_out}"
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


def register_sweeps(session: Session, configs: list[SweepConfig]) -> list[tuple[Sweep, bool]]:
    """Register every sweep of a series in the caller's one transaction: if one is refused
    (another config under its name), none is registered."""
    return [register_sweep(session, config) for config in configs]


GLOB_CHARS = "*?["


def is_sweep_pattern(value: str) -> bool:
    """A --sweep value with glob characters (* ? [...]) selects every sweep it matches."""
    return any(c in value for c in GLOB_CHARS)


def match_sweeps(session: Session, pattern: str) -> list[Sweep]:
    """The sweeps whose names match a glob (case-sensitive), in registration order; no match,
    or a '[' never closed, is an error naming the store's sweeps."""
    known = session.scalars(select(Sweep).order_by(Sweep.id)).all()
    names = ", ".join(s.name for s in known) or "none"
    if "[" in pattern and "]" not in pattern[pattern.index("[") + 1:]:
        raise UnknownNameError(f"invalid sweep pattern {pattern!r}: '[' is never closed "
                               f"(sweeps: {names})")
    hits = [s for s in known if fnmatch.fnmatchcase(s.name, pattern)]
    if not hits:
        raise UnknownNameError(f"no sweep matches {pattern!r} (sweeps: {names})")
    return hits


def sweep_names(session: Session, value: str | None) -> list[str | None]:
    """What a --sweep value names: a glob gives every matching sweep, a name itself (None: the
    store's only sweep, found later by get_sweep)."""
    if value is None or not is_sweep_pattern(value):
        return [value]
    if session.scalar(select(Sweep.id).where(Sweep.name == value)) is not None:
        return [value]  # a sweep whose name holds a glob character is still named by it
    return [s.name for s in match_sweeps(session, value)]


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


def record_sampling(session: Session, sweep_id: int, top_k: int, top_p: float) -> None:
    """Write the sweep's resolved top_k and top_p before its first rollout, so the store says
    how it was sampled. Once it has rollouts, a run that would sample otherwise is refused
    (greedy sweeps excepted: no cut changes an argmax)."""
    sweep = session.get(Sweep, sweep_id)
    assert sweep is not None
    unset = sweep.top_k is None or sweep.top_p is None
    if not _has_rollouts(session, sweep_id) or (sweep.temperature == 0 and unset):
        sweep.top_k, sweep.top_p = top_k, top_p
        return
    if sweep.temperature == 0:
        return
    if unset:
        raise ConfigError(
            f"sweep {sweep.name!r} has rollouts from a patchdb that drew from the full softmax "
            f"and did not record top_k / top_p; this run would sample with top_k {top_k}, "
            f"top_p {top_p:g}; register a new sweep to sample the new way"
        )
    for key, stored, now in (("top_k", sweep.top_k, top_k), ("top_p", sweep.top_p, top_p)):
        if stored != now:
            raise ConfigError(
                f"sweep {sweep.name!r} has rollouts sampled with {key} {stored:g}, but this "
                f"run would sample with {key} {now:g} (from the sweep config or the model's "
                "generation config); use the same model, or register a new sweep"
            )


def _has_rollouts(session: Session, sweep_id: int) -> bool:
    return session.scalar(
        select(Rollout.id).join(Experiment, Rollout.experiment_id == Experiment.id)
        .where(Experiment.sweep_id == sweep_id).limit(1)
    ) is not None


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
