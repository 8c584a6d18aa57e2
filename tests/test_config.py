"""Range strings and the sweep config."""

import json
from pathlib import Path

import pytest
from click.testing import Result
from conftest import file_digest, run_cli

from patchdb.config import SweepConfig, config_from_dict, config_from_json, load_config, science
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


@pytest.mark.parametrize(("sweep", "message"), [
    ({"top_k": -1}, "[sweep] top_k must be an integer >= 0 (0 means no top-k), got -1"),
    ({"top_k": 1.5}, "[sweep] top_k must be an integer, got 1.5"),
    ({"top_k": True}, "[sweep] top_k must be an integer, got True"),
    ({"top_p": 0}, "[sweep] top_p must be in (0, 1] (1 means no top-p), got 0"),
    ({"top_p": 1.01}, "[sweep] top_p must be in (0, 1] (1 means no top-p), got 1.01"),
    ({"top_p": "0.9"}, "[sweep] top_p must be a number, got '0.9'"),
])
def test_top_k_and_top_p_are_checked(sweep: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"sweep": sweep})
    assert str(info.value) == message


def test_top_k_and_top_p_default_to_unset_and_round_trip() -> None:
    assert (SweepConfig().top_k, SweepConfig().top_p) == (None, None)
    config = config_from_dict({"sweep": {"top_k": 0, "top_p": 1}})
    assert (config.top_k, config.top_p) == (0, 1.0)
    assert config_from_json(config.to_json()) == config
    # A config stored before these keys existed reads back with both unset.
    old = json.loads(SweepConfig().to_json())
    del old["top_k"], old["top_p"]
    assert config_from_json(json.dumps(old)) == SweepConfig()


def test_science_leaves_out_the_name_and_every_judge_setting() -> None:
    assert set(science(SweepConfig())) == {
        "model", "model_revision", "dtype", "steer_layer", "strength", "patch_layers", "samples",
        "max_new_tokens", "temperature", "top_k", "top_p", "positive_words", "negative_words",
        "experiments", "prompt_intro", "prompt_trial", "controls"}


MINI = """\
[sweep]
name = "mini"
model = "smollm2-135m"
steer_layer = 18
patch_layers = "20-21"
samples = 2
positive_words = ["Bread"]
negative_words = ["Dust"]
experiments = ["steered_to_unsteered"]

[judge]
concurrency = 8
"""


def _init(tmp_path: Path, db: Path, text: str, name: str = "a.toml") -> Result:
    path = tmp_path / name
    path.write_text(text)
    return run_cli("init", "--config", path, "--db", db)


def test_init_accepts_a_change_of_judge_settings_only(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    assert _init(tmp_path, db, MINI).exit_code == 0
    before = file_digest(db)
    changed = MINI.replace("concurrency = 8", 'concurrency = 64\nbase_url = "http://x"')
    result = _init(tmp_path, db, changed, "b.toml")
    assert result.exit_code == 0, result.output
    assert "'mini' already registered" in result.output
    assert file_digest(db) == before


def test_init_refuses_new_science_naming_the_key_and_both_values(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite"
    assert _init(tmp_path, db, MINI).exit_code == 0
    before = file_digest(db)
    result = _init(tmp_path, db, MINI.replace("samples = 2", "samples = 2\nstrength = 8.0"), "b.toml")
    assert result.exit_code == 1
    assert result.output == (
        "Error: sweep 'mini' already exists with a different config (strength 4.0 in the store, "
        "8.0 in this config); it holds no results: remove it with `patchdb sweeps rm mini` and "
        "run init again, or choose another name\n")
    result = _init(tmp_path, db, MINI.replace("samples = 2", "samples = 3\ntop_k = 64"), "c.toml")
    assert result.output == (
        "Error: sweep 'mini' already exists with a different config (samples 2 in the store, "
        "3 in this config; top_k None in the store, 64 in this config); it holds no results: "
        "remove it with `patchdb sweeps rm mini` and run init again, or choose another name\n")
    assert file_digest(db) == before


def test_merge_accepts_other_judge_settings_and_refuses_other_science(tmp_path: Path) -> None:
    here, other, bad = (tmp_path / f"{n}.sqlite" for n in ("here", "other", "bad"))
    assert _init(tmp_path, here, MINI).exit_code == 0
    assert _init(tmp_path, other, MINI.replace("concurrency = 8", "concurrency = 99")).exit_code == 0
    result = run_cli("merge", other, "--db", here)
    assert result.exit_code == 0, result.output
    assert _init(tmp_path, bad, MINI.replace("samples = 2", "samples = 2\nstrength = 8.0")).exit_code == 0
    before = file_digest(here)
    result = run_cli("merge", bad, "--db", here)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: cannot merge {bad}: its sweep 'mini' has a different config than in {here}; "
        f"nothing was merged (strength 4.0 in {here}, 8.0 in {bad})\n")
    assert file_digest(here) == before


# TOML spells NaN and infinity `nan`, `inf`, `+inf`, `-inf`; no setting means any of them.
@pytest.mark.parametrize(("line", "message"), [
    ("strength = nan", "[sweep] strength must be a finite number, got nan"),
    ("strength = inf", "[sweep] strength must be a finite number, got inf"),
    ("strength = -inf", "[sweep] strength must be a finite number, got -inf"),
    ("temperature = nan", "[sweep] temperature must be a finite number, got nan"),
    ("temperature = +inf", "[sweep] temperature must be a finite number, got inf"),
    ("top_p = nan", "[sweep] top_p must be a finite number, got nan"),
    ("strength = [4.0, inf]", "[sweep] strength must be a finite number, got inf"),  # a series
    ("strength = [nan, 8.0]", "[sweep] strength must be a finite number, got nan"),
])
def test_nan_and_infinity_are_refused_for_every_number(tmp_path: Path, line: str,
                                                       message: str) -> None:
    db = tmp_path / "runs.sqlite"
    assert _init(tmp_path, db, MINI).exit_code == 0
    before = file_digest(db)
    text = MINI.replace('name = "mini"', f'name = "other"\n{line}')
    result = _init(tmp_path, db, text, "bad.toml")
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")
    assert file_digest(db) == before  # nothing registered, not even the first of a series
    sweep = run_cli("sweep", "--config", tmp_path / "bad.toml", "--db", tmp_path / "new.sqlite")
    assert (sweep.exit_code, sweep.output) == (1, f"Error: {message}\n")
    assert not (tmp_path / "new.sqlite").exists()


@pytest.mark.parametrize("key", ["concurrency", "max_attempts", "batch_size", "max_new_tokens"])
def test_judge_counts_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"judge": {key: 0}})
    assert str(info.value) == f"[judge] {key} must be >= 1, got 0"
