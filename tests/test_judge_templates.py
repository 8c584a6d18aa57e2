"""Grader templates, their version hash, --prompts files, verdict parsing and --dry-run."""

from pathlib import Path

import pytest
from conftest import file_digest, run_cli
from judge_server import make_store

from patchdb.judge.client import Endpoint, resolve_endpoint, retry_after_s, scrub
from patchdb.judge.templates import DEFAULT_TEMPLATES, Templates, load_templates
from patchdb.judge.verdict import parse_verdict


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("The model claims it. YES", True),
        ("reasoning...\n\n**NO**", False),
        ("yes.", True),
        ("Final answer: No!", False),
        ("YES, probably", None),
        ("It is unclear.", None),
        ("", None),
        (None, None),
        ("NO YES maybe", None),
        ("Nope", None),
    ],
)
def test_verdict_is_the_last_word(reply: str | None, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


def test_templates_render_and_version() -> None:
    text = DEFAULT_TEMPLATES.render("detection_identification", "Trial 1?", "I sense bread.",
                                    "Bread")
    assert "I sense bread." in text and "Trial 1?" in text and '"Bread"' in text
    assert text.rstrip().endswith("write nothing after that word.")
    for grader in ("coherence", "detection"):
        assert "YES or NO" in DEFAULT_TEMPLATES.render(grader, "q", "a", "w")
    assert len(DEFAULT_TEMPLATES.version) == 16
    changed = Templates(coherence=DEFAULT_TEMPLATES.coherence + " ")
    assert changed.version != DEFAULT_TEMPLATES.version
    assert Templates().version == DEFAULT_TEMPLATES.version


def test_prompts_file_overrides_one_grader(tmp_path: Path) -> None:
    path = tmp_path / "prompts.toml"
    path.write_text('coherence = "Is {response} coherent? Answer {{YES}} or NO."\n')
    templates = load_templates(path)
    assert templates.coherence.startswith("Is {response}")
    assert templates.detection == DEFAULT_TEMPLATES.detection
    assert templates.render("coherence", "q", "hi", "w") == "Is hi coherent? Answer {YES} or NO."


def test_prompts_file_missing_placeholder_is_refused(db_path: Path, tmp_path: Path) -> None:
    make_store(db_path)
    path = tmp_path / "prompts.toml"
    path.write_text('detection_identification = "Did it say the word in {response}?"\n')
    before = file_digest(db_path)
    result = run_cli("judge", "--db", db_path, "--prompts", path, "--base-url",
                     "http://127.0.0.1:9/v1")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: template 'detection_identification' lacks the placeholder {word}"
    )
    assert file_digest(db_path) == before


def test_prompts_file_unknown_placeholder_and_grader(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text('coherence = "{response} {answer}"\n')
    with pytest.raises(Exception, match=r"unknown placeholder \{answer\}"):
        load_templates(bad)
    bad.write_text('honesty = "{response}"\n')
    with pytest.raises(Exception, match="unknown grader 'honesty'"):
        load_templates(bad)


def test_endpoint_choice_and_key_hygiene() -> None:
    env = {"OPENROUTER_API_KEY": "sk-or-secret", "OPENAI_API_KEY": "sk-oa-secret"}
    assert resolve_endpoint(None, env).base_url == "https://openrouter.ai/api/v1"
    assert resolve_endpoint(None, {"OPENAI_API_KEY": "k"}).base_url == "https://api.openai.com/v1"
    local = resolve_endpoint("http://localhost:8000/v1/", env)
    assert local.base_url == "http://localhost:8000/v1"
    assert local.api_key == "no-key-needed"  # a user's provider key never goes to other hosts
    assert "secret" not in repr(Endpoint("u", "sk-or-secret"))
    assert scrub("bad key sk-or-secret given", "sk-or-secret") == "bad key [redacted] given"
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({}) is None


def test_no_key_is_a_clear_error(db_path: Path) -> None:
    make_store(db_path)
    result = run_cli("judge", "--db", db_path)
    assert result.exit_code == 1
    assert result.output.startswith("Error: no judge API key: set OPENROUTER_API_KEY")


def test_dry_run_default_sweep_totals_473088(db_path: Path) -> None:
    assert run_cli("init", "--db", db_path).exit_code == 0
    before = file_digest(db_path)
    result = run_cli("judge", "--db", db_path, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[2].split() == ["failure_to_success", "80", "64", "21", "2", "215,040", "0",
                                "215,040"]
    assert lines[-1].split() == ["total", "473,088", "0", "473,088"]
    assert file_digest(db_path) == before


def test_dry_run_narrowed(db_path: Path) -> None:
    assert run_cli("init", "--db", db_path).exit_code == 0
    result = run_cli("judge", "--db", db_path, "--dry-run", "--layers", "40-41",
                     "--experiments", "steered_to_unsteered", "--graders", "coherence")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].split() == ["total", "1,024", "0", "1,024"]
    bad = run_cli("judge", "--db", db_path, "--dry-run", "--graders", "honesty")
    assert bad.exit_code == 2 and "unknown grader 'honesty'" in bad.output
