"""`patchdb judge` against a real chat-completions server on loopback that injects faults."""

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from judge_server import COST_PER_CALL, FaultServer, fault_server, make_store

SENTINEL = "sk-sentinel-7f3a9c2e1d4b8a6f"
N_ROLLOUTS = 32  # make_store's small sweep: 8 keys x 2 layers x 2 samples


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", SENTINEL)
    with fault_server(slow_s=5.0) as srv:
        monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", srv.base_url)
        yield srv


def rows(db_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql).fetchall()


def judgments_per_grader(db_path: Path) -> list[tuple]:
    """(rollout id, grader, rows) for every rollout and the graders its experiment needs."""
    return rows(db_path, """
        SELECT r.id, g.grader, (SELECT count(*) FROM judgments j
                                WHERE j.rollout_id = r.id AND j.grader = g.grader)
        FROM rollouts r JOIN experiments e ON e.id = r.experiment_id
        JOIN (SELECT 'coherence' AS grader UNION SELECT 'detection'
              UNION SELECT 'detection_identification') g
          ON g.grader IN ('coherence', e.detection_grader)
        ORDER BY r.id, g.grader""")


def test_every_rollout_gets_one_row_per_grader(db_path: Path, server: FaultServer) -> None:
    assert make_store(db_path) == N_ROLLOUTS
    result = run_cli("judge", "--db", db_path, "--concurrency", "16")
    assert result.exit_code == 0, result.output
    assert f"Judged {2 * N_ROLLOUTS} calls" in result.output
    assert f"{2 * N_ROLLOUTS} yes, 0 no, 0 unparsed, 0 errors" in result.output
    counts = judgments_per_grader(db_path)
    assert len(counts) == 2 * N_ROLLOUTS and {c for _, _, c in counts} == {1}
    assert rows(db_path, "SELECT count(*) FROM judgments")[0][0] == 2 * N_ROLLOUTS
    assert rows(db_path, """SELECT DISTINCT verdict, attempts, prompt_tokens, completion_tokens,
        reasoning_tokens, cost, error FROM judgments""") == [(1, 1, 100, 20, 12, COST_PER_CALL,
                                                               None)]
    (config,) = rows(db_path, "SELECT model, reasoning, backend, length(template_version), "
                              "templates_json IS NOT NULL FROM judge_configs")
    assert config == ("openai/gpt-5-nano", "medium", "openai", 16, 1)
    body = server.stats.bodies[0]
    assert body["model"] == "openai/gpt-5-nano"
    assert body["reasoning"] == {"effort": "medium"}
    # the bare trial question, without its "Trial 1:" label, as the original's judge saw it
    assert "Question:\nDo you detect an injected thought?" in body["messages"][0]["content"]
    assert "Trial 1" not in body["messages"][0]["content"]
    # the detection+identification prompt names the judged word (target, else source)
    di = [b["messages"][0]["content"] for b in server.stats.bodies
          if "closely related to" in b["messages"][0]["content"]]
    assert len(di) == 16 and all('"Bread"' in t or '"Trees"' in t or '"Dust"' in t for t in di)
    assert rows(db_path, "SELECT stage, status FROM stage_runs") == [("judge", "finished")]
    status = run_cli("status", "--db", db_path)
    # every call is judged; status also expects the baselines make_store does not write
    # (6 target conditions x 2 samples x 2 graders)
    assert f"{2 * N_ROLLOUTS}/{2 * N_ROLLOUTS + 24}" in status.output
    # resuming is a query: nothing is missing, so nothing is sent
    before = server.stats.requests
    again = run_cli("judge", "--db", db_path)
    assert again.exit_code == 0 and "Judged 0 calls" in again.output
    assert server.stats.requests == before


def faulty(i: int, word: str) -> str:
    kind = ["500*1", "429*1", "reset*1", "length*1", "slow*1", "garbage*1", None, None][i % 8]
    fault = f" [[fault={kind}]]" if kind else ""
    return f"Yes, I notice {word}. ({i}){fault}"


def test_faults_are_retried_and_counted(db_path: Path, server: FaultServer) -> None:
    make_store(db_path, faulty)
    started = time.monotonic()
    result = run_cli("judge", "--db", db_path, "--timeout", "2.5", "--concurrency", "32")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    injected = server.stats.injected
    # 4 rollouts per fault kind, each with 2 grader prompts, each failing once
    assert injected == {"500": 8, "429": 8, "reset": 8, "length": 8, "slow": 8, "garbage": 8}
    assert "64 yes, 0 no, 0 unparsed, 0 errors" in result.output
    assert ("Failed attempts: 429 8, 500 8, bad_reply 8, connection 8, finish_length 8, "
            "timeout 8." in result.output)
    assert elapsed >= 1.0  # the 429s said Retry-After: 1
    assert rows(db_path, "SELECT attempts, count(*) FROM judgments GROUP BY attempts") == [
        (1, 16), (2, 48)]
    # a retried cut-off reply was still paid for: usage is summed over attempts
    assert rows(db_path, "SELECT max(cost), max(prompt_tokens) FROM judgments")[0] == (
        pytest.approx(2 * COST_PER_CALL), 200)
    counts = judgments_per_grader(db_path)
    assert {c for _, _, c in counts} == {1}


def test_errors_after_last_attempt_then_retry_errors(db_path: Path, server: FaultServer) -> None:
    make_store(db_path, lambda i, w: f"I notice {w} ({i})" + (" [[fault=500*3]]" if i < 3 else ""))
    result = run_cli("judge", "--db", db_path, "--max-attempts", "2")
    assert result.exit_code == 0, result.output
    assert "58 yes, 0 no, 0 unparsed, 6 errors" in result.output
    errors = rows(db_path, "SELECT verdict, error, attempts FROM judgments WHERE error IS NOT NULL")
    assert len(errors) == 6
    assert {(v, e.split(":")[0], a) for v, e, a in errors} == {(None, "HTTP 500", 2)}
    status = run_cli("status", "--db", db_path, "--json")
    assert '"errors": 6' in status.output
    # --only-missing leaves error rows alone
    assert "Judged 0 calls" in run_cli("judge", "--db", db_path).output
    before = server.stats.requests
    retry = run_cli("judge", "--db", db_path, "--retry-errors", "--max-attempts", "2")
    assert retry.exit_code == 0, retry.output
    assert "Judged 6 calls" in retry.output and "6 yes" in retry.output
    assert server.stats.requests - before == 12  # one more 500 each, then a reply
    assert rows(db_path, "SELECT count(*) FROM judgments WHERE error IS NOT NULL") == [(0,)]
    assert {c for _, _, c in judgments_per_grader(db_path)} == {1}


def test_unparsed_replies_are_kept_and_retried_on_request(
    db_path: Path, server: FaultServer
) -> None:
    make_store(db_path, lambda i, w: f"I see {w} ({i})" + (" [[reply=none]]" if i % 4 == 0 else
                                                           " [[reply=NO]]" if i % 4 == 1 else ""))
    result = run_cli("judge", "--db", db_path)
    assert "32 yes, 16 no, 16 unparsed, 0 errors" in result.output
    unparsed = rows(db_path, "SELECT raw_reply, error FROM judgments WHERE verdict IS NULL")
    assert len(unparsed) == 16
    assert {u for u in unparsed} == {("The answer was read with care. No verdict here.", None)}
    status = run_cli("status", "--db", db_path)
    total = [line for line in status.output.splitlines() if line.startswith("total")][0]
    assert total.split()[-3:] == ["16", "0", "0"]  # unparsed, cut off, errors: apart
    before = server.stats.requests
    retry = run_cli("judge", "--db", db_path, "--retry-unparsed")
    assert "Judged 16 calls" in retry.output
    assert server.stats.requests - before == 16


def test_overwrite_rejudges_without_duplicates(db_path: Path, server: FaultServer) -> None:
    make_store(db_path)
    run_cli("judge", "--db", db_path)
    result = run_cli("judge", "--db", db_path, "--overwrite", "--graders", "coherence")
    assert "Judged 32 calls" in result.output
    assert rows(db_path, "SELECT count(*), count(DISTINCT stage_run_id) FROM judgments") == [
        (64, 2)]
    assert {c for _, _, c in judgments_per_grader(db_path)} == {1}


def test_auth_errors_stop_at_once_and_keep_what_finished(
    db_path: Path, server: FaultServer
) -> None:
    make_store(db_path, lambda i, w: f"I see {w} ({i})" + (" [[fault=401]]" if i >= 20 else ""))
    result = run_cli("judge", "--db", db_path, "--concurrency", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: the judge API rejected the API key (401 Unauthorized) at {server.base_url}; "
        "stopped (40 judgments saved)")
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(40,)]
    assert server.stats.injected["401"] == 1  # not retried
    assert rows(db_path, "SELECT status FROM stage_runs") == [("failed",)]


@pytest.mark.parametrize(("code", "words"), [("402", "no credit"), ("403", "refused access")])
def test_no_credit_and_forbidden_are_fatal(
    db_path: Path, server: FaultServer, code: str, words: str
) -> None:
    make_store(db_path, f"x {{i}} [[fault={code}]]")
    result = run_cli("judge", "--db", db_path)
    assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output


def test_sentinel_key_appears_nowhere(db_path: Path, server: FaultServer) -> None:
    make_store(db_path, lambda i, w: f"I see {w} ({i})" + (
        " [[fault=500*5]]" if i < 2 else " [[fault=401]]" if i > 28 else ""))
    result = run_cli("judge", "--db", db_path, "--concurrency", "1", "--max-attempts", "2")
    assert result.exit_code == 1
    assert server.stats.auth_headers == {f"Bearer {SENTINEL}"}  # it was sent, and only there
    assert SENTINEL not in result.output
    for path in db_path.parent.glob(db_path.name + "*"):
        assert SENTINEL.encode() not in path.read_bytes(), path
        assert SENTINEL[:12].encode() not in path.read_bytes(), path


def test_unreachable_base_url_is_a_clear_error(db_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    make_store(db_path)
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    started = time.monotonic()
    result = run_cli("judge", "--db", db_path, "--base-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot reach the judge API at http://127.0.0.1:9/v1")
    assert time.monotonic() - started < 30
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(0,)]


def test_cache_answers_identical_requests(db_path: Path, server: FaultServer) -> None:
    make_store(db_path)
    first = run_cli("judge", "--db", db_path, "--cache")
    assert first.exit_code == 0, first.output
    assert rows(db_path, "SELECT count(*) FROM judge_cache") == [(64,)]
    before = server.stats.requests
    again = run_cli("judge", "--db", db_path, "--cache", "--overwrite")
    assert "64 from the cache" in again.output and "64 yes" in again.output
    assert server.stats.requests == before
    assert rows(db_path, "SELECT DISTINCT attempts, cost, verdict FROM judgments") == [(0, 0.0, 1)]


def test_limit_and_max_cost(db_path: Path, server: FaultServer) -> None:
    make_store(db_path)
    limited = run_cli("judge", "--db", db_path, "--limit", "5")
    assert "Judged 5 calls" in limited.output and "Stopped at --limit" in limited.output
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(5,)]
    capped = run_cli("judge", "--db", db_path, "--max-cost", str(3 * COST_PER_CALL - 1e-9),
                     "--concurrency", "1")
    assert "Judged 3 calls" in capped.output and "Stopped at --max-cost" in capped.output
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(8,)]
    rest = run_cli("judge", "--db", db_path)
    assert "Judged 56 calls" in rest.output


def test_layers_and_experiments_narrow_the_run(db_path: Path, server: FaultServer) -> None:
    make_store(db_path)
    result = run_cli("judge", "--db", db_path, "--layers", "3", "--experiments",
                     "steered_to_unsteered,failure_to_success", "--graders", "detection")
    assert "Judged 4 calls" in result.output
    assert rows(db_path, "SELECT DISTINCT grader FROM judgments") == [("detection",)]
    bad = run_cli("judge", "--db", db_path, "--layers", "7")
    assert bad.exit_code == 1 and "layer 7 is not a patch layer" in bad.output


def test_own_prompts_make_a_new_judge_config(db_path: Path, server: FaultServer,
                                             tmp_path: Path) -> None:
    make_store(db_path)
    run_cli("judge", "--db", db_path, "--graders", "coherence")
    prompts = tmp_path / "prompts.toml"
    prompts.write_text('coherence = """Coherent? {response}\nEnd with YES or NO."""\n')
    plan = run_cli("judge", "--db", db_path, "--prompts", prompts, "--dry-run")
    # the baselines' 24 calls wait for generate (make_store writes none)
    assert plan.output.splitlines()[-3].split() == ["total", "88", "0", "64", "24"]
    result = run_cli("judge", "--db", db_path, "--prompts", prompts, "--graders", "coherence")
    assert "Judged 32 calls" in result.output
    assert server.stats.bodies[-1]["messages"][0]["content"].startswith("Coherent? ")
    versions = rows(db_path, "SELECT template_version, templates_json LIKE '%Coherent?%' "
                             "FROM judge_configs ORDER BY id")
    assert len(versions) == 2 and versions[0][0] != versions[1][0]
    assert [v[1] for v in versions] == [0, 1]
    assert rows(db_path, "SELECT judge_config_id, count(*) FROM judgments GROUP BY 1") == [
        (1, 32), (2, 32)]
