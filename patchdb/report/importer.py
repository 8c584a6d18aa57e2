"""`patchdb import-json`: move a sweep from the JSON layout users already have into the store.

Both namings of the verdict files are read: the plan's (a pair experiment's
judgments_detection.json holds detection+identification verdicts) and the later judge's
(judgments_detection_identification.json beside a plain-detection judgments_detection.json);
see `file_grader`.

Everything is read and checked before anything is written; then one transaction registers the
sweep, inserts the rollouts and judgments the store lacks, and skips those it already has, so
importing twice changes nothing. A file that disagrees with the store is refused, not merged.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig, validate
from patchdb.controls import RANDOM_VECTOR
from patchdb.errors import ConfigError, ImportFormatError
from patchdb.experiments import (
    BASELINE_FOLDER,
    BASELINE_LAYER,
    EXPERIMENTS,
    GRADERS,
    NO_STEERING,
    NO_STEERING_LABEL,
    RANDOM_VECTOR_FOLDER,
    RANDOM_VECTOR_LAYER,
    ExperimentDef,
    at_layer,
)
from patchdb.faults import fault_point
from patchdb.label.transfer import import_labels
from patchdb.ranges import format_range
from patchdb.store import Store
from patchdb.store.models import JudgeConfig, Judgment, Rollout
from patchdb.store.sweeps import get_experiments, register_sweep

IMPORT_JUDGE = {"model": "imported", "reasoning": "none", "template_version": "import-v1",
                "backend": "import"}
DEFAULT_STEER_LAYER = SweepConfig().steer_layer
_LAYER_DIR = re.compile(r"^layer_(\d+)$")
# The folders of unpatched units beside the layer_<L> ones, and the patch layer each stands for.
UNPATCHED_FOLDERS = {BASELINE_FOLDER: BASELINE_LAYER, RANDOM_VECTOR_FOLDER: RANDOM_VECTOR_LAYER}
_JUDGMENTS_FILE = re.compile(r"^judgments_(.+)\.json$")

Key = tuple[str, str]


@dataclass
class LayerData:
    layer: int
    folder: Path
    rollouts: dict[Key, list[str]]
    judgments: dict[str, dict[Key, list[bool | None]]]
    files: dict[str, Path] = field(default_factory=dict)  # grader -> the file its verdicts came from


@dataclass
class ExperimentData:
    name: str
    layers: list[LayerData] = field(default_factory=list)


@dataclass
class ImportPlan:
    """What a tree holds, checked, and the sweep config inferred from it."""

    root: Path
    config: SweepConfig
    experiments: list[ExperimentData]
    score_mismatches: list[Path] = field(default_factory=list)

    @property
    def n_rollouts(self) -> int:
        return sum(len(v) for e in self.experiments for la in e.layers for v in la.rollouts.values())

    @property
    def n_judgments(self) -> int:
        return sum(len(v) for e in self.experiments for la in e.layers
                   for by_key in la.judgments.values() for v in by_key.values())


@dataclass
class ImportResult:
    plan: ImportPlan
    sweep: str
    sweep_created: bool
    new_rollouts: int
    new_judgments: int
    judge_config_id: int | None
    new_labels: int = 0


def _load(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImportFormatError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ImportFormatError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ImportFormatError(
            f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None


def _check_word(path: Path, key: str, word: str) -> str:
    if not word or word != word.strip() or "/" in word or "_to_" in word:
        raise ImportFormatError(f"{path}: key {key!r} has an invalid word {word!r}")
    return word


def parse_key(exp: ExperimentDef, path: Path, key: str) -> Key:
    """A JSON key back to (source word, target word); "" stands for no steering."""
    if exp.baseline:  # the target word, or "(none)" for the no-injection control
        if key == NO_STEERING_LABEL:
            return NO_STEERING, NO_STEERING
        return NO_STEERING, _check_word(path, key, key)
    if exp.pairs:
        parts = key.split("_to_")
        if len(parts) != 2:
            raise ImportFormatError(
                f"{path}: key {key!r} is not Source_to_Target (experiment {exp.name})")
        return _check_word(path, key, parts[0]), _check_word(path, key, parts[1])
    word = _check_word(path, key, key)
    return (NO_STEERING, word) if exp.source == "none" else (word, NO_STEERING)


def _mapping(path: Path, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ImportFormatError(f"{path}: expected an object {{key: ...}}, got {type(data).__name__}")
    return data


def _read_rollouts(exp: ExperimentDef, path: Path) -> dict[Key, list[str]]:
    result: dict[Key, list[str]] = {}
    for key, answers in _mapping(path, _load(path)).items():
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ImportFormatError(f"{path}: key {key!r} must hold a list of answer strings")
        result[parse_key(exp, path, key)] = answers
    return result


def _read_judgments(exp: ExperimentDef, path: Path,
                    rollouts: dict[Key, list[str]]) -> dict[Key, list[bool | None]]:
    result: dict[Key, list[bool | None]] = {}
    for key, verdicts in _mapping(path, _load(path)).items():
        if not isinstance(verdicts, list) or not all(
                v is None or isinstance(v, bool) for v in verdicts):
            raise ImportFormatError(f"{path}: key {key!r} must hold a list of true, false or null")
        parsed = parse_key(exp, path, key)
        if parsed not in rollouts:
            raise ImportFormatError(f"{path}: key {key!r} has no answers in rollouts.json")
        if len(verdicts) != len(rollouts[parsed]):
            raise ImportFormatError(
                f"{path}: key {key!r} has {len(verdicts)} verdicts for "
                f"{len(rollouts[parsed])} answers in rollouts.json")
        result[parsed] = verdicts
    return result


def _read_scores(path: Path, data: Any) -> dict[str, Any]:
    for key, rate in _mapping(path, data).items():
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)):
            raise ImportFormatError(f"{path}: key {key!r} must hold a rate (a number or null)")
    return data


def _expected_rate(exp: ExperimentDef, layer: LayerData, key: Key) -> float | None:
    coherent = layer.judgments.get("coherence", {}).get(key)
    detected = layer.judgments.get(exp.detection_grader, {}).get(key)
    if coherent is None or detected is None:
        return None
    scores = [c and d for c, d in zip(coherent, detected, strict=True)
              if c is not None and d is not None]
    return sum(scores) / len(scores) if scores else None


def file_grader(exp: ExperimentDef, name: str, beside: set[str]) -> str:
    """Which grader's verdicts the file judgments_<name>.json holds, given the names of the
    other judgments files in its layer folder. The plan's layout writes a pair experiment's
    detection+identification verdicts to judgments_detection.json; only where a
    judgments_detection_identification.json is beside it is that file plain detection."""
    if exp.pairs and name == "detection" and "detection_identification" not in beside:
        return "detection_identification"
    return name


def _read_layer(exp: ExperimentDef, folder: Path, layer: int,
                mismatches: list[Path]) -> LayerData | None:
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    found: dict[str, Path] = {}
    for name, path in files.items():
        match = _JUDGMENTS_FILE.match(name)
        if match:
            if match.group(1) not in GRADERS:
                raise ImportFormatError(
                    f"{path}: unknown judgment type {match.group(1)!r} "
                    f"(known: {', '.join(GRADERS)})")
            found[match.group(1)] = path
    judgment_files = {file_grader(exp, name, set(found)): path for name, path in found.items()}
    if "rollouts.json" not in files:
        if judgment_files:
            raise ImportFormatError(f"{folder}: judgments without a rollouts.json")
        return None
    rollouts = _read_rollouts(exp, files["rollouts.json"])
    data = LayerData(layer, folder, rollouts, {
        grader: _read_judgments(exp, path, rollouts) for grader, path in judgment_files.items()},
        judgment_files)
    if "judge_scores.json" in files:
        path = files["judge_scores.json"]
        for key, rate in _read_scores(path, _load(path)).items():
            parsed = parse_key(exp, path, key)
            expected = _expected_rate(exp, data, parsed) if parsed in rollouts else None
            if expected is None and rate == 0.0:
                continue  # nothing scorable: the original scripts wrote 0.0, patchdb null
            if (rate is None) != (expected is None) or (
                    rate is not None and expected is not None
                    and not math.isclose(rate, expected, abs_tol=1e-9)):
                mismatches.append(path)
                break
    return data


def _read_experiment(folder: Path, mismatches: list[Path]) -> ExperimentData:
    exp = EXPERIMENTS[folder.name]
    data = ExperimentData(folder.name)
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir() and child.name in UNPATCHED_FOLDERS:
            where = UNPATCHED_FOLDERS[child.name]
            layer = _read_layer(at_layer(exp, where), child, where, mismatches)
            if layer is not None:
                data.layers.append(layer)
        elif child.is_dir():
            match = _LAYER_DIR.match(child.name)
            if match is None:
                raise ImportFormatError(f"{child}: expected a folder named layer_<number>, "
                                        f"{BASELINE_FOLDER} or {RANDOM_VECTOR_FOLDER}")
            layer = _read_layer(exp, child, int(match.group(1)), mismatches)
            if layer is not None:
                data.layers.append(layer)
        elif child.name == "all_layer_scores.json":
            for layer_key, scores in _mapping(child, _load(child)).items():
                if not layer_key.isdigit():
                    raise ImportFormatError(f"{child}: layer key {layer_key!r} is not a number")
                _read_scores(child, scores)
    data.layers.sort(key=lambda la: la.layer)
    return data


def infer_config(experiments: list[ExperimentData], name: str, model: str,
                 steer_layer: int | None) -> SweepConfig:
    """The sweep config the files imply: words, layers and samples as found."""
    positive: dict[str, None] = {}
    negative: dict[str, None] = {}
    layers: set[int] = set()
    samples = 0
    controls: dict[str, None] = {}
    for data in experiments:
        exp = EXPERIMENTS[data.name]
        for layer in data.layers:
            if layer.layer >= 0:  # not a baseline or a control
                layers.add(layer.layer)
            if layer.layer == RANDOM_VECTOR_LAYER:
                controls[RANDOM_VECTOR] = None
            for (source, target), answers in layer.rollouts.items():
                samples = max(samples, len(answers))
                for word, side in ((source, exp.source), (target, exp.target)):
                    if side != "none" and word != NO_STEERING:  # a baseline has no source
                        (positive if side == "positive" else negative)[word] = None
    if not layers:
        raise ImportFormatError("no rollouts.json found under any layer_<L> folder")
    if steer_layer is None:
        if min(layers) <= DEFAULT_STEER_LAYER:
            raise ImportFormatError(
                f"patch layers start at {min(layers)}, not after the default steer layer "
                f"{DEFAULT_STEER_LAYER}; pass --steer-layer")
        steer_layer = DEFAULT_STEER_LAYER
    config = SweepConfig(
        name=name, model=model, steer_layer=steer_layer, patch_layers=format_range(sorted(layers)),
        samples=max(samples, 1), positive_words=list(positive), negative_words=list(negative),
        experiments=[d.name for d in experiments], controls=list(controls))
    return validate(config)


def read_tree(root: Path, sweep_name: str | None = None, model: str = "unknown",
              steer_layer: int | None = None) -> ImportPlan:
    """Read and check every file under root (one sub-folder per experiment); write nothing."""
    if not root.is_dir():
        raise ImportFormatError(f"{root}: not a folder")
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: list(EXPERIMENTS).index(p.name) if p.name in EXPERIMENTS else -1)
    for folder in folders:
        if folder.name not in EXPERIMENTS:
            raise ImportFormatError(
                f"{folder}: not an experiment folder (known: {', '.join(EXPERIMENTS)})")
    if not folders:
        raise ImportFormatError(
            f"{root}: no experiment folders (expected some of {', '.join(EXPERIMENTS)})")
    mismatches: list[Path] = []
    experiments = [_read_experiment(folder, mismatches) for folder in folders]
    name = sweep_name or root.resolve().name
    try:
        config = infer_config(experiments, name, model, steer_layer)
    except ConfigError as exc:
        raise ImportFormatError(f"{root}: {exc}") from None
    return ImportPlan(root, config, experiments, mismatches)


def _judge_config(session: Session) -> JudgeConfig:
    existing = session.scalar(select(JudgeConfig).filter_by(**IMPORT_JUDGE))
    if existing is not None:
        return existing
    config = JudgeConfig(**IMPORT_JUDGE)
    session.add(config)
    session.flush()
    return config


def _write(session: Session, plan: ImportPlan) -> ImportResult:
    sweep, created = register_sweep(session, plan.config)
    experiment_ids = {e.name: e.id for e in get_experiments(session, sweep)}
    ids = list(experiment_ids.values())

    def existing_rollouts() -> dict[tuple[int, int, str, str, int], tuple[int, str]]:
        rows = session.execute(select(
            Rollout.experiment_id, Rollout.patch_layer, Rollout.source_word, Rollout.target_word,
            Rollout.sample_index, Rollout.id, Rollout.answer,
        ).where(Rollout.experiment_id.in_(ids)))
        return {tuple(r[:5]): (r[5], r[6]) for r in rows}  # type: ignore[misc]

    have = existing_rollouts()
    new_rollouts: list[dict[str, Any]] = []
    for data in plan.experiments:
        eid = experiment_ids[data.name]
        for layer in data.layers:
            for (source, target), answers in layer.rollouts.items():
                for index, answer in enumerate(answers):
                    found = have.get((eid, layer.layer, source, target, index))
                    if found is None:
                        new_rollouts.append(dict(
                            experiment_id=eid, patch_layer=layer.layer, source_word=source,
                            target_word=target, sample_index=index, answer=answer))
                    elif found[1] != answer:
                        raise ImportFormatError(
                            f"{layer.folder / 'rollouts.json'}: sample {index} of "
                            f"{source or '(none)'}/{target or '(none)'} differs from rollout "
                            f"#{found[0]} already in the store; nothing was imported")
    if new_rollouts:
        session.execute(insert(Rollout), new_rollouts)
        have = existing_rollouts()
        fault_point("import.rollouts_inserted")
    judge = _judge_config(session) if plan.n_judgments else None
    new_judgments: list[dict[str, Any]] = []
    if judge is not None:
        verdicts = {(rid, grader): verdict for rid, grader, verdict in session.execute(
            select(Judgment.rollout_id, Judgment.grader, Judgment.verdict)
            .join(Rollout, Rollout.id == Judgment.rollout_id)
            .where(Rollout.experiment_id.in_(ids), Judgment.judge_config_id == judge.id))}
        for data in plan.experiments:
            eid = experiment_ids[data.name]
            for layer in data.layers:
                for grader, by_key in layer.judgments.items():
                    for (source, target), values in by_key.items():
                        for index, verdict in enumerate(values):
                            rid = have[(eid, layer.layer, source, target, index)][0]
                            if (rid, grader) not in verdicts:
                                new_judgments.append(dict(rollout_id=rid, grader=grader,
                                                          judge_config_id=judge.id,
                                                          verdict=verdict))
                            elif verdicts[(rid, grader)] != verdict:
                                raise ImportFormatError(
                                    f"{layer.files[grader]}: sample "
                                    f"{index} of {source or '(none)'}/{target or '(none)'} "
                                    f"differs from the imported verdict already in the store; "
                                    f"nothing was imported")
        if new_judgments:
            session.execute(insert(Judgment), new_judgments)
    new_labels = import_labels(session, [(d.name, la.layer, la.folder) for d in plan.experiments
                                         for la in d.layers], experiment_ids, have, parse_key,
                               _load)
    fault_point("import.before_commit")
    return ImportResult(plan, sweep.name, created, len(new_rollouts), len(new_judgments),
                        judge.id if judge is not None else None, new_labels)


def import_tree(store: Store, plan: ImportPlan) -> ImportResult:
    """Write a checked plan in one transaction: all of it, or (on any conflict) none of it."""
    result = store.transact(lambda session: _write(session, plan))
    fault_point("import.committed")
    return result
