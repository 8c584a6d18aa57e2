"""`patchdb judge --batch` against a loopback server speaking the files and batches endpoints.

After every scenario a rerun ends with exactly one judgment per key and grader, and the
server's own count of the requests it ran (per custom_id) shows nothing ran twice.
"""

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from batch_server import BatchServer, BatchState, batch_server
from conftest import file_digest, run_cli
from judge_server import add_judge_config, make_store

from patchdb.errors import JudgeError
from patchdb.judge.batch_plan import split
from patchdb.judge.plan import Call

SENTINEL = "sk-sentinel-batch-4c8e2a9f1b7d"
N_ROLLOUTS = 32  # make_store's small sweep: 8 keys x 2 layers x 2 samples
N_CALLS = 2 * N_ROLLOUTS
PER_CALL = (100 * 1.0 + 20 * 2.0) / 1e6 * 0.5  # the server's usage at $1/$2 per M, half price


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[BatchServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", SENTINEL)
    monkeypatch.setenv("PATCHDB_JUDGE_BATCH_POLL", "0.01")
    with batch_server() as srv:
        monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", srv.base_url)
        yield srv


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def batch(db: Path, *args: str) -> object:
    return run_cli("judge", "--db", db, "--batch", "--price-in", "1", "--price-out", "2", *args)


def one_row_per_key(db: Path) -> bool:
    """Every rollout has exactly one judgment for each grader its experiment asks."""
    counts = rows(db, """
        SELECT (SELECT count(*) FROM judgments j WHERE j.rollout_id = r.id AND j.grader = g.grader)
        FROM rollouts r JOIN experiments e ON e.id = r.experiment_id
        JOIN (SELECT 'coherence' AS grader UNION SELECT 'detection'
              UNION SELECT 'detection_identification') g
          ON g.grader IN ('coherence', e.detection_grader)""")
    return len(counts) == N_CALLS and {c for (c,) in counts} == {1} and rows(
        db, "SELECT count(*) FROM judgments") == [(N_CALLS,)]


def billed_once(state: BatchState) -> bool:
    return len(state.billed) == N_CALLS and set(state.billed.values()) == {1}


def verdicts(db: Path) -> dict[tuple[str, str], object]:
    """{(answer, grader): verdict}: keyed by text, so two stores compare."""
    return {(a, g): v for a, g, v in rows(db, """SELECT r.answer, j.grader, j.verdict
        FROM judgments j JOIN rollouts r ON r.id = j.rollout_id""")}


def test_batch_judges_each_key_once_at_batch_prices(db_path: Path, server: BatchServer) -> None:
    make_store(db_path, lambda i, w: f"I notice {w} ({i})" + (" [[reply=NO]]" if i % 3 == 0
                                                              else ""))
    result = batch(db_path)
    assert result.exit_code == 0, result.output
    n_no = len([i for i in range(N_ROLLOUTS) if i % 3 == 0]) * 2
    assert (f"Submitted 1 batch(es) of {N_CALLS} calls; collected 1: {N_CALLS - n_no} yes, "
            f"{n_no} no, 0 unparsed, 0 errors (0 cut off)") in result.output
    assert one_row_per_key(db_path) and billed_once(server.state)
    # the output file is shuffled: verdicts right for every answer means custom_id matched
    for (answer, _grader), verdict in verdicts(db_path).items():
        assert verdict == (0 if "[[reply=NO]]" in answer else 1), answer
    (cost,) = rows(db_path, "SELECT DISTINCT round(cost, 12) FROM judgments")[0]
    assert cost == pytest.approx(PER_CALL)
    assert rows(db_path, "SELECT state, requests, completed, failed, round(cost, 10), "
                         "collected_at IS NOT NULL FROM judge_batches") == [
        ("completed", N_CALLS, N_CALLS, 0, round(N_CALLS * PER_CALL, 10), 1)]
    assert server.state.calls["create"] == 1 and server.state.calls["upload"] == 1
    # resuming is a query: nothing missing, nothing live, nothing sent
    again = batch(db_path)
    assert "Submitted 0 batch(es) of 0 calls" in again.output
    assert server.state.calls["upload"] == 1 and billed_once(server.state)


def test_batch_and_live_agree_verdict_for_verdict(tmp_path: Path, server: BatchServer) -> None:
    def answer(i: int, w: str) -> str:
        return f"About {w} ({i})" + [" [[reply=NO]]", "", " [[reply=none]]", ""][i % 4]

    live_db, batch_db = tmp_path / "live.sqlite", tmp_path / "batch.sqlite"
    make_store(live_db, answer)
    make_store(batch_db, answer)
    live = run_cli("judge", "--db", live_db, "--concurrency", "4")
    assert live.exit_code == 0, live.output
    assert batch(batch_db).exit_code == 0
    assert server.state.live_calls == N_CALLS
    assert verdicts(live_db) == verdicts(batch_db) and len(verdicts(batch_db)) == N_CALLS
    assert sorted({v for v in verdicts(batch_db).values()}, key=str) == [0, 1, None]


def test_cut_off_garbage_and_failed_requests_become_retryable_rows(
        db_path: Path, server: BatchServer) -> None:
    marks = {5: "[[batch=length]]", 7: "[[batch=garbage]]", 9: "[[batch=http500]]"}
    make_store(db_path, lambda i, w: f"I notice {w} ({i}) {marks.get(i, '')}")
    result = batch(db_path)
    assert result.exit_code == 0, result.output
    assert "0 unparsed, 6 errors (2 cut off)" in result.output
    assert one_row_per_key(db_path) and billed_once(server.state)
    found = rows(db_path, """SELECT r.answer, j.verdict, j.cut_off, j.error FROM judgments j
        JOIN rollouts r ON r.id = j.rollout_id WHERE j.verdict IS NULL ORDER BY r.id, j.grader""")
    assert [(a.split("(")[1][:1], v, c) for a, v, c, _ in found] == [
        ("5", None, 1), ("5", None, 1), ("7", None, 0), ("7", None, 0), ("9", None, 0),
        ("9", None, 0)]
    errors = [e for *_, e in found]
    assert errors[0] == "reply not finished (finish reason 'length')"  # the live judge's text
    assert errors[2].startswith("bad reply: an unreadable line in the batch output")
    assert errors[4] == "HTTP 500: overloaded"
    # the six error rows go again only when asked, and only they
    retry = batch(db_path, "--retry-errors")
    assert retry.exit_code == 0 and "Submitted 1 batch(es) of 6 calls" in retry.output
    twice = sorted(cid for cid, n in server.state.billed.items() if n == 2)
    assert len(twice) == 6 and one_row_per_key(db_path)


def test_expired_batch_keeps_what_ran_and_the_rerun_sends_the_rest(
        db_path: Path, server: BatchServer) -> None:
    server.state.scripts = [("validating", "in_progress", "expired")]
    make_store(db_path)
    first = batch(db_path)
    assert first.exit_code == 0, first.output
    assert f"{N_CALLS // 2} requests of expired or cancelled batches never ran" in first.output
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(N_CALLS // 2,)]
    second = batch(db_path)
    assert f"Submitted 1 batch(es) of {N_CALLS // 2} calls" in second.output
    assert one_row_per_key(db_path) and billed_once(server.state)


def test_cancelled_batch_is_collected_and_sent_again(db_path: Path, server: BatchServer) -> None:
    server.state.scripts = [("validating",) + ("in_progress",) * 50]
    make_store(db_path)
    submitted = batch(db_path, "--no-wait")
    assert submitted.exit_code == 0 and "1 batch(es) submitted and not waited for" in \
        submitted.output
    # a key in a live batch is never submitted again
    again = batch(db_path, "--no-wait")
    assert "Submitted 0 batch(es) of 0 calls" in again.output
    assert server.state.calls["upload"] == 1
    status = run_cli("status", "--db", db_path)
    assert (f"Judge batches: 1 live ({N_CALLS} requests; `patchdb judge --batch --collect` "
            "shows and collects them), 0 collected") in status.output
    cancel = batch(db_path, "--cancel")
    assert cancel.exit_code == 0 and "cancelling" in cancel.output
    shown = batch(db_path, "--collect")
    assert "cancelled" in shown.output and "live" not in shown.output.split("\n")[2]
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(0,)]
    assert not server.state.billed
    final = batch(db_path)
    assert f"Submitted 1 batch(es) of {N_CALLS} calls" in final.output
    assert '"batches_live": 0' in run_cli("status", "--db", db_path, "--json").output
    assert one_row_per_key(db_path) and billed_once(server.state)


def test_failed_validation_names_the_first_bad_line(db_path: Path, server: BatchServer) -> None:
    make_store(db_path, lambda i, w: f"I notice {w} ({i})" + (" [[batch=invalid]]" if i == 3
                                                              else ""))
    result = batch(db_path)
    assert result.exit_code == 1
    # rollout 3's coherence request is line 7: rollouts 0-2 come first, two graders each
    assert result.output.strip().splitlines()[-1] == (
        "Error: batch #1 (batch-00002) failed validation: line 7: the request body is not "
        "valid for this model")
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(0,)]
    assert rows(db_path, "SELECT state, collected_at IS NOT NULL FROM judge_batches") == [
        ("failed", 1)]
    assert not server.state.billed


def test_server_restart_between_submit_and_collect(db_path: Path, server: BatchServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    make_store(db_path)
    assert batch(db_path, "--no-wait").exit_code == 0
    server.stop()
    down = batch(db_path, "--collect")
    assert down.exit_code == 1 and "Error: looking up batch batch-00002 failed: cannot reach" \
        in down.output
    with batch_server(server.state, server.port):  # the provider is back, same state
        shown = batch(db_path, "--collect")  # collects only what ended: nothing yet
        assert shown.exit_code == 0 and "in_progress" in shown.output, shown.output
        rerun = batch(db_path)  # waits for it, collects it, finds nothing more to send
        assert f"{N_CALLS:,} judgments written" in rerun.output
        assert "Submitted 0 batch(es) of 0 calls; collected 1" in rerun.output
    assert one_row_per_key(db_path) and billed_once(server.state)


def test_limit_and_request_cap_split_the_work(db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    result = batch(db_path, "--batch-max-requests", "10", "--limit", "25")
    assert result.exit_code == 0, result.output
    assert "Submitted 3 batch(es) of 25 calls" in result.output
    assert rows(db_path, "SELECT requests FROM judge_batches ORDER BY id") == [(10,), (10,), (5,)]
    rest = batch(db_path, "--batch-max-requests", "50")
    assert f"Submitted 1 batch(es) of {N_CALLS - 25} calls" in rest.output
    assert one_row_per_key(db_path) and billed_once(server.state)


def test_split_by_bytes_and_requests() -> None:
    items = [(Call(i, "coherence", "a", "w"), b"x" * size + b"\n")
             for i, size in enumerate([9, 9, 19, 4, 4, 4])]
    chunks = [[c.rollout_id for c in chunk.calls] for chunk in split(iter(items), 3, 20)]
    assert chunks == [[0, 1], [2], [3, 4, 5]]
    with pytest.raises(JudgeError, match="21 bytes, more than the 20-byte"):
        list(split(iter([(Call(0, "coherence", "a", "w"), b"x" * 20 + b"\n")]), 3, 20))


def test_dry_run_shows_the_batch_estimate_beside_the_live_one(
        db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    server.state.cost = 0.0001  # live replies carry their cost
    assert run_cli("judge", "--db", db_path, "--limit", "8").exit_code == 0
    dry = run_cli("judge", "--db", db_path, "--batch", "--dry-run")
    assert dry.exit_code == 0, dry.output
    remaining = N_CALLS - 8
    assert f"Estimated cost: ${remaining * 0.0001:,.4f}" in dry.output
    assert (f"As batches (--batch): {remaining} calls in 1 batch job(s)" in dry.output)
    assert (f"Estimated cost at batch prices: ${remaining * 0.0001 / 2:,.4f} (0.5 x the live "
            f"estimate of ${remaining * 0.0001:,.4f}") in dry.output
    assert rows(db_path, "SELECT count(*) FROM judge_batches") == [(0,)]
    server.state.scripts = [("validating",) + ("in_progress",) * 50]
    assert batch(db_path, "--no-wait", "--limit", "20").exit_code == 0
    held = run_cli("judge", "--db", db_path, "--batch", "--dry-run")
    assert (f"As batches (--batch): {remaining - 20} calls in 1 batch job(s) or more (split "
            "further by file size); 20 calls already held by live batches") in held.output


def test_refusals_are_one_line_and_change_nothing(db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    before = file_digest(db_path)
    router = run_cli("judge", "--db", db_path, "--batch", "--base-url",
                     "https://openrouter.ai/api/v1")
    assert router.exit_code == 1
    assert router.output.startswith("Error: OpenRouter's batch API takes its requests inline")
    logprobs = run_cli("judge", "--db", db_path, "--batch", "--verdict", "logprobs")
    assert logprobs.exit_code == 1 and logprobs.output.startswith("Error: --batch reads verdicts")
    alone = run_cli("judge", "--db", db_path, "--no-wait")
    assert alone.exit_code == 1 and "--no-wait, --collect and --cancel go with --batch" in \
        alone.output
    cost = run_cli("judge", "--db", db_path, "--batch", "--no-wait", "--max-cost", "1")
    assert cost.exit_code == 1 and "needs waiting" in cost.output
    tiny = run_cli("judge", "--db", db_path, "--batch", "--batch-max-bytes", "200")
    assert tiny.exit_code == 1 and len(tiny.output.splitlines()) == 1
    assert tiny.output.startswith("Error: one request is ") and "200-byte" in tiny.output
    assert file_digest(db_path) == before and not server.state.calls


def test_the_key_is_sent_and_never_kept(db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    result = batch(db_path)
    assert result.exit_code == 0 and SENTINEL not in result.output
    assert server.state.auth_headers == {f"Bearer {SENTINEL}"}
    for path in db_path.parent.glob(db_path.name + "*"):
        data = path.read_bytes()
        assert SENTINEL.encode() not in data and SENTINEL[:14].encode() not in data, path
    assert rows(db_path, "SELECT base_url FROM judge_batches") == [(server.base_url,)]


def test_an_error_body_echoing_the_key_is_scrubbed(db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    server.state.echo_key_on_upload = True
    result = batch(db_path)
    assert result.exit_code == 1
    assert result.output.startswith("Error: uploading the batch input file failed: HTTP 500")
    assert SENTINEL not in result.output and SENTINEL[-12:] not in result.output
    assert server.state.calls["upload"] == 4  # the client's own retries of a 500, then it stops
    for path in db_path.parent.glob(db_path.name + "*"):
        assert SENTINEL.encode() not in path.read_bytes(), path
    # nothing was uploaded, so the batch is gone and holds no key; the next run sends them
    assert rows(db_path, "SELECT count(*) FROM judge_batches") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM judge_batch_keys") == [(0,)]
    server.state.echo_key_on_upload = False
    assert batch(db_path).exit_code == 0
    assert one_row_per_key(db_path) and billed_once(server.state)


def test_max_cost_sends_one_batch_at_a_time_until_reached(db_path: Path,
                                                          server: BatchServer) -> None:
    make_store(db_path)
    # 16 calls a batch at $0.00007 each: $0.00112 after one batch, $0.00224 after two
    result = batch(db_path, "--batch-max-requests", "16", "--max-cost", "0.002")
    assert result.exit_code == 0, result.output
    assert "Submitted 2 batch(es) of 32 calls" in result.output
    assert "Stopped at --max-cost" in result.output
    assert rows(db_path, "SELECT count(*), round(sum(cost), 8) FROM judgments") == [(32, 0.00224)]
    unpriced = run_cli("judge", "--db", db_path, "--batch", "--max-cost", "1")
    assert unpriced.exit_code == 1 and "--max-cost needs each reply's cost" in unpriced.output


def test_batches_at_another_api_keep_their_keys(db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    server.state.scripts = [("validating",) + ("in_progress",) * 50]
    assert batch(db_path, "--no-wait").exit_code == 0
    with batch_server() as other:
        moved = batch(db_path, "--base-url", other.base_url)
        assert moved.exit_code == 0, moved.output
        assert f"Live batches of this judge config were sent to {server.base_url}" in \
            moved.output
        assert "Submitted 0 batch(es) of 0 calls" in moved.output and not other.state.calls


def test_result_lines_are_matched_by_custom_id_and_read_by_the_live_rules() -> None:
    from patchdb.judge.batch_collect import Prices, read_results

    def ok(cid: str, text: str, finish: str = "stop", cost: float | None = None) -> str:
        usage = {"prompt_tokens": 10, "completion_tokens": 4, **({"cost": cost} if cost else {})}
        return json.dumps({"custom_id": cid, "error": None, "response": {
            "status_code": 200, "body": {"choices": [{"finish_reason": finish, "message": {
                "content": text}}], "usage": usage}}})

    output = "\n".join([
        ok("patchdb-r2-coherence-c7", "Fine.\n**NO**"),  # out of order on purpose
        ok("patchdb-r1-coherence-c7", "Fine. YES", cost=0.25),
        ok("patchdb-r1-detection-c7", "I cannot say."),
        ok("patchdb-r1-coherence-c8", "YES"),  # another judge config: not this batch's
        ok("patchdb-r9-coherence-c7", "YES"),  # a key this batch does not hold
        "{not json and no id",
    ]).encode()
    errors = "\n".join([
        json.dumps({"custom_id": "patchdb-r2-detection-c7", "response": None,
                    "error": {"code": "batch_cancelled", "message": "cancelled"}}),
        json.dumps({"custom_id": "patchdb-r3-coherence-c7", "response": None,
                    "error": {"code": "request_timeout", "message": "too slow"}}),
    ]).encode()
    keys = {(1, "coherence"), (1, "detection"), (2, "coherence"), (2, "detection"),
            (3, "coherence")}
    got = read_results([output, errors], keys, 7, Prices(2.0, 4.0, 0.5))
    assert {k: (v["verdict"], v["error"]) for k, v in got.rows.items()} == {
        (2, "coherence"): (False, None), (1, "coherence"): (True, None),
        (1, "detection"): (None, None),
        (3, "coherence"): (None, "batch request failed: request_timeout: too slow")}
    assert got.not_run == {(2, "detection")} and got.unknown_lines == 3
    assert got.rows[(1, "coherence")]["cost"] == 0.25  # the provider's own figure
    assert got.rows[(2, "coherence")]["cost"] == pytest.approx((10 * 2 + 4 * 4) / 1e6 * 0.5)


def test_scope_options_narrow_what_is_submitted(db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    layer = batch(db_path, "--layers", "2")
    assert "Submitted 1 batch(es) of 32 calls" in layer.output, layer.output
    assert rows(db_path, "SELECT DISTINCT r.patch_layer FROM judgments j "
                         "JOIN rollouts r ON r.id = j.rollout_id") == [(2,)]
    coherence = batch(db_path, "--graders", "coherence")
    assert "Submitted 1 batch(es) of 16 calls" in coherence.output  # layer 3's coherence
    pair = batch(db_path, "--experiments", "failure_to_success")
    assert "Submitted 1 batch(es) of 4 calls" in pair.output  # its layer-3 detection calls
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(52,)]
    assert set(server.state.billed.values()) == {1}


def test_a_sweep_follows_only_its_own_batches(db_path: Path, server: BatchServer) -> None:
    make_store(db_path)
    make_store(db_path, name="second")  # the same judge config judges both sweeps
    server.state.scripts = [("validating", "in_progress", "completed")]
    assert batch(db_path, "--sweep", "small", "--no-wait").exit_code == 0
    other = batch(db_path, "--sweep", "second")
    assert other.exit_code == 0, other.output
    assert "Batch #1" not in other.output and f"Submitted 1 batch(es) of {N_CALLS}" in \
        other.output
    assert rows(db_path, "SELECT s.name, b.collected_at IS NULL FROM judge_batches b "
                         "JOIN sweeps s ON s.id = b.sweep_id ORDER BY b.id") == [
        ("small", 1), ("second", 0)]


def test_replies_without_cost_or_prices_say_the_cost_is_unknown(db_path: Path,
                                                                server: BatchServer) -> None:
    make_store(db_path)
    result = run_cli("judge", "--db", db_path, "--batch")
    assert result.exit_code == 0, result.output
    assert ("0 errors (0 cut off); cost unknown (pass --price-in/--price-out to price replies "
            "that carry no cost).") in result.output
    assert rows(db_path, "SELECT count(*), count(cost) FROM judgments") == [(N_CALLS, 0)]
    assert rows(db_path, "SELECT cost FROM judge_batches") == [(None,)]


def test_keys_recorded_by_another_run_meanwhile_are_left_out(store_db: str) -> None:
    """Two submitters that both found a key missing: the second records only what the first
    did not take (checked inside its write transaction), on SQLite and PostgreSQL."""
    from sqlalchemy import insert

    from patchdb.judge.batch_collect import Prices
    from patchdb.judge.batch_jobs import BatchContext
    from patchdb.judge.templates import DEFAULT_TEMPLATES
    from patchdb.store import open_store
    from patchdb.store.models import Judgment
    from patchdb.store.runs import stage_run

    make_store(store_db)
    store = open_store(store_db)
    try:
        config_id = add_judge_config(store)
        with stage_run(store, "judge", {}) as run:  # a running run: its batches hold keys
            ctx = BatchContext(store, None, config_id, 1, run.id,  # type: ignore[arg-type]
                               DEFAULT_TEMPLATES, "q", "m", "low", "http://x/v1", Prices(),
                               lambda _: None)
            first = [Call(r, "coherence", "a", "w") for r in (1, 2, 3)]
            second = [Call(r, "coherence", "a", "w") for r in (2, 3, 4, 5)]
            one, kept_one = ctx.record(first)
            two, kept_two = ctx.record(second)
            again, kept_again = ctx.record(first)
            store.transact(lambda s: s.execute(insert(Judgment), [  # judged meanwhile, live
                {"rollout_id": 6, "grader": "coherence", "judge_config_id": config_id,
                 "verdict": True, "attempts": 1}]))
            judged, kept_judged = ctx.record([Call(6, "coherence", "a", "w")])
            redo, kept_redo = ctx.record([Call(6, "coherence", "a", "w")], "overwrite")
        # that run ended before uploading any of them: its batches hold no key any more
        after, kept_after = ctx.record(second)
    finally:
        store.close()
    assert (one, [c.rollout_id for c in kept_one]) == (1, [1, 2, 3])
    assert (two, [c.rollout_id for c in kept_two]) == (2, [4, 5])
    assert (again, kept_again) == (None, [])
    assert (judged, kept_judged) == (None, [])  # looking for missing keys: no longer missing
    assert (redo, [c.rollout_id for c in kept_redo]) == (3, [6])
    assert (after, [c.rollout_id for c in kept_after]) == (4, [2, 3, 4, 5])
