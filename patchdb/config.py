"""The one home of configuration: a sweep TOML file with `[sweep]` and `[judge]` tables.

Defaults are the default sweep of docs/science.md. Unknown keys are an error naming the key.
"""

import dataclasses
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchdb.controls import CONTROLS
from patchdb.errors import ConfigError
from patchdb.experiments import EXPERIMENTS
from patchdb.ranges import parse_range

DEFAULT_PROMPT_INTRO = (
    "I study the inner workings of language models like you, and I can reach into your "
    "network while you run. I have found the activation patterns that stand for particular "
    "concepts, and I can inject such a pattern into your activations as if it were a thought "
    "of yours. In this session I will inject a thought about some word on half of the trials; "
    "on the other half I will inject nothing. Your task is to tell me whether you notice an "
    "injected thought, and if you do, what it is about."
)
DEFAULT_PROMPT_TRIAL = (
    "Ok, let's get started.\n\n"
    "Trial 1: Do you detect an injected thought? If so, what is the injected thought about?"
)
POSITIVE_WORDS = [
    "Algorithms", "Aquariums", "Bread", "Origami", "Satellites", "Trees", "Vegetables", "Volcanoes",
]
NEGATIVE_WORDS = [
    "Constellations", "Contraptions", "Dust", "Fountains", "Milk", "Mirrors", "Monoliths",
    "Plastic", "Rubber", "Trumpets",
]
DTYPES = ("bfloat16", "float16", "float32")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
VERDICT_MODES = ("last-word", "logprobs")  # how a verdict is read; see docs/judging.md


@dataclass
class JudgeSettings:
    model: str = "openai/gpt-5-nano"
    reasoning: str = "medium"
    concurrency: int = 512
    max_attempts: int = 3
    base_url: str | None = None
    backend: str = "openai"
    batch_size: int = 8  # prompts per forward pass, hf backend only
    max_new_tokens: int = 96  # reply length cap, hf backend only
    verdict: str = "last-word"  # or "logprobs": P(YES) vs P(NO) after the reasoning


@dataclass
class SweepConfig:
    name: str = "default"
    model: str = "google/gemma-3-27b-it"
    model_revision: str | None = None
    dtype: str = "bfloat16"
    steer_layer: int = 38
    strength: float = 4.0
    patch_layers: str = "40-60"
    samples: int = 64
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None  # None: the model's generation config (HF's default 50 if unset)
    top_p: float | None = None  # None: the model's generation config (HF's default 1.0 if unset)
    positive_words: list[str] = field(default_factory=lambda: list(POSITIVE_WORDS))
    negative_words: list[str] = field(default_factory=lambda: list(NEGATIVE_WORDS))
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    prompt_intro: str = DEFAULT_PROMPT_INTRO
    prompt_trial: str = DEFAULT_PROMPT_TRIAL
    controls: list[str] = field(default_factory=list)  # patchdb.controls: random_vector, ...
    judge: JudgeSettings = field(default_factory=JudgeSettings)

    @property
    def layers(self) -> list[int]:
        """The patch layers as a sorted list."""
        return parse_range(self.patch_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


# Keys whose default is None but whose value is a number, not a string.
_OPTIONAL_NUMBERS = {("sweep", "top_k"): int, ("sweep", "top_p"): float}


def _check_type(table: str, key: str, value: Any, default: Any) -> Any:
    where = f"[{table}] {key}"
    number = _OPTIONAL_NUMBERS.get((table, key))
    if number is not None and value is not None and default is None:
        return _check_type(table, key, value, number())
    if isinstance(default, bool) or default is None:
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML has nan and inf; no setting means either
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return list(value)
    return value


def _build(cls: type, table: str, raw: dict[str, Any], skip: tuple[str, ...] = ()) -> Any:
    known = {k: f for k, f in _fields(cls).items() if k not in skip}
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"unknown key {key!r} in [{table}] (known: {', '.join(sorted(known))})"
            )
        values[key] = _check_type(table, key, value, getattr(defaults, key))
    return cls(**values)


def validate(config: SweepConfig) -> SweepConfig:
    """Check values that types alone do not catch. Returns the config for chaining."""
    if not config.name.strip():
        raise ConfigError("[sweep] name must not be empty")
    if config.dtype not in DTYPES:
        raise ConfigError(f"[sweep] dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.steer_layer < 0:
        raise ConfigError("[sweep] steer_layer must be >= 0")
    layers = config.layers
    if layers[0] <= config.steer_layer:
        raise ConfigError(
            f"[sweep] patch_layers must all come after steer_layer {config.steer_layer}, "
            f"got {config.patch_layers!r}"
        )
    if config.samples < 1:
        raise ConfigError("[sweep] samples must be >= 1")
    if config.max_new_tokens < 1:
        raise ConfigError("[sweep] max_new_tokens must be >= 1")
    if config.temperature < 0:
        raise ConfigError("[sweep] temperature must be >= 0 (0 means greedy)")
    if config.top_k is not None and config.top_k < 0:
        raise ConfigError(f"[sweep] top_k must be an integer >= 0 (0 means no top-k), got {config.top_k}")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise ConfigError(f"[sweep] top_p must be in (0, 1] (1 means no top-p), got {config.top_p:g}")
    for side in ("positive_words", "negative_words"):
        words = getattr(config, side)
        for word in words:
            if not word.strip() or word != word.strip() or "_to_" in word or "/" in word:
                raise ConfigError(f"[sweep] {side} has an invalid word {word!r}")
        if len(set(words)) != len(words):
            raise ConfigError(f"[sweep] {side} lists a word twice")
    if not config.experiments:
        raise ConfigError("[sweep] experiments must name at least one experiment")
    for name in config.experiments:
        if name not in EXPERIMENTS:
            raise ConfigError(
                f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})"
            )
    for control in config.controls:
        if control not in CONTROLS:
            raise ConfigError(f"[sweep] controls: unknown control {control!r} "
                              f"(known: {', '.join(CONTROLS)})")
    if len(set(config.controls)) != len(config.controls):
        raise ConfigError("[sweep] controls lists a control twice")
    if "\n\n" not in config.prompt_trial:
        raise ConfigError(
            "[sweep] prompt_trial must have a blank line before its question "
            "(the injection starts there)"
        )
    if config.judge.reasoning not in REASONING_EFFORTS:
        raise ConfigError(
            f"[judge] reasoning must be one of {', '.join(REASONING_EFFORTS)}, "
            f"got {config.judge.reasoning!r}"
        )
    for key in ("concurrency", "max_attempts", "batch_size", "max_new_tokens"):
        if getattr(config.judge, key) < 1:
            raise ConfigError(f"[judge] {key} must be >= 1, got {getattr(config.judge, key)}")
    if config.judge.verdict not in VERDICT_MODES:
        raise ConfigError(f"[judge] verdict must be one of {', '.join(VERDICT_MODES)}, "
                          f"got {config.judge.verdict!r}")
    return config


def config_from_dict(data: dict[str, Any]) -> SweepConfig:
    """Build a validated SweepConfig from parsed TOML (`{"sweep": {...}, "judge": {...}}`)."""
    for table in data:
        if table not in ("sweep", "judge"):
            raise ConfigError(f"unknown table [{table}] (known: [sweep], [judge])")
    sweep_raw = data.get("sweep", {})
    judge_raw = data.get("judge", {})
    if not isinstance(sweep_raw, dict) or not isinstance(judge_raw, dict):
        raise ConfigError("[sweep] and [judge] must be tables")
    config = _build(SweepConfig, "sweep", sweep_raw, skip=("judge",))
    config.judge = _build(JudgeSettings, "judge", judge_raw)
    return validate(config)


# Keys a config may give as a list (a dose series): one sweep per value, or per combination
# when both are lists. Each sweep is named `<name>-steer<L>` / `<name>-strength<S>` (both:
# `<name>-steer<L>-strength<S>`), so a glob such as `<name>-*` selects the series.
DOSE_KEYS = {"steer_layer": "steer", "strength": "strength"}


@dataclass
class ConfigSeries:
    """What one config file defines: a single sweep, or a dose series of sweeps."""

    name: str  # the [sweep] name as written (the series name when `varied` is not empty)
    configs: list[SweepConfig]
    varied: list[str]  # the keys given as lists, in DOSE_KEYS order

    @property
    def is_series(self) -> bool:
        return bool(self.varied)

    def single(self, what: str) -> "SweepConfig":
        """The one sweep it defines; a series is refused, `what` naming the config in the error."""
        if self.is_series:
            raise ConfigError(
                f"{what} gives a list for {' and '.join(self.varied)} (a series of "
                f"{len(self.configs)} sweeps); use `patchdb init` or `patchdb sweep` with it"
            )
        return self.configs[0]


def dose_value_text(value: int | float) -> str:
    """4.0 -> '4', 2.5 -> '2.5', 18 -> '18': a sweep name's suffix, exact (never rounded), so
    two different values never share a name."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def dose_name(name: str, values: dict[str, int | float]) -> str:
    """The predictable name of one sweep of a series, e.g. 'demo-dose-strength8'."""
    return name + "".join(f"-{DOSE_KEYS[k]}{dose_value_text(v)}" for k, v in values.items())


def _dose_lists(sweep_raw: dict[str, Any]) -> dict[str, list[int | float]]:
    """The list-valued dose keys, each list checked: not empty, values of the key's type, no
    value twice (4 and 4.0 are one value)."""
    defaults = SweepConfig()
    lists: dict[str, list[int | float]] = {}
    for key in DOSE_KEYS:
        raw = sweep_raw.get(key)
        if not isinstance(raw, list):
            continue
        if not raw:
            raise ConfigError(f"[sweep] {key} is an empty list (give one value or several)")
        values = [_check_type("sweep", key, v, getattr(defaults, key)) for v in raw]
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise ConfigError(f"[sweep] {key} lists {dose_value_text(twice)} twice")
        lists[key] = values
    return lists


def series_from_dict(data: dict[str, Any]) -> ConfigSeries:
    """Build the sweep(s) a parsed TOML file defines: a list for steer_layer or strength gives
    one validated sweep per value (both lists: per combination), named by dose_name."""
    sweep_raw = data.get("sweep", {})
    lists = _dose_lists(sweep_raw) if isinstance(sweep_raw, dict) else {}
    if not lists:
        config = config_from_dict(data)
        return ConfigSeries(config.name, [config], [])
    name = sweep_raw.get("name", SweepConfig.name)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("[sweep] name must be a non-empty string")
    configs = []
    for combination in itertools.product(*lists.values()):
        values = dict(zip(lists, combination, strict=True))
        raw = {**sweep_raw, **values, "name": dose_name(name, values)}
        configs.append(config_from_dict({**data, "sweep": raw}))
    return ConfigSeries(name, configs, list(lists))


def load_config(path: str | Path | None) -> SweepConfig:
    """Read a sweep TOML file that defines one sweep; None gives the default sweep."""
    return load_series(path).single("the config")


def load_series(path: str | Path | None) -> ConfigSeries:
    """Read a sweep TOML file: one sweep, or a dose series (DOSE_KEYS); None gives the default
    sweep (docs/science.md)."""
    if path is None:
        config = validate(SweepConfig())
        return ConfigSeries(config.name, [config], [])
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file is not UTF-8 text: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {p}: {exc}") from None
    return series_from_dict(data)


# The [sweep] keys that do not change what a sweep measures ("name" is how it is looked up).
# The [judge] table is how to grade it, not what it is: each judge config is its own row.
_NOT_SCIENCE = ("name", "judge")


def science(config: SweepConfig) -> dict[str, Any]:
    """What defines a sweep's results: every [sweep] setting but its name, no [judge] setting."""
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_SCIENCE}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def science_differences(mine: SweepConfig, other: SweepConfig, here: str, there: str) -> str | None:
    """None when the two configs define the same sweep, else every differing key with both
    values on one line, e.g. "strength 4.0 in the store, 8.0 in the config"."""
    a, b = science(mine), science(other)
    parts = [
        f"{key} {_shown(a[key])} {here}, {_shown(b[key])} {there}"
        for key in a if a[key] != b[key]
    ]
    return "; ".join(parts) or None


def config_from_json(text: str) -> SweepConfig:
    """Rebuild a config stored in the sweeps table."""
    data = json.loads(text)
    judge = data.pop("judge", {})
    return config_from_dict({"sweep": data, "judge": judge})
