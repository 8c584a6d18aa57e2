"""Range strings and the sweep config."""

import pytest

from patchdb.config import SweepConfig, config_from_dict, config_from_json, load_config
from patchdb.errors import ConfigError, RangeError
from patchdb.experiments import EXPERIMENTS, NO_STEERING, experiment_keys, key_label
from patchdb.ranges import format_range, parse_range


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("40-60", list(range(40, 61))),
        ("40,42,44", [40, 42, 44]),
        ("40-60:2", list(range(40, 61, 2))),
        (" 5 , 1-2 ", [1, 2, 5]),
        ("7", [7]),
    ],
)
def test_parse_range(text: str, expected: list[int]) -> None:
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["", "40-", "-3", "a-b", "40-60:0", "60-40", "1,,2", "4.5", "1-3:x"])
def test_parse_range_rejects(text: str) -> None:
    with pytest.raises(RangeError):
        parse_range(text)


@pytest.mark.parametrize(("text", "part"), [
    ("\u0664\u0660-\u0664\u0664", "\u0664\u0660-\u0664\u0664"),  # Arabic-Indic 40-44
    ("\uff14\uff10", "\uff14\uff10"),  # fullwidth 40
    ("40-4\u0664", "40-4\u0664"),  # one non-ASCII digit among ASCII ones
    ("40,\u0968", "\u0968"),  # Devanagari 2
    ("40-60:\u0662", "40-60:\u0662"),  # Arabic-Indic step
    ("\u00b2", "\u00b2"),  # superscript two (str.isdigit() says yes)
])
def test_parse_range_takes_ascii_digits_only(text: str, part: str) -> None:
    with pytest.raises(RangeError) as info:
        parse_range(text)
    assert str(info.value) == (
        f"invalid range {text!r}: cannot read {part!r} (expected e.g. '40-60', '40,42,44' or '40-60:2')"
    )


def test_format_range_round_trips() -> None:
    for values in ([40, 41, 42, 50], [1], [3, 5, 7]):
        assert parse_range(format_range(values)) == values


def test_default_config_is_spec_default_sweep() -> None:
    config = load_config(None)
    assert (config.model, config.steer_layer, config.strength) == ("google/gemma-3-27b-it", 38, 4.0)
    assert config.layers == list(range(40, 61))
    assert (config.samples, config.temperature, config.max_new_tokens) == (64, 1.0, 100)
    keys = {
        name: len(experiment_keys(d, config.positive_words, config.negative_words))
        for name, d in EXPERIMENTS.items()
    }
    assert keys == {"failure_to_success": 80, "success_to_failure": 80,
                    "steered_to_unsteered": 8, "unsteered_to_steered": 8}
    assert sum(keys.values()) * 64 * 21 == 236_544
    assert config.judge.model == "openai/gpt-5-nano" and config.judge.reasoning == "medium"
    assert config.judge.concurrency == 512 and config.judge.max_attempts == 3


def test_config_json_round_trip() -> None:
    config = config_from_dict({"sweep": {"name": "x", "samples": 3}, "judge": {"concurrency": 8}})
    again = config_from_json(config.to_json())
    assert again == config


def test_patch_layers_must_follow_steer_layer() -> None:
    with pytest.raises(ConfigError, match="after steer_layer"):
        config_from_dict({"sweep": {"steer_layer": 40, "patch_layers": "38-45"}})


def test_words_must_be_usable_as_keys() -> None:
    with pytest.raises(ConfigError, match="invalid word"):
        config_from_dict({"sweep": {"positive_words": ["Bread_to_Milk"]}})
    with pytest.raises(ConfigError, match="twice"):
        config_from_dict({"sweep": {"negative_words": ["Dust", "Dust"]}})


def test_key_labels() -> None:
    pair = EXPERIMENTS["failure_to_success"]
    single = EXPERIMENTS["unsteered_to_steered"]
    assert key_label(pair, "Dust", "Bread") == "Dust_to_Bread"
    assert key_label(single, NO_STEERING, "Bread") == "Bread"
    assert key_label(EXPERIMENTS["steered_to_unsteered"], "Trees", NO_STEERING) == "Trees"


def test_dataclass_defaults_are_not_shared() -> None:
    a, b = SweepConfig(), SweepConfig()
    a.positive_words.append("Zebras")
    assert "Zebras" not in b.positive_words
