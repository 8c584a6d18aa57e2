"""Grader templates, their version hash, --prompts files, the judged word, and --dry-run."""

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import file_digest, run_cli
from judge_server import FaultServer, fault_server, make_store
from sqlalchemy import select

from patchdb.judge.client import Endpoint, resolve_endpoint, retry_after_s, scrub
from patchdb.judge.templates import DEFAULT_TEMPLATES, Templates, load_templates, trial_question
from patchdb.store import JudgeConfig, Judgment, Rollout, open_store

OLD_VERSION = "c1b163c3d9f1182c"  # the templates before they followed the original's criteria
PREVIOUS_VERSION = "ebc18cbddf5bba7f"  # before: "Trial 1:" shown, no "clear" claim asked for
TRIAL = ("Ok, let's get started.\n\n"
         "Trial 1: Do you detect an injected thought? If so, what is the injected thought about?")
QUESTION = "Do you detect an injected thought? If so, what is the injected thought about?"
# Words that would tell the judge how the experiment works; none may reach a grader's prompt.
EXPERIMENT_WORDS = ("activation", "researcher", "experiment", "network", "steer", "vector",
                    "half of the trials", "on some trials", "interpretability")


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
    assert DEFAULT_TEMPLATES.version not in (OLD_VERSION, PREVIOUS_VERSION)


def test_how_the_question_is_shown_is_part_of_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """User templates render the bare question now too: their judgments from before stay
    under the old version, apart from the new."""
    from patchdb.judge import templates

    mine = Templates(coherence="Is {response} coherent? YES or NO.")
    before = (mine.version, DEFAULT_TEMPLATES.version)
    monkeypatch.setattr(templates, "QUESTION_SHOWN", "the trial turn as it is")
    assert mine.version != before[0] and DEFAULT_TEMPLATES.version != before[1]


@pytest.mark.parametrize(("trial", "question"), [
    (TRIAL, QUESTION),
    ("Ok.\n\nTrial 12 :  What do you notice?", "What do you notice?"),
    ("Ok.\n\nWhat do you notice?", "What do you notice?"),  # no label: shown as it is
    ("Ok.\n\nTrial one: What?", "Trial one: What?"),  # not a "Trial N:" label
    ("Ok.\n\nIn Trial 1: what?", "In Trial 1: what?"),  # a label only at the start
])
def test_the_judge_sees_the_trial_question_without_its_label(trial: str, question: str) -> None:
    assert trial_question(trial) == question


@pytest.mark.parametrize("grader", ["coherence", "detection", "detection_identification"])
def test_a_grader_sees_only_the_bare_question_and_the_answer(grader: str) -> None:
    text = DEFAULT_TEMPLATES.render(grader, TRIAL, "ANSWER-TEXT", "Bread")
    assert text.count(QUESTION) == 1 and text.count("ANSWER-TEXT") == 1
    assert "let's get started" not in text and "Trial" not in text
    assert f"Question:\n{QUESTION}\n" in text
    rest = text.replace(QUESTION, "").replace("ANSWER-TEXT", "").lower()
    assert [w for w in EXPERIMENT_WORDS if w in rest] == []
    assert "first" in rest and rest.rstrip().endswith("write nothing after that word.")
    assert "yes or no" in rest


def test_identification_criteria() -> None:
    """The original's criteria: an implicit claim counts; detection before or along with the
    word; the word first, an unrelated concept, or a physical sense is NO."""
    text = " ".join(DEFAULT_TEMPLATES.render("detection_identification", TRIAL, "a", "Bread")
                    .split())
    assert "affirmatively and clearly claim that it noticed" in text
    assert "The claim may be implicit, as long as it is clear" in text
    assert "does not clearly claim an unusual thought (it says there is none, hedges" in text
    assert 'closely related to "Bread"' in text
    assert 'drawn to the idea of "Bread"' in text  # implicit claim: YES
    assert "before the word, or in the same breath as it" in text
    assert 'very first word is "Bread"' in text
    assert "unrelated" in text and "physical sense" in text


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
    lines = result.output.splitlines()[1:]  # under the "Judge: ..." line
    assert lines[2].split() == ["failure_to_success", "80", "64", "21", "2", "215,040", "0",
                                "0", "215,040"]  # calls, judged, send now, awaiting generate
    # Each experiment's patch-layer row, then its unpatched baseline (one unit per target
    # condition: 8 target words, 10, the single "no steering" control, 8).
    rows = {}
    experiment = ""
    for line in lines[2:10]:
        name, *numbers = line.split()
        if name != "baseline":
            experiment = name
        rows[(experiment, name == "baseline")] = int(numbers[-4].replace(",", ""))
    patch = sum(calls for (_, is_baseline), calls in rows.items() if not is_baseline)
    assert patch == 473_088  # the default sweep's judge calls (SPEC)
    assert rows[("success_to_failure", True)] == 10 * 64 * 2
    assert rows[("steered_to_unsteered", True)] == 1 * 64 * 2
    baselines = (8 + 10 + 1 + 8) * 64 * 2
    assert lines[11].split() == ["total", f"{473_088 + baselines:,}", "0", "0",
                                 f"{473_088 + baselines:,}"]
    assert file_digest(db_path) == before


def test_dry_run_narrowed(db_path: Path) -> None:
    assert run_cli("init", "--db", db_path).exit_code == 0
    result = run_cli("judge", "--db", db_path, "--dry-run", "--layers", "40-41",
                     "--experiments", "steered_to_unsteered", "--graders", "coherence")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()[1:]  # under the "Judge: ..." line
    assert lines[2].split()[-4:] == ["1,024", "0", "0", "1,024"]  # 8 keys x 64 x 2 layers
    assert lines[3].split() == ["baseline", "1", "64", "1", "1", "64", "0", "0", "64"]
    assert lines[5].split() == ["total", "1,088", "0", "0", "1,088"]
    bad = run_cli("judge", "--db", db_path, "--dry-run", "--graders", "honesty")
    assert bad.exit_code == 1 and "unknown grader 'honesty'" in bad.output


# --- through the real judge path, against the loopback server ----------------------------------


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    with fault_server() as srv:
        monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", srv.base_url)
        yield srv


def _rows(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql).fetchall()


def test_identification_asks_about_the_target_word(db_path: Path, server: FaultServer) -> None:
    """Pair experiments: the grader is asked about the target's word, never the source's."""
    make_store(db_path, lambda i, _w: f"rollout-{i:03d}", samples=1)
    result = run_cli("judge", "--db", db_path, "--graders", "detection_identification")
    assert result.exit_code == 0, result.output
    keys = {answer: (source, target) for answer, source, target in _rows(
        db_path, "SELECT answer, source_word, target_word FROM rollouts r JOIN experiments e "
                 "ON e.id = r.experiment_id WHERE e.name IN "
                 "('failure_to_success', 'success_to_failure')")}
    assert len(keys) == 2 * 2 * 2  # (Dust x Bread, Trees) both ways, 2 layers
    prompts = {}
    for body in server.stats.bodies:
        text = body["messages"][0]["content"]
        found = [a for a in keys if a in text]
        assert len(found) == 1
        prompts[found[0]] = text
    assert set(prompts) == set(keys)
    for answer, (source, target) in keys.items():
        assert f'about "{target}"' in prompts[answer]
        assert f'"{source}"' not in prompts[answer] and source not in prompts[answer]


def test_judgments_of_the_old_templates_stay_beside_the_new(
        db_path: Path, server: FaultServer) -> None:
    n = make_store(db_path)
    store = open_store(str(db_path))
    try:
        def old_judgments(session: Any) -> None:
            old = JudgeConfig(model="openai/gpt-5-nano", reasoning="medium",
                              template_version=OLD_VERSION, backend="openai")
            session.add(old)
            session.flush()
            for (rid,) in session.execute(select(Rollout.id)):
                session.add(Judgment(rollout_id=rid, grader="coherence", judge_config_id=old.id,
                                     verdict=False, raw_reply="old NO"))
        store.transact(old_judgments)
    finally:
        store.close()
    result = run_cli("judge", "--db", db_path, "--graders", "coherence")
    assert result.exit_code == 0, result.output
    assert f"Judged {n} calls" in result.output
    configs = _rows(db_path, "SELECT id, template_version FROM judge_configs ORDER BY id")
    assert [v for _, v in configs] == [OLD_VERSION, DEFAULT_TEMPLATES.version]
    assert _rows(db_path, "SELECT judge_config_id, verdict, count(*) FROM judgments "
                          "GROUP BY 1, 2 ORDER BY 1") == [(configs[0][0], 0, n),
                                                          (configs[1][0], 1, n)]
