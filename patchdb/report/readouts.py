"""The first-token readouts in the report: per experiment, P(yes), P(no) and the entropy of each
key by patch layer, the bold lines over them (as the rate plot's), each target condition's
unpatched readout, the random-vector control's, the no-injection readout, and the yes-bias
index from the store's `yes_bias` view (docs/science.md). The numbers come from SQL; Python only
arranges them and averages a few of them into the bold lines.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from patchdb.config import SweepConfig
from patchdb.controls import RANDOM_VECTOR_LAYER
from patchdb.experiments import BASELINE_LAYER, EXPERIMENTS, NO_STEERING, experiment_keys, key_label

# The trial question's readouts of the sweep; the yes-bias index joined on where it exists.
READOUTS_SQL = """
SELECT e.name AS experiment, r.patch_layer, r.source_word, r.target_word,
       r.p_yes, r.p_no, r.entropy, b.yes_bias
FROM readouts r
JOIN experiments e ON e.id = r.experiment_id
JOIN sweeps s ON s.id = e.sweep_id
LEFT JOIN yes_bias b ON b.sweep = s.name AND b.experiment = e.name
                    AND b.patch_layer = r.patch_layer AND b.source_word = r.source_word
                    AND b.target_word = r.target_word
WHERE s.name = :sweep AND r.question = ''
"""

MEAN_LABEL = "Mean"
MEASURES = ("p_yes", "p_no", "entropy", "yes_bias")


@dataclass(frozen=True)
class Point:
    """One unit's readout (NaN where absent): P(yes), P(no), entropy, yes-bias index."""

    p_yes: float = math.nan
    p_no: float = math.nan
    entropy: float = math.nan
    yes_bias: float = math.nan

    def as_dict(self) -> dict[str, float | None]:
        return {m: (None if math.isnan(v) else v) for m in MEASURES for v in [getattr(self, m)]}


@dataclass
class ReadoutLine:
    """A key (faint) or a group of keys (bold) across the patch layers."""

    label: str
    source_word: str
    target_word: str
    points: list[Point]

    def values(self, measure: str) -> list[float]:
        return [getattr(p, measure) for p in self.points]


@dataclass
class ExperimentReadouts:
    name: str
    pairs: bool
    layers: list[int]
    keys: list[ReadoutLine] = field(default_factory=list)
    groups: list[ReadoutLine] = field(default_factory=list)
    baselines: dict[str, Point] = field(default_factory=dict)  # by target word ('': none)
    random_vector: dict[str, Point] = field(default_factory=dict)  # by target word
    control: Point | None = None  # nothing injected, nothing patched

    @property
    def empty(self) -> bool:
        return not self.keys and not self.baselines and not self.random_vector

    @property
    def has_yes_bias(self) -> bool:
        points = [p for line in self.keys for p in line.points] + list(self.baselines.values())
        return any(not math.isnan(p.yes_bias) for p in points)


def _mean(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def _group(label: str, target: str, members: list[ReadoutLine], n: int) -> ReadoutLine:
    """The mean of its keys at each layer, measure by measure, over the keys present there."""
    points = [Point(*(_mean([getattr(m.points[i], k) for m in members]) for k in MEASURES))
              for i in range(n)]
    return ReadoutLine(label, "", target, points)


def sweep_readouts(session: Session, sweep: str, config: SweepConfig,
                   experiment_names: list[str]) -> list[ExperimentReadouts]:
    """Per experiment (in the order given) the readouts of the trial question."""
    rows = list(session.execute(text(READOUTS_SQL), {"sweep": sweep}))
    layers = list(config.layers)
    position = {layer: i for i, layer in enumerate(layers)}
    control = next((_point(r) for r in rows if r.patch_layer == BASELINE_LAYER
                    and r.source_word == NO_STEERING and r.target_word == NO_STEERING), None)
    result = []
    for name in experiment_names:
        exp = EXPERIMENTS[name]
        er = ExperimentReadouts(name, exp.pairs, layers, control=control)
        lines: dict[tuple[str, str], ReadoutLine] = {}
        for r in rows:
            if r.experiment != name:
                continue
            if r.patch_layer == BASELINE_LAYER:  # the target condition, unpatched
                er.baselines[r.target_word] = _point(r)
            elif r.patch_layer == RANDOM_VECTOR_LAYER:
                er.random_vector[r.target_word] = _point(r)
            elif r.patch_layer in position:
                key = (r.source_word, r.target_word)
                if key not in lines:
                    lines[key] = ReadoutLine(key_label(exp, *key), *key, [Point()] * len(layers))
                lines[key].points[position[r.patch_layer]] = _point(r)
        rank = {k: i for i, k in enumerate(
            experiment_keys(exp, config.positive_words, config.negative_words))}
        er.keys = [lines[k] for k in sorted(lines, key=lambda k: (rank.get(k, len(rank)), k))]
        if exp.pairs:
            targets = list(dict.fromkeys(line.target_word for line in er.keys))
            er.groups = [_group(t, t, [k for k in er.keys if k.target_word == t], len(layers))
                         for t in targets]
        elif er.keys:
            er.groups = [_group(MEAN_LABEL, "", er.keys, len(layers))]
        result.append(er)
    return result


def _point(row: Any) -> Point:
    def value(x: Any) -> float:
        return math.nan if x is None else float(x)

    return Point(value(row.p_yes), value(row.p_no), value(row.entropy), value(row.yes_bias))


def _cell(value: float) -> str:
    return "    -" if math.isnan(value) else f"{value:5.2f}"


def readout_table(er: ExperimentReadouts) -> str:
    """The bold lines' P(yes) by patch layer (and their yes-bias index where the unrelated
    questions were asked), each with its unpatched value; then the no-injection readout."""
    if er.empty:
        return f"{er.name}: no first-token readouts yet (`patchdb generate --readout-only`)"
    measures = [("p_yes", "")] + ([("yes_bias", "yes-bias ")] if er.has_yes_bias else [])
    width = max([len(prefix + g.label) for _, prefix in measures for g in er.groups] + [6])
    head = f"{'P(yes)':<{width}} " + " ".join(f"{layer:>5}" for layer in er.layers) + "   base"
    lines = [f"First-token readout, {er.name}", head]
    for measure, prefix in measures:
        for g in er.groups:
            words = [g.target_word] if g.target_word else list(
                dict.fromkeys(k.target_word for k in er.keys))
            base = _mean([getattr(er.baselines.get(w, Point()), measure) for w in words])
            lines.append(f"{(prefix + g.label):<{width}} "
                         + " ".join(_cell(v) for v in g.values(measure)) + f"  {_cell(base)}")
    if er.control is not None:
        lines.append(f"no injection: P(yes) {er.control.p_yes:.3f}, P(no) "
                     f"{er.control.p_no:.3f}, entropy {er.control.entropy:.2f} nats")
    return "\n".join(lines)


def readouts_json(ers: list[ExperimentReadouts]) -> dict[str, Any]:
    """Every readout the report shows, by experiment: layers, keys and bold lines (a list of
    values per measure, null where absent), baselines and random-vector units by target word,
    and the no-injection readout."""
    def line(x: ReadoutLine) -> dict[str, Any]:
        return {"label": x.label, **{m: [p.as_dict()[m] for p in x.points] for m in MEASURES}}

    return {er.name: {"layers": er.layers, "keys": [line(k) for k in er.keys],
                      "lines": [line(g) for g in er.groups],
                      "baselines": {w: p.as_dict() for w, p in er.baselines.items()},
                      "random_vector": {w: p.as_dict() for w, p in er.random_vector.items()},
                      "no_injection": er.control.as_dict() if er.control else None}
            for er in ers}
