"""`judge --verdict logprobs`: the verdict is the likelier of YES and NO as the next token after
the judge's reasoning, over a real socket (tests/judge_server.py returns hand-chosen logprobs);
the migration that stores P(YES), cut-off replies and the verdict mode; merge carrying them."""

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from conftest import run_cli
from judge_server import FaultServer, fault_server, make_store

from patchdb.judge.logprobs import balanced_p_yes, p_yes_from_top, token_answer, verdict_of
from patchdb.store import open_store
from patchdb.store.migrate import alembic_config, current_revision, head_revision

N_ROLLOUTS = 32  # make_store's small sweep


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    with fault_server() as srv:
        monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", srv.base_url)
        yield srv


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_tokens_that_stand_for_yes_and_no() -> None:
    assert [token_answer(t) for t in ("YES", " Yes", "yes\n", "Y", " ye", "NO", " no", "N")] == [
        True, True, True, True, True, False, False, False]
    assert [token_answer(t) for t in ("", " ", "Yes.", "Nope", "maybe", "yess", "nob")] == [
        None] * 7


def test_both_orders_are_balanced_in_log_odds_by_hand() -> None:
    # 0.8 and 0.2: a lean of the same size either way cancels
    assert balanced_p_yes([0.8, 0.2]) == pytest.approx(0.5, abs=1e-12)
    # odds 9 and 1: mean log-odds ln 3, so P(YES) = 3 / 4
    assert balanced_p_yes([0.9, 0.5]) == pytest.approx(0.75, abs=1e-12)
    assert balanced_p_yes([None, 0.3]) == pytest.approx(0.3, abs=1e-12)
    assert balanced_p_yes([None, None]) is None
    assert balanced_p_yes([1.0, 0.0]) == pytest.approx(0.5, abs=1e-6)


def test_p_yes_from_top_logprobs_by_hand() -> None:
    # e^-0.2 + e^-2.0 = 0.8187 + 0.1353 for YES, e^-1.5 = 0.2231 for NO; "Maybe" does not count
    assert p_yes_from_top([("YES", -0.2), (" Yes", -2.0), ("NO", -1.5), ("Maybe", -0.1)]) == (
        pytest.approx(0.9540 / (0.9540 + 0.2231), abs=1e-4))
    assert p_yes_from_top([("NO", -0.01), ("Hmm", -5.0)]) == 0.0
    assert p_yes_from_top([("Maybe", -0.1), ("Hmm", -1.0)]) is None
    assert p_yes_from_top([("YES", -1.0), ("YES", -1.0), ("NO", -1.0)]) == 0.5  # counted once
    assert [verdict_of(p) for p in (0.51, 0.49, 0.5, None)] == [True, False, None, None]


TOPS = [  # (directive, P(YES) by hand)
    ("YES:-0.1|NO:-2.5", math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.5))),
    ("_No:-0.3|_Yes:-1.4|Maybe:-2", math.exp(-1.4) / (math.exp(-1.4) + math.exp(-0.3))),
    ("Y:-0.7|yes:-1.2|N:-0.9|no:-3", (math.exp(-0.7) + math.exp(-1.2))
     / (math.exp(-0.7) + math.exp(-1.2) + math.exp(-0.9) + math.exp(-3))),
    ("Maybe:-0.2|Perhaps:-1.1", None),  # neither word in the top twenty: unparsed
]


def answer_with_top(i: int, word: str) -> str:
    return f"I notice {word}. ({i}) [[top={TOPS[i % len(TOPS)][0]}]] [[reply=none]]"


def test_api_logprobs_verdicts_through_a_real_socket(db_path: Path, server: FaultServer) -> None:
    make_store(db_path, answer=answer_with_top)
    result = run_cli("judge", "--db", db_path, "--verdict", "logprobs", "--concurrency", "8")
    assert result.exit_code == 0, result.output
    # 8 rollouts per directive, two graders each; the reasoning ends in no verdict word
    assert "Judged 64 calls" in result.output
    assert "32 yes, 16 no, 16 unparsed, 0 errors" in result.output
    stored = rows(db_path, "SELECT r.answer, j.verdict, j.p_yes, j.cut_off, j.raw_reply, "
                           "j.prompt_tokens, j.completion_tokens FROM judgments j "
                           "JOIN rollouts r ON r.id = j.rollout_id")
    assert len(stored) == 64
    for answer, verdict, p_yes, cut_off, raw, prompt_tokens, completion_tokens in stored:
        i = int(answer.split("(")[1].split(")")[0])
        expected = TOPS[i % len(TOPS)][1]
        assert p_yes == (None if expected is None else pytest.approx(expected, abs=1e-9))
        assert verdict == (None if expected is None else int(expected > 0.5))
        assert cut_off == 0 and raw == "The answer was read with care. No verdict here."
        assert (prompt_tokens, completion_tokens) == (300, 22)  # all three requests' usage
    assert rows(db_path, "SELECT verdict_mode, backend FROM judge_configs") == [
        ("logprobs", "openai")]
    verdict_requests = [b for b in server.stats.bodies if b.get("logprobs")]
    assert len(verdict_requests) == 128 and len(server.stats.bodies) == 192
    orders = sorted(b["messages"][2]["content"] for b in verdict_requests)
    assert orders == ["Give your verdict now in one word: NO or YES."] * 64 + [
        "Give your verdict now in one word: YES or NO."] * 64
    body = verdict_requests[0]
    assert (body["max_tokens"], body["top_logprobs"]) == (1, 20) and "reasoning" not in body
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == "The answer was read with care. No verdict here."
    assert "YES or NO" in body["messages"][2]["content"]

    # the last-word mode is another judge config: its judgments stay apart
    before = len(server.stats.bodies)
    last_word = run_cli("judge", "--db", db_path)
    assert last_word.exit_code == 0, last_word.output
    assert "0 yes, 0 no, 64 unparsed" in last_word.output
    assert not any(b.get("logprobs") for b in server.stats.bodies[before:])
    assert rows(db_path, "SELECT verdict_mode, count(j.id) FROM judge_configs c "
                         "JOIN judgments j ON j.judge_config_id = c.id GROUP BY c.id "
                         "ORDER BY c.id") == [("logprobs", 64), ("last-word", 64)]
    assert rows(db_path, "SELECT count(*) FROM judgments WHERE p_yes IS NOT NULL") == [(48,)]


def test_a_server_without_logprobs_stops_the_run(db_path: Path, server: FaultServer) -> None:
    make_store(db_path, answer="I notice {word}. ({i}) [[nologprobs]]")
    result = run_cli("judge", "--db", db_path, "--verdict", "logprobs", "--concurrency", "1")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        f"Error: the judge API at {server.base_url} returned no logprobs; --verdict logprobs "
        "needs a server that does (vLLM, llama.cpp server), or use --verdict last-word "
        "(0 judgments saved)")
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(0,)]


def test_an_unknown_verdict_mode_is_refused(db_path: Path) -> None:
    make_store(db_path)
    result = run_cli("judge", "--db", db_path, "--verdict", "tea-leaves")
    assert result.exit_code == 1 and "'tea-leaves' is not one of 'last-word', 'logprobs'" in (
        result.output)
    bad = db_path.parent / "bad.toml"
    bad.write_text('[sweep]\nname = "x"\n[judge]\nverdict = "maybe"\n')
    init = run_cli("init", "--db", db_path.parent / "other.sqlite", "--config", bad)
    assert init.exit_code == 1
    assert init.output == ("Error: [judge] verdict must be one of last-word, logprobs, "
                           "got 'maybe'\n")


def test_api_cut_off_reply_is_marked_and_shown_apart(db_path: Path, server: FaultServer) -> None:
    """A reply still cut off after every attempt: an error row marked cut off; status counts
    it under "cut off", not under errors or unparsed."""
    make_store(db_path, answer=lambda i, w: f"{w} ({i})" + (" [[fault=length*9]]" if i < 3
                                                             else " [[reply=none]]" if i < 5
                                                             else ""))
    result = run_cli("judge", "--db", db_path, "--max-attempts", "2")
    assert result.exit_code == 0, result.output
    assert rows(db_path, "SELECT count(*), sum(cut_off), sum(error IS NOT NULL) FROM judgments "
                         "WHERE verdict IS NULL") == [(10, 6, 6)]
    status = run_cli("status", "--db", db_path)
    total = [line for line in status.output.splitlines() if line.startswith("total")][0]
    assert total.split()[-3:] == ["4", "6", "0"]  # unparsed, cut off, errors
    assert "unparsed cut off errors" in status.output


def _judgment_rows(db: Path) -> list[tuple]:
    return rows(db, "SELECT r.patch_layer, r.source_word, r.target_word, r.sample_index, "
                    "j.grader, j.verdict, j.p_yes, j.cut_off, c.verdict_mode FROM judgments j "
                    "JOIN rollouts r ON r.id = j.rollout_id "
                    "JOIN judge_configs c ON c.id = j.judge_config_id ORDER BY 1, 2, 3, 4, 5, 9")


def test_merge_carries_p_yes_cut_off_and_the_verdict_mode(tmp_path: Path,
                                                          server: FaultServer) -> None:
    laptop, gpu = tmp_path / "laptop.sqlite", tmp_path / "gpu.sqlite"
    make_store(laptop, answer=answer_with_top)
    make_store(gpu, answer=answer_with_top)
    assert run_cli("judge", "--db", laptop, "--verdict", "logprobs").exit_code == 0
    assert run_cli("judge", "--db", laptop).exit_code == 0  # the same judge, last-word
    with sqlite3.connect(laptop) as conn:  # one cut-off row, as a local judge leaves it
        conn.execute("UPDATE judgments SET cut_off = 1, verdict = NULL, p_yes = NULL "
                     "WHERE id = 1")
    merged = run_cli("merge", "--db", gpu, laptop)
    assert merged.exit_code == 0, merged.output
    copied = _judgment_rows(gpu)
    assert copied == _judgment_rows(laptop) and len(copied) == 128
    assert sum(r[7] for r in copied) == 1 and sum(r[6] is not None for r in copied) == 47
    assert rows(gpu, "SELECT verdict_mode FROM judge_configs ORDER BY id") == [
        ("logprobs",), ("last-word",)]


def test_migration_keeps_judgments_and_marks_old_cut_off_replies(db_path: Path) -> None:
    """A store written before verdict modes: its judgments survive the judge_configs rebuild
    with their ids, an API reply that stayed cut off is marked, and both modes of one judge
    can then be stored."""
    make_store(db_path, patch_layers="2", samples=1)  # 8 rollouts
    store = open_store(str(db_path))
    cfg = alembic_config(store.url)
    with store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
        conn.commit()
    store.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("INSERT INTO judge_configs (id, model, reasoning, template_version, "
                     "backend, created_at) VALUES (7, 'j', 'low', 'v1', 'openai', '2026-11-30')")
        conn.executemany(
            "INSERT INTO judgments (id, rollout_id, grader, judge_config_id, verdict, raw_reply, "
            "error, attempts, created_at) VALUES (?, ?, 'coherence', 7, ?, ?, ?, 3, '2026-11-30')",
            [(11, 1, 1, "... YES", None), (12, 2, None, "cut o",
                                            "reply not finished (finish reason 'length')"),
             (13, 3, None, "hmm", None), (14, 4, None, None, "HTTP 500: boom")])
    assert current_revision(open_store(str(db_path)).engine) == head_revision()
    assert rows(db_path, "SELECT id, rollout_id, verdict, p_yes, cut_off, error IS NOT NULL "
                         "FROM judgments ORDER BY id") == [
        (11, 1, 1, None, 0, 0), (12, 2, None, None, 1, 1), (13, 3, None, None, 0, 0),
        (14, 4, None, None, 0, 1)]
    assert rows(db_path, "SELECT id, verdict_mode FROM judge_configs") == [(7, "last-word")]
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO judge_configs (model, reasoning, template_version, backend, "
                     "verdict_mode, created_at) VALUES ('j', 'low', 'v1', 'openai', 'logprobs', "
                     "'2026-11-30')")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO judge_configs (model, reasoning, template_version, "
                         "backend, created_at) VALUES ('j', 'low', 'v1', 'openai', '2026-11-30')")
