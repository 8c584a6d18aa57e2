"""Pins on the judge against a real loopback server: which HTTP statuses stop the run and which
are retried, --only-missing never touching a stored judgment, and an API key that never lands in
the store, the output, the logs, stage_runs or an error row (even when a server echoes it)."""

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from judge_server import FaultServer, make_store

SENTINEL = "sk-pin-5b1e0c9d7a3f4e2b8c6d"
N_ROLLOUTS = 32  # make_store's small sweep: 8 keys x 2 layers x 2 samples; 2 graders each


class PinServer(FaultServer):
    """The fault server plus [[fault=404]], [[fault=400*n]], [[fault=408*n]] (those statuses),
    and [[fault=echo*n]]: HTTP 500 whose error message repeats the request's Authorization
    header, as a careless proxy might."""

    def _handler_class(self) -> Any:
        base: Any = super()._handler_class()

        class Handler(base):  # type: ignore[misc, valid-type]
            def _answer(self, fault: str | None, word: str, body: dict[str, Any]) -> None:
                if fault in ("404", "400", "408"):
                    self._send(int(fault), {"error": {"message": "injected", "code": 0}}, {})
                elif fault == "echo":
                    auth = self.headers.get("Authorization", "")
                    message = f"upstream refused the call made with {auth} (key {auth[7:]})"
                    self._send(500, {"error": {"message": message, "code": 500}}, {})
                else:
                    super()._answer(fault, word, body)

        return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[PinServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", SENTINEL)
    srv = PinServer()
    srv.start()
    monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", srv.base_url)
    try:
        yield srv
    finally:
        srv.stop()


def rows(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql).fetchall()


# --- which statuses stop the run, which are retried ---------------------------------------------


def test_404_stops_the_run_at_once_and_keeps_what_finished(db_path: Path,
                                                           server: PinServer) -> None:
    make_store(db_path, lambda i, w: f"I see {w} ({i})" + (" [[fault=404]]" if i >= 20 else ""))
    result = run_cli("judge", "--db", db_path, "--concurrency", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: the judge API does not know this model or URL (404 Not Found) at "
        f"{server.base_url}; stopped (40 judgments saved)")
    assert server.stats.injected["404"] == 1  # never retried, and nothing called after it
    assert rows(db_path, "SELECT count(*) FROM judgments") == [(40,)]
    assert rows(db_path, "SELECT status FROM stage_runs") == [("failed",)]


def test_400_is_stored_as_an_error_without_a_retry(db_path: Path, server: PinServer) -> None:
    make_store(db_path, lambda i, w: f"I see {w} ({i})" + (" [[fault=400*1]]" if i == 0 else ""))
    result = run_cli("judge", "--db", db_path, "--max-attempts", "3")
    assert result.exit_code == 0, result.output
    assert "62 yes, 0 no, 0 unparsed, 2 errors" in result.output
    assert server.stats.injected["400"] == 2  # the coherence and the detection prompt, once each
    errors = rows(db_path, "SELECT verdict, error, attempts FROM judgments WHERE error IS NOT NULL")
    assert [(v, e.split(":")[0], a) for v, e, a in errors] == [(None, "HTTP 400", 1)] * 2


def test_408_is_retried_like_a_timeout(db_path: Path, server: PinServer) -> None:
    make_store(db_path, lambda i, w: f"I see {w} ({i})" + (" [[fault=408*2]]" if i == 0 else ""))
    result = run_cli("judge", "--db", db_path, "--max-attempts", "3")
    assert result.exit_code == 0, result.output
    assert "64 yes, 0 no, 0 unparsed, 0 errors" in result.output
    assert server.stats.injected["408"] == 4  # two per prompt, then a reply
    assert sorted(rows(db_path, "SELECT attempts FROM judgments WHERE attempts > 1")) == [(3,), (3,)]


# --- --only-missing never overwrites ------------------------------------------------------------


def test_only_missing_never_touches_a_stored_judgment(db_path: Path, server: PinServer) -> None:
    make_store(db_path)
    assert run_cli("judge", "--db", db_path).exit_code == 0
    with sqlite3.connect(db_path) as conn:
        # give stored rows values no judge call here would produce: NO, unparsed, an error
        conn.execute("UPDATE judgments SET verdict = 0, raw_reply = 'kept NO' WHERE id % 4 = 0")
        conn.execute("UPDATE judgments SET verdict = NULL, raw_reply = 'kept unparsed' "
                     "WHERE id % 4 = 1")
        conn.execute("UPDATE judgments SET verdict = NULL, error = 'kept error' WHERE id % 4 = 2")
        conn.execute("DELETE FROM judgments WHERE id % 8 = 3")  # 8 of 64 missing
    kept = rows(db_path, "SELECT * FROM judgments ORDER BY id")
    before = server.stats.requests
    for args in ([], ["--only-missing"]):
        result = run_cli("judge", "--db", db_path, *args)
        assert result.exit_code == 0, result.output
    assert server.stats.requests - before == 8
    assert rows(db_path, "SELECT * FROM judgments WHERE id IN (SELECT id FROM judgments "
                         "ORDER BY id LIMIT 56) ORDER BY id") == kept
    assert rows(db_path, "SELECT count(*), count(DISTINCT rollout_id || grader) "
                         "FROM judgments") == [(64, 64)]


# --- the API key goes to the server and nowhere else ----------------------------------------------


def test_an_echoed_key_lands_nowhere(db_path: Path, server: PinServer,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    make_store(db_path, lambda i, w: f"I see {w} ({i})" + (
        " [[fault=echo*5]]" if i < 3 else " [[fault=echo*1]]" if i < 6 else ""))
    result = run_cli("judge", "--db", db_path, "--concurrency", "2", "--max-attempts", "2")
    assert result.exit_code == 0, result.output
    assert server.stats.auth_headers == {f"Bearer {SENTINEL}"}  # it was sent, and only there
    assert server.stats.injected["echo"] == 2 * (3 * 2 + 3)
    errors = rows(db_path, "SELECT error FROM judgments WHERE error IS NOT NULL")
    assert len(errors) == 6 and all(e.startswith("HTTP 500: ") for (e,) in errors)
    assert all("upstream refused the call made with" in e for (e,) in errors)  # the rest is kept
    seen = [result.output, caplog.text, *(str(r) for r in rows(
        db_path, "SELECT * FROM stage_runs")), *(e for (e,) in errors)]
    for text in seen:
        assert SENTINEL not in text and SENTINEL[:12] not in text and SENTINEL[-12:] not in text
    for path in db_path.parent.glob(db_path.name + "*"):
        data = path.read_bytes()
        assert SENTINEL.encode() not in data and SENTINEL[3:15].encode() not in data, path
