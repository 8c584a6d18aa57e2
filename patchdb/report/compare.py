"""`patchdb report --compare`: several sweeps, or one sweep under several judge configs, side by
side per experiment, with the settings in which they differ said first.

A member of a comparison is a sweep name or glob, optionally with `@judge=ID` (that judge
config's verdicts; otherwise the one rule of patchdb.store.judge_choice). Stores from several
machines are compared after `patchdb merge` has brought the sweeps into one store.
"""

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from patchdb.config import SweepConfig, dose_value_text, science
from patchdb.errors import ConfigError, UnknownNameError
from patchdb.experiments import EXPERIMENTS
from patchdb.report.aggregate import ExperimentRates, JudgeChoice, Line, experiment_rates
from patchdb.report.bands import DEFAULT_CI_METHOD
from patchdb.report.export import safe_component
from patchdb.report.tables import control_line, missing_lead, unpatched
from patchdb.store.judge_choice import choose_judge_config
from patchdb.store.status import prompt_hash
from patchdb.store.sweeps import get_experiments, get_sweep, sweep_config, sweep_names

_JUDGE_SUFFIX = re.compile(r"judge=(\d+)")
GAP = "-"


@dataclass(frozen=True)
class CompareSpec:
    """One argument of --compare: a sweep name or glob, and the judge config asked for."""

    text: str
    sweep: str
    judge_config_id: int | None


def parse_spec(text: str) -> CompareSpec:
    """'A' or 'A@judge=3' (a glob may stand for A); anything else after '@judge' is an error."""
    name, at, suffix = text.rpartition("@")
    if not at or not suffix.startswith("judge"):
        return CompareSpec(text, text, None)
    match = _JUDGE_SUFFIX.fullmatch(suffix)
    if not name or match is None:
        raise ConfigError(f"invalid --compare item {text!r}: expected SWEEP or "
                          "SWEEP@judge=ID, e.g. demo@judge=2")
    return CompareSpec(text, name, int(match.group(1)))


@dataclass
class Member:
    """One compared sweep under one judge config, with its rates per experiment."""

    label: str  # the sweep's name, plus @judge=ID when a judge config was asked for
    sweep: str
    config: SweepConfig
    judge: JudgeChoice
    prompt_hash: str | None
    rates: dict[str, ExperimentRates] = field(default_factory=dict)


@dataclass
class Comparison:
    members: list[Member]
    experiments: list[str]  # every experiment some member has, in the usual order
    differences: list[tuple[str, list[str]]]  # setting, its value per member
    same: list[tuple[str, str]]  # the main settings every member shares


def _judge_text(judge: JudgeChoice) -> str:
    return judge.description.removeprefix("judge config ") if judge.id is not None \
        else "no judgments yet"


def _value_text(value: Any) -> str:
    if value is None:
        return "(model's generation config)"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return dose_value_text(value)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# The settings a comparison names first, then every other setting that defines a sweep.
_MAIN = ("model", "steer layer", "strength", "prompt", "judge")
_IN_MAIN = ("model", "model_revision", "steer_layer", "strength")


def member_settings(member: Member) -> dict[str, str]:
    """What a member is, setting by setting, as shown to the user (all values as text)."""
    config = member.config
    revision = f" @ {config.model_revision}" if config.model_revision else ""
    settings = {
        "model": config.model + revision,
        "steer layer": str(config.steer_layer),
        "strength": dose_value_text(config.strength),
        "prompt": f"sha256 {member.prompt_hash}" if member.prompt_hash else "not rendered yet",
        "judge": _judge_text(member.judge),
    }
    for key, value in science(config).items():
        if key not in _IN_MAIN:
            settings[key] = _value_text(value)
    return settings


def settings_split(members: list[Member]) -> tuple[list[tuple[str, list[str]]],
                                                    list[tuple[str, str]]]:
    """(every setting whose values differ, with each member's value; the main settings that
    are the same in all members)."""
    per_member = [member_settings(m) for m in members]
    differences, same = [], []
    for name in per_member[0]:
        values = [s[name] for s in per_member]
        if len(set(values)) > 1:
            differences.append((name, values))
        elif name in _MAIN:
            same.append((name, values[0]))
    return differences, same


def _resolve(session: Session, texts: list[str]) -> list[tuple[str, Any, JudgeChoice]]:
    """Each argument's sweeps (a glob may match several) with the judge config each is read
    under; the same sweep twice under one judge config, or fewer than two members, is an error."""
    if not texts:
        raise ConfigError("--compare needs two or more sweeps (names, globs or SWEEP@judge=ID)")
    members: list[tuple[str, Any, JudgeChoice]] = []
    seen: dict[tuple[int, int | None], str] = {}
    for spec in map(parse_spec, texts):
        for name in sweep_names(session, spec.sweep):
            sweep = get_sweep(session, name)
            judge = choose_judge_config(session, sweep, spec.judge_config_id)
            label = sweep.name + (f"@judge={spec.judge_config_id}"
                                  if spec.judge_config_id is not None else "")
            key = (sweep.id, judge.id)
            if key in seen:
                under = f"judge config #{judge.id}" if judge.id is not None else "no judge"
                raise ConfigError(f"--compare names sweep {sweep.name!r} twice under {under} "
                                  f"({seen[key]} and {spec.text})")
            seen[key] = spec.text
            members.append((label, sweep, judge))
    if len(members) < 2:
        raise ConfigError(
            f"--compare needs two or more sweeps, or one sweep under two judge configs "
            f"(SWEEP@judge=ID); {', '.join(texts)} gives only {members[0][0]!r}"
        )
    return members


def build_comparison(session: Session, texts: list[str],
                     experiments: list[str] | None = None) -> Comparison:
    """Resolve the --compare arguments and gather every member's rates per experiment."""
    resolved = _resolve(session, texts)
    present: dict[str, None] = {}
    members: list[Member] = []
    for label, sweep, judge in resolved:
        config = sweep_config(sweep)
        names = [e.name for e in get_experiments(session, sweep)]
        wanted = names if experiments is None else [n for n in experiments if n in names]
        member = Member(label, sweep.name, config, judge, prompt_hash(sweep.prompt_text))
        rates = experiment_rates(session, sweep, config, wanted, judge.id) if wanted else []
        member.rates = {r.name: r for r in rates}
        present.update(dict.fromkeys(wanted))
        members.append(member)
    for name in experiments or []:
        if name not in present:
            raise UnknownNameError(f"unknown experiment {name!r}: none of the compared sweeps "
                                   "has it")
    order = [n for n in EXPERIMENTS if n in present]
    differences, same = settings_split(members)
    return Comparison(members, order, differences, same)


LINE_STYLES = ("solid", "dashed", "dotted", "dash-dot")


def style_name(index: int) -> str:
    """How member `index` is drawn, in words (the figure's own line styles follow this list;
    past four, styles repeat with another marker)."""
    return LINE_STYLES[index % len(LINE_STYLES)]


def describe(comparison: Comparison) -> list[str]:
    """The lines printed above the comparison (terminal, figure and HTML page)."""
    members = ", ".join(f"{m.label} ({style_name(i)} line)"
                        for i, m in enumerate(comparison.members))
    lines = [f"Comparing: {members}."]
    if comparison.differences:
        lines.append("Differences: " + "; ".join(f"{name} {' vs '.join(values)}"
                                                 for name, values in comparison.differences)
                     + ".")
    else:
        lines.append("Differences: none in their settings.")
    if comparison.same:
        lines.append("Same: " + "; ".join(f"{name} {value}" for name, value in comparison.same)
                     + ".")
    return lines


def rows_of(rates: ExperimentRates) -> list[Line]:
    """The lines a comparison draws per member: each target word (pairs, mean over sources),
    or each steered word and their mean."""
    return rates.groups if rates.pairs else rates.keys + rates.groups


def shared_layers(comparison: Comparison, experiment: str) -> list[int]:
    """Every patch layer any member has for the experiment: the shared x axis."""
    return sorted({layer for m in comparison.members if experiment in m.rates
                   for layer in m.rates[experiment].layers})


def _percent(value: float | None) -> str:
    return GAP if value is None or math.isnan(value) else f"{round(100 * value)}"


def compare_table(comparison: Comparison, experiment: str,
                  ci_method: str = DEFAULT_CI_METHOD) -> str:
    """Rate in % by patch layer, one row per word and member, members grouped under each word;
    each member's rates sit at its own patch layers."""
    layers = shared_layers(comparison, experiment)
    rows: dict[str, list[tuple[str, Line, list[int]]]] = {}
    for m in comparison.members:
        rates = m.rates.get(experiment)
        for line in rows_of(rates) if rates is not None else []:
            rows.setdefault(line.label, []).append((m.label, line, rates.layers))  # type: ignore[union-attr]
    what = "mean over source words" if EXPERIMENTS[experiment].pairs else "per word"
    if not rows:
        return f"{experiment}: no rates in any compared sweep"
    word_w = max(4, *(len(w) for w in rows))
    member_w = max(5, *(len(m.label) for m in comparison.members))
    cell = max(3, *(len(str(layer)) for layer in layers))
    members = [m for m in comparison.members if experiment in m.rates]
    with_base = any(m.rates[experiment].baselines for m in members)
    header = " ".join([f"{'word':<{word_w}}", f"{'sweep':<{member_w}}",
                       *([f"{'base':>4} |"] if with_base else []),
                       *(f"{layer:>{cell}}" for layer in layers)])
    out = [f"{experiment}: rate in % by patch layer ({what}; {GAP} = nothing scored)",
           header, "-" * len(header)]
    by_label = {m.label: m.rates[experiment] for m in members}
    for word, entries in rows.items():
        for label, line, own_layers in entries:
            at = dict(zip(own_layers, line.rates, strict=True))
            base = ([f"{_percent(unpatched(by_label[label], line)):>4} |"] if with_base else [])
            out.append(" ".join([f"{word:<{word_w}}", f"{label:<{member_w}}", *base,
                                 *(f"{_percent(at.get(layer)):>{cell}}" for layer in layers)]))
    if with_base:
        out.append("base: the same target condition with no patch")
    for m in members:
        control = control_line(m.rates[experiment], ci_method)
        if control is not None:
            out.append(f"{m.label}: {control}")
    for m in members:
        rates = m.rates[experiment]
        if rates.missing:
            out.append(f"{m.label}: {missing_lead(rates)}: {rates.missing}")
    return "\n".join(out)


def default_compare_dir(base: Path, labels: list[str]) -> Path:
    """<base>/compare-<A>-<B>...; a long list is cut and given a hash, so names stay short."""
    name = safe_component("compare-" + "-".join(labels))
    if len(name) > 80:
        digest = hashlib.sha256("\x1f".join(labels).encode()).hexdigest()[:8]
        name = name[:70] + "-" + digest
    return base / name


def any_scored(comparison: Comparison, experiment: str) -> bool:
    return any(n for m in comparison.members if experiment in m.rates
               for line in m.rates[experiment].keys for n in line.n_scored)
