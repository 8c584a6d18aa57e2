"""`judge --dry-run` counts what the same command would send now, apart from what waits for
generate, and prices it from the store's own judged calls; every number is counted by hand."""

from pathlib import Path

import pytest
from conftest import file_digest, run_cli
from sqlalchemy.orm import Session
from test_judge_choice import CONFIG

from patchdb.judge.templates import DEFAULT_TEMPLATES
from patchdb.store import JudgeConfig, Judgment, Rollout, open_store
from patchdb.store.models import Experiment

# 2 words x 2 layers x 2 samples = 8 rollouts expected, 16 calls (coherence + detection), and
# the no-injection control's baseline: 2 rollouts, 4 calls.
# The store holds 6 rollouts (Trees at layer 21 and the baseline not generated: 8 calls wait for
# generate).
# Rollouts 1-5 are judged by the default judge: 10 rows = 6 parsed, 3 unparsed, 1 error;
# rollout 6 is not judged (2 calls missing).
UNPARSED = {(1, "detection"), (2, "detection"), (3, "coherence")}
ERRORS = {(4, "detection")}
PROMPT_TOKENS, COMPLETION_TOKENS, COST = 1000, 3000, 0.0015  # on every row without an error


def build(tmp_path: Path, db: Path, cost: float | None = COST) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(CONFIG, encoding="utf-8")
    assert run_cli("init", "--config", config, "--db", db).exit_code == 0
    store = open_store(str(db))

    def fill(s: Session) -> None:
        exp = s.query(Experiment).filter_by(name="steered_to_unsteered").one()
        keys = [("Bread", 20, 0), ("Bread", 20, 1), ("Bread", 21, 0), ("Bread", 21, 1),
                ("Trees", 20, 0), ("Trees", 20, 1)]
        rollouts = [Rollout(experiment_id=exp.id, patch_layer=layer, source_word=word,
                            target_word="", sample_index=i, answer="a")
                    for word, layer, i in keys]
        judge = JudgeConfig(model="openai/gpt-5-nano", reasoning="medium",
                            template_version=DEFAULT_TEMPLATES.version, backend="openai")
        s.add_all([*rollouts, judge])
        s.flush()
        for n, rollout in enumerate(rollouts[:5], start=1):
            for grader in ("coherence", "detection"):
                error = (n, grader) in ERRORS
                s.add(Judgment(
                    rollout_id=rollout.id, grader=grader, judge_config_id=judge.id,
                    verdict=None if error or (n, grader) in UNPARSED else True,
                    error="HTTP 500" if error else None, attempts=1,
                    prompt_tokens=None if error else PROMPT_TOKENS,
                    completion_tokens=None if error else COMPLETION_TOKENS,
                    cost=None if error else cost))

    try:
        store.transact(fill)
    finally:
        store.close()


def dry(db: Path, *args: str) -> list[str]:
    result = run_cli("judge", "--db", db, "--dry-run", *args)
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def total(lines: list[str]) -> list[str]:
    return next(line for line in lines if line.startswith("total")).split()


@pytest.mark.parametrize(("mode", "send"), [
    ("--only-missing", 2), ("--retry-unparsed", 3), ("--retry-errors", 1), ("--overwrite", 12),
])
def test_each_mode_counts_what_it_would_send(tmp_path: Path, db_path: Path, mode: str,
                                             send: int) -> None:
    build(tmp_path, db_path)
    before = file_digest(db_path)
    lines = dry(db_path, mode)
    # calls, judged, send now, awaiting generate
    assert total(lines) == ["total", "20", "10", str(send), "8"]
    assert lines[-3] == (f"{mode} would send {send} calls now, as judge config #1; 8 more "
                         "calls wait for rollouts generate has not written yet.")
    # $0.0015 recorded per call, over the 9 calls without an error
    assert lines[-2] == (f"Estimated cost: ${send * 0.0015:.4f} ($0.001500 per call on average "
                         "over 9 judged calls of judge config #1).")
    assert lines[-1] == "The calls that wait for generate: about $0.0120 more."
    assert file_digest(db_path) == before


def test_limit_caps_what_is_sent(tmp_path: Path, db_path: Path) -> None:
    build(tmp_path, db_path)
    lines = dry(db_path, "--overwrite", "--limit", "5")
    assert lines[-3].startswith("--overwrite would send 5 calls now (--limit 5 of 12), ")
    assert lines[-2].startswith("Estimated cost: $0.0075 (")


def test_prices_per_million_tokens(tmp_path: Path, db_path: Path) -> None:
    build(tmp_path, db_path, cost=None)
    # per call: (1000 x $0.05 + 3000 x $0.40) / 1e6 = $0.00125; 2 calls: $0.0025
    lines = dry(db_path, "--price-in", "0.05", "--price-out", "0.4")
    assert lines[-2] == ("Estimated cost: $0.0025 (1,000 prompt + 3,000 completion tokens per "
                         "call on average over 9 judged calls of judge config #1, at $0.05 / "
                         "$0.4 per million tokens).")
    assert lines[-1] == "The calls that wait for generate: about $0.0100 more."


def test_says_when_it_cannot_price(tmp_path: Path, db_path: Path) -> None:
    build(tmp_path, db_path, cost=None)
    lines = dry(db_path)
    assert lines[-1] == ("Estimated cost: unknown: the judged calls of judge config #1 record "
                         "tokens but no cost; pass --price-in and --price-out (USD per million "
                         "tokens).")
    other = dry(db_path, "--reasoning", "low")  # a judge config that has judged nothing
    assert total(other) == ["total", "20", "0", "12", "8"]
    assert other[-2] == ("--only-missing would send 12 calls now, as a new judge config (these "
                         "settings have judged nothing yet); 8 more calls wait for rollouts "
                         "generate has not written yet.")
    assert other[-1] == ("Estimated cost: unknown: this judge config has no judged call in "
                         "this store yet to take the cost or tokens per call from.")
    one = run_cli("judge", "--db", db_path, "--dry-run", "--price-in", "1")
    assert one.exit_code == 1
    assert one.output == "Error: give both --price-in and --price-out, or neither\n"


def test_nothing_generated_sends_nothing(db_path: Path) -> None:
    """The default sweep before generate: 473,088 calls and 3,456 of the baselines (27 target
    conditions x 64 samples x 2 graders), all waiting for generate."""
    assert run_cli("init", "--db", db_path).exit_code == 0
    lines = dry(db_path)
    assert total(lines) == ["total", "476,544", "0", "0", "476,544"]
    assert lines[-3].startswith("--only-missing would send 0 calls now, as a new judge config")
    assert lines[-2] == "Estimated cost: $0.0000 (nothing to send)."
    assert lines[-1] == ("The calls that wait for generate: cost unknown: this judge config has "
                         "no judged call in this store yet to take the cost or tokens per call "
                         "from.")
