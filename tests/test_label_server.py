"""The labeling page's server, request by request: it answers only its labeler's page.

Every API call needs the token printed in the URL; the Host must name the loopback server; a
foreign Origin or site is refused; the API takes small `application/json` bodies and a label is
a JSON boolean; each page load is its own session (its own skips and undo stack) and an answer
shown in one tab is not shown in another at the same time; no request, however malformed,
prints anything on the labeler's terminal. Each refusal has its own test, over a real loopback
socket (http.client, or raw bytes where http.client would not send them).
"""

import base64
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from label_client import Tab, serving, stored
from labeled_store import fill, init_store

from patchdb.label.sessions import MAX_SESSIONS, RESERVE_S
from patchdb.store import Store, open_store

# What the page may see of an answer before it is labeled, written out by hand: nothing of the
# judge (its verdict, its reasoning, its config).
SHOWN_KEYS = ["answer", "experiment", "grader", "grader_question", "patch_layer", "question",
              "rollout_id", "source", "target", "word"]


@pytest.fixture
def store(db_path: Path, tmp_path: Path) -> Iterator[Store]:
    """The 48 judged rollouts of labeled_store; the judge's reasoning reads "thinking... YES"."""
    init_store(str(db_path), tmp_path)
    store = open_store(str(db_path))
    store.transact(fill)
    yield store
    store.close()


def exchange(port: int, data: bytes, half_close: bool = True) -> bytes:
    """Raw bytes in, everything the server sends until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


# --- the token ------------------------------------------------------------------------------------

def test_the_page_opens_only_with_its_token(store: Store) -> None:
    with serving(store, target=3) as server:
        tab = Tab(server, open_session=False)
        for path in ("/", "/index.html", "/?token=", "/?token=wrong", f"/?token={server.token}x",
                     f"/?Token={server.token}", f"/?token=wrong&token={server.token}"):
            status, body, _ = tab.raw("GET", path)
            assert status == 403, path
            assert b"<script" not in body and b"needs its token" in body
        status, body, headers = tab.raw("GET", f"/?token={server.token}")
    assert status == 200 and b"<title>patchdb label</title>" in body
    # The policy lets exactly the served script run (its hash, computed here from the page).
    script = re.search(rb"<script>(.*?)</script>", body, re.S)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1)).digest()).decode()
    policy = headers["Content-Security-Policy"]
    assert f"script-src 'sha256-{digest}'" in policy and "frame-ancestors 'none'" in policy
    assert "connect-src 'self'" in policy and headers["X-Frame-Options"] == "DENY"
    assert len(server.token) >= 43  # secrets.token_urlsafe(32)


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/session", {}), ("GET", "/api/next", None),
    ("POST", "/api/label", {"rollout_id": 1, "grader": "coherence", "label": True}),
    ("POST", "/api/skip", {"rollout_id": 1, "grader": "coherence"}),
    ("POST", "/api/undo", {}), ("POST", "/api/close", {}),
])
@pytest.mark.parametrize("token", ["missing", "wrong", "empty", "in the query only",
                                   "twice", "non-ASCII"])
def test_every_api_call_needs_the_token_header(store: Store, method: str, path: str,
                                               body: Any, token: str) -> None:
    with serving(store, target=3) as server:
        tab = Tab(server)
        assert tab.next() is not None  # the session shows an answer: a label would be valid
        sent = {"missing": None, "wrong": "x" * len(server.token), "empty": "",
                "in the query only": None, "twice": None, "non-ASCII": "é" * 8}[token]
        if token == "twice":
            headers = f"X-Patchdb-Token: {server.token}\r\nX-Patchdb-Token: {server.token}\r\n"
            data = json.dumps(body).encode() if body is not None else b""
            reply = exchange(server.server_port, (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.server_port}\r\n{headers}"
                f"X-Patchdb-Session: {tab.session}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
            assert status_of(reply) in (400, 403)
        else:
            target = path + (f"?token={server.token}" if token == "in the query only" else "")
            status, data = tab.call(method, target, body, {"X-Patchdb-Token": sent})
            assert status == 403 and data == {"error": "a missing or wrong X-Patchdb-Token header"}
    assert stored(store) == {}


# --- Host, Origin, site ------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1:{other}",
                                  "127.0.0.1", "localhost", "127.0.0.1.nip.io:{port}",
                                  "[::1]:{port}", "0.0.0.0:{port}", "localhost:{port}.evil"])
def test_a_foreign_host_is_refused(store: Store, host: str) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends its own
    name as the Host; the token does not help it."""
    with serving(store, target=3) as server:
        tab = Tab(server)
        port = server.server_port
        named = host.format(port=port, other=port + 1)
        for method, path, body in (("GET", f"/?token={server.token}", None),
                                   ("GET", "/api/next", None), ("POST", "/api/session", {})):
            status, data = tab.call(method, path, body, {"Host": named})
            assert status == 403, (named, path)
            assert data == {"error": f"the Host header must be 127.0.0.1:{port} or "
                                     f"localhost:{port}"}
        assert tab.call("GET", "/api/next", None, {"Host": f"localhost:{port}"})[0] == 200


def test_a_request_without_a_host_is_refused(store: Store) -> None:
    with serving(store, target=3) as server:
        reply = exchange(server.server_port, (
            f"GET /api/next HTTP/1.0\r\nX-Patchdb-Token: {server.token}\r\n\r\n").encode())
    assert status_of(reply) == 403 and b"the Host header must be" in reply


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:{other}",
                                    "https://127.0.0.1:{port}", "http://localhost.evil:{port}",
                                    "http://127.0.0.1:{port}.evil.example"])
def test_a_foreign_origin_is_refused(store: Store, origin: str) -> None:
    with serving(store, target=3) as server:
        tab = Tab(server)
        item = tab.next()
        assert item is not None
        port = server.server_port
        body = {"rollout_id": item["rollout_id"], "grader": item["grader"], "label": False}
        status, data = tab.call("POST", "/api/label", body,
                                {"Origin": origin.format(port=port, other=port + 1)})
        assert status == 403 and data == {"error": "requests from another origin are refused"}
        assert stored(store) == {}
        # The page's own origin, as a browser sends it on a POST, is welcome.
        status, _ = tab.call("POST", "/api/label", body, {"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and stored(store) == {item["rollout_id"]: False}


@pytest.mark.parametrize("site", ["cross-site", "same-site", "none"])
def test_a_fetch_from_another_site_is_refused(store: Store, site: str) -> None:
    with serving(store, target=3) as server:
        status, data = Tab(server).call("GET", "/api/next", None, {"Sec-Fetch-Site": site})
    assert status == 403 and data == {"error": "the API answers this page only, not another site"}


# --- bodies ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [None, "text/plain", "text/plain;charset=UTF-8",
                                  "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=x", "application/jsonx",
                                  "application/json-seq", "text/json"])
def test_the_api_takes_json_bodies_only(store: Store, kind: str | None) -> None:
    """A cross-site form or a no-cors fetch can send text/plain; it must not write a label."""
    with serving(store, target=3) as server:
        tab = Tab(server)
        item = tab.next()
        assert item is not None
        body = {"rollout_id": item["rollout_id"], "grader": item["grader"], "label": True}
        status, data = tab.call("POST", "/api/label", body, {"Content-Type": kind})
    assert status == 415
    assert data == {"error": "the API takes Content-Type: application/json only"}
    assert stored(store) == {}


@pytest.mark.parametrize("size, status", [(16 * 1024 + 1, 413), (10**12, 413), (10**40, 413)])
def test_a_large_body_is_refused_unread(store: Store, size: int, status: int) -> None:
    with serving(store, target=3) as server:
        reply = exchange(server.server_port, (
            f"POST /api/undo HTTP/1.1\r\nHost: 127.0.0.1:{server.server_port}\r\n"
            f"X-Patchdb-Token: {server.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode() + b"{}")
    assert status_of(reply) == status
    assert reply.endswith(b'{"error": "the body is over 16384 bytes"}')


@pytest.mark.parametrize("value", ["no", "yes", "false", "NO", 0, 1, None, [], {}, 0.0])
def test_a_label_is_strictly_a_json_boolean(store: Store, value: Any) -> None:
    """{"label": "no"} was stored as YES."""
    with serving(store, target=3) as server:
        tab = Tab(server)
        item = tab.next()
        assert item is not None
        status, data = tab.call("POST", "/api/label", {"rollout_id": item["rollout_id"],
                                                       "grader": item["grader"], "label": value})
        assert status == 400 and data == {"error": "label must be true or false"}
        assert stored(store) == {}
        tab.label(item, False)
    assert stored(store) == {item["rollout_id"]: False}


@pytest.mark.parametrize("body, error", [
    ({"rollout_id": "1", "grader": "coherence", "label": True}, "rollout_id must be an integer"),
    ({"rollout_id": True, "grader": "coherence", "label": True}, "rollout_id must be an integer"),
    ({"grader": "coherence", "label": True}, "rollout_id must be an integer"),
    ({"rollout_id": 1, "grader": 5, "label": True}, "grader must be a string"),
    ({"rollout_id": 1, "grader": "coherence", "label": True, "note": 3},
     "note must be a string of at most 2000 characters, or null"),
])
def test_a_label_request_of_the_wrong_shape_is_refused(store: Store, body: dict[str, Any],
                                                        error: str) -> None:
    with serving(store, target=3) as server:
        tab = Tab(server)
        assert tab.next() is not None
        assert tab.call("POST", "/api/label", body) == (400, {"error": error})
    assert stored(store) == {}


def test_the_api_refuses_answers_the_page_does_not_show(store: Store) -> None:
    with serving(store, target=3) as server:
        tab = Tab(server)
        item = tab.next()
        assert item is not None
        other = 1 if item["rollout_id"] != 1 else 2
        status, data = tab.call("POST", "/api/label", {"rollout_id": other, "grader": "coherence",
                                                       "label": True})
    assert status == 400
    assert data == {"error": f"rollout {other} (coherence) is not the answer this page shows"}
    assert stored(store) == {}


# --- the judge stays hidden ---------------------------------------------------------------------

def test_the_next_answer_carries_neither_the_judges_verdict_nor_its_reasoning(
        store: Store) -> None:
    """The store's reasoning is "thinking... YES" (or NO), its last word the verdict: no byte of
    it may reach the page before the label. After the label it is revealed, as the made-up judge
    gave it: YES on sample 0, NO on sample 1 (the answers read "answer <layer> <sample>")."""
    with serving(store, target=48) as server:
        tab = Tab(server)
        for n in range(8):
            status, raw, _ = tab.raw("GET", "/api/next")
            assert status == 200 and b"thinking" not in raw and b"judge" not in raw
            data = json.loads(raw)
            assert sorted(data) == ["elsewhere", "item", "labeler", "progress"]
            assert sorted(data["item"]) == SHOWN_KEYS
            assert all(sorted(p) == ["available", "grader", "labeled", "target"]
                       for p in data["progress"])
            revealed = tab.label(data["item"], n % 2 == 0)
            says_yes = data["item"]["answer"].endswith(" 0")
            assert revealed["judge_verdict"] is says_yes
            assert revealed["judge_reply"] == f"thinking... {'YES' if says_yes else 'NO'}"


# --- sessions: one per page load -------------------------------------------------------------------

def test_two_tabs_never_show_one_answer_and_undo_only_their_own(store: Store) -> None:
    with serving(store, target=10) as server:
        a, b = Tab(server), Tab(server)
        x, y = a.next(), b.next()
        assert x is not None and y is not None and x["rollout_id"] != y["rollout_id"]
        a.label(x, True)
        b.label(y, False)
        assert stored(store) == {x["rollout_id"]: True, y["rollout_id"]: False}
        assert a.call("POST", "/api/undo", {}) == (200, {
            "undone": "label", "rollout_id": x["rollout_id"], "grader": "coherence",
            "shown_again": True})
        assert stored(store) == {y["rollout_id"]: False}  # b's label stays
        assert a.next() == x
        assert b.call("POST", "/api/undo", {})[1]["rollout_id"] == y["rollout_id"]
        assert stored(store) == {}
        assert b.next() == y
        assert a.call("POST", "/api/undo", {}) == (200, {"undone": None})  # a's stack is empty


def test_undo_never_removes_a_label_another_tab_wrote(store: Store) -> None:
    """a skips x and b labels it; a's undo of the skip does not show x again (it is labeled
    now), so a cannot write over b's label. A label rewritten since a wrote it (here by the
    CLI's set_label) is not removed by a's undo either."""
    from patchdb.label.labels import set_label

    with serving(store, target=10) as server:
        a, b = Tab(server), Tab(server)
        x = a.next()
        assert x is not None
        assert a.call("POST", "/api/skip", {"rollout_id": x["rollout_id"],
                                            "grader": "coherence"})[0] == 200
        assert b.next() == x
        b.label(x, True)
        status, undone = a.call("POST", "/api/undo", {})
        assert status == 200 and undone["undone"] == "skip" and undone["shown_again"] is False
        shown = a.next()
        assert shown is not None and shown["rollout_id"] != x["rollout_id"]
        assert stored(store) == {x["rollout_id"]: True}
        a.label(shown, False)
        store.transact(lambda s: set_label(s, shown["rollout_id"], "coherence", "ada", True))
        assert a.call("POST", "/api/undo", {})[1]["undone"] == "label"
        assert stored(store) == {x["rollout_id"]: True, shown["rollout_id"]: True}
        assert b.call("POST", "/api/undo", {})[1]["undone"] == "label"  # b's own: removed
        assert stored(store) == {shown["rollout_id"]: True}


def test_a_label_already_written_in_another_tab_is_refused_and_kept(store: Store) -> None:
    from patchdb.label.labels import set_label

    with serving(store, target=10) as server:
        a = Tab(server)
        x = a.next()
        assert x is not None
        store.transact(lambda s: set_label(s, x["rollout_id"], "coherence", "ada", True))
        status, data = a.call("POST", "/api/label", {"rollout_id": x["rollout_id"],
                                                     "grader": "coherence", "label": False})
        assert status == 400 and "already has ada's label" in data["error"]
        assert stored(store) == {x["rollout_id"]: True}


def test_a_failed_undo_keeps_its_step(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refuses the undo's write (a lock held elsewhere, a dropped connection): the
    label stays, and so does the step, so the next undo takes it back."""
    import patchdb.label.sessions as sessions
    from patchdb.errors import StoreError

    real = sessions.remove_label
    failures = [StoreError("database error: database is locked")]

    def flaky(*args: Any, **kwargs: Any) -> bool:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(sessions, "remove_label", flaky)
    with serving(store, target=10) as server:
        a = Tab(server)
        x = a.next()
        assert x is not None
        a.label(x, True)
        status, data = a.call("POST", "/api/undo", {})
        assert status == 400 and "locked" in data["error"]
        assert stored(store) == {x["rollout_id"]: True}
        assert a.call("POST", "/api/undo", {})[1]["undone"] == "label"
        assert stored(store) == {}


@pytest.mark.parametrize("body", [b'{"rollout_id": 1, "grader": "\\ud800"}',
                                  b'{"rollout_id": 1, "grader": "coherence", "label": true, '
                                  b'"note": "\\udcff"}'], ids=["grader", "note"])
def test_text_that_is_not_unicode_is_refused_with_a_400(store: Store, body: bytes) -> None:
    with serving(store, target=10) as server:
        a = Tab(server)
        x = a.next()
        assert x is not None
        sent = body.replace(b'"rollout_id": 1', f'"rollout_id": {x["rollout_id"]}'.encode())
        for path in ("/api/label", "/api/skip"):
            status, raw, _ = a.raw("POST", path, sent)
            assert status == 400 and "not valid Unicode" in json.loads(raw)["error"]
        assert a.next() == x  # still shown here
    assert stored(store) == {}


def test_on_port_80_a_host_without_its_port_is_this_server(store: Store) -> None:
    """Clients leave the default port out of Host and Origin (the server is not bound to 80
    here: the check reads the port it was asked for)."""
    with serving(store, target=10) as server:
        a = Tab(server)
        server.server_port = 80
        for host, origin in (("127.0.0.1", "http://127.0.0.1"), ("localhost", None)):
            status, _ = a.call("GET", "/api/next", headers={"Host": host, "Origin": origin})
            assert status == 200
        assert a.call("GET", "/api/next", headers={"Host": "127.0.0.1:8080"})[0] == 403


def test_a_skip_belongs_to_its_tab(store: Store) -> None:
    with serving(store, target=10) as server:
        a, b = Tab(server), Tab(server)
        x, y = a.next(), b.next()
        assert x is not None and y is not None
        assert a.call("POST", "/api/skip", {"rollout_id": x["rollout_id"],
                                            "grader": "coherence"})[0] == 200
        assert b.call("POST", "/api/skip", {"rollout_id": y["rollout_id"],
                                            "grader": "coherence"})[0] == 200
        # x is the plan's first answer; skipped in a only, it is free, so b is shown it.
        assert b.next() == x
        # a takes its skip back, but b shows x now: a is not shown it too.
        status, undone = a.call("POST", "/api/undo", {})
        assert status == 200 and undone["shown_again"] is False
        again = a.next()
        assert again is not None and again["rollout_id"] != x["rollout_id"]
    assert stored(store) == {}


def test_a_reservation_expires_and_a_late_label_is_refused(store: Store) -> None:
    now = [0.0]
    with serving(store, target=10, clock=lambda: now[0]) as server:
        a = Tab(server)
        x = a.next()
        assert x is not None
        now[0] = RESERVE_S + 1  # a's tab was left open; nobody else wanted x: a may still label
        a.label(x, True)
        assert a.call("POST", "/api/undo", {})[1]["shown_again"] is True
        assert a.next() == x
        now[0] = 2 * RESERVE_S + 2  # now a's reservation has run out and c takes x
        c = Tab(server)
        assert c.next() == x
        status, data = a.call("POST", "/api/label", {"rollout_id": x["rollout_id"],
                                                     "grader": "coherence", "label": False})
        assert status == 409
        assert data == {"error": f"rollout {x['rollout_id']} (coherence) was open here for "
                                 "over 15 minutes and another tab shows it now"}
        assert stored(store) == {}
        assert (a.next() or {}).get("rollout_id") != x["rollout_id"]
        c.label(x, True)
    assert stored(store) == {x["rollout_id"]: True}


def test_a_closed_tab_frees_its_answer_and_its_session_ends(store: Store) -> None:
    with serving(store, target=10) as server:
        a, b = Tab(server), Tab(server)
        x = a.next()
        assert x is not None
        assert a.call("POST", "/api/close", {}) == (200, {"closed": True})
        assert b.next() == x
        ended = {"error": "this page's session has ended (its tab was closed, or 32 newer "
                          "page loads replaced it); reload the page"}
        assert a.call("GET", "/api/next") == (410, ended)
        assert a.call("GET", "/api/next", None, {"X-Patchdb-Session": "forged"}) == (410, ended)
        assert a.call("GET", "/api/next", None, {"X-Patchdb-Session": None}) == (410, ended)


def test_the_least_recently_used_session_ends_beyond_the_limit(store: Store) -> None:
    with serving(store, target=10) as server:
        tabs = [Tab(server) for _ in range(MAX_SESSIONS)]
        assert tabs[0].next() is not None  # tab 0 is now the most recently used
        Tab(server)  # one more: tab 1, the least recently used, ends
        assert tabs[1].call("GET", "/api/next")[0] == 410
        assert tabs[0].call("GET", "/api/next")[0] == 200
        assert tabs[2].call("GET", "/api/next")[0] == 200


# --- malformed requests: a 4xx, never a traceback ----------------------------------------------------

def _post(head: str, body: bytes = b"", length: str | None = None, kind: str = "application/json",
          path: str = "/api/label") -> str:
    """A POST with the right Host and token; {H} and {T} are filled in by `malformed`."""
    size = f"Content-Length: {len(body) if length is None else length}\r\n" if length != "-" else ""
    return (f"POST {path} HTTP/1.1\r\nHost: {{H}}\r\nX-Patchdb-Token: {{T}}\r\n"
            f"Content-Type: {kind}\r\n{size}{head}\r\n") + body.decode("latin-1")


MALFORMED: list[tuple[str, str, int]] = [
    ("non-integer Content-Length", _post("", b"{}", "abc"), 400),
    ("negative Content-Length", _post("", b"{}", "-5"), 400),
    ("signed Content-Length", _post("", b"{}", "+2"), 400),
    ("huge Content-Length", _post("", b"{}", "9" * 60), 413),
    ("non-ASCII digits in Content-Length", _post("", b"{}", "\xb2"), 400),
    ("two Content-Length headers", _post("Content-Length: 3\r\n", b"{}"), 400),
    ("no Content-Length", _post("", b"{}", "-"), 411),
    ("chunked body", _post("Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n", "-"), 400),
    ("truncated body", _post("", b'{"rollout_id": 1', "50"), 400),
    ("empty body", _post("", b""), 400),
    ("not JSON", _post("", b"{nope"), 400),
    ("deeply nested JSON", _post("", b"[" * 6000 + b"]" * 6000), 400),
    ("a JSON array", _post("", b"[1]"), 400),
    ("invalid UTF-8", _post("", b'{"grader": "\xff\xfe"}'), 400),
    ("a huge number", _post("", b'{"rollout_id": 1' + b"0" * 5000 + b"}"), 400),
    ("no Host", "GET /api/next HTTP/1.1\r\nX-Patchdb-Token: {T}\r\n\r\n", 403),
    ("two Host headers", "GET /api/next HTTP/1.1\r\nHost: {H}\r\nHost: {H}\r\n"
                         "X-Patchdb-Token: {T}\r\n\r\n", 400),
    ("non-ASCII token", "GET /api/next HTTP/1.1\r\nHost: {H}\r\nX-Patchdb-Token: \xe9\xff\r\n\r\n",
     403),
    ("a body on a GET", "GET /api/next HTTP/1.1\r\nHost: {H}\r\nX-Patchdb-Token: {T}\r\n"
                        "Content-Length: 2\r\n\r\n{}", 400),
    ("an absolute URI", "GET http://evil.example/api/next HTTP/1.1\r\nHost: {H}\r\n"
                        "X-Patchdb-Token: {T}\r\n\r\n", 400),
    ("unknown API call", "GET /api/labels HTTP/1.1\r\nHost: {H}\r\nX-Patchdb-Token: {T}\r\n\r\n",
     404),
    ("unknown page", "GET /../etc/passwd HTTP/1.1\r\nHost: {H}\r\n\r\n", 404),
    ("garbage request line", "\x00\x01\x02 garbage\r\n\r\n", 400),
    ("bad HTTP version", "GET / HTTP/9.x\r\nHost: {H}\r\n\r\n", 400),
    ("CORS preflight", "OPTIONS /api/label HTTP/1.1\r\nHost: {H}\r\nOrigin: http://evil.example"
                       "\r\nAccess-Control-Request-Method: POST\r\n\r\n", 405),
    ("unknown method", "DELETE /api/label HTTP/1.1\r\nHost: {H}\r\nX-Patchdb-Token: {T}\r\n\r\n",
     405),
    ("header line too long", "GET / HTTP/1.1\r\nHost: {H}\r\nX-Long: " + "a" * 70000 + "\r\n\r\n",
     431),
    ("too many headers", "GET / HTTP/1.1\r\nHost: {H}\r\n" + "X-A: 1\r\n" * 200 + "\r\n", 431),
    ("HTTP/0.9", "GET /api/next\r\n\r\n", 403),
]


def malformed(request: str, port: int, token: str) -> bytes:
    return request.replace("{H}", f"127.0.0.1:{port}").replace("{T}", token).encode("latin-1")


@pytest.mark.parametrize("request_, status", [(r, s) for _, r, s in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_a_malformed_request_gets_a_4xx_and_prints_nothing(store: Store, request_: str,
                                                          status: int,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    with serving(store, target=3) as server:
        reply = exchange(server.server_port,
                         malformed(request_, server.server_port, server.token))
        tab = Tab(server)  # the server still answers
        assert tab.next() is not None
    assert status_of(reply) == status, reply[:300]
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"Content-Type: application/json" in head and set(json.loads(body)) == {"error"}
    assert b"Traceback" not in reply and b"<script" not in reply
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert stored(store) == {}


def test_a_client_that_stops_mid_request_is_dropped_quietly(
        store: Store, capfd: pytest.CaptureFixture[str]) -> None:
    with serving(store, target=3, read_timeout_s=0.5) as server:
        request = malformed(_post("", b'{"rol', "50"), server.server_port, server.token)
        # The body never completes and the socket stays open.
        reply = exchange(server.server_port, request, half_close=False)
        idle = exchange(server.server_port, b"GET / HTTP/1.1\r\n", half_close=False)
    assert status_of(reply) == 408
    assert reply.endswith(b'{"error": "the request stopped arriving"}')
    assert idle == b""  # a request line and then silence: the connection is closed
    assert capfd.readouterr() == ("", "")
    assert stored(store) == {}


def test_an_idle_connection_does_not_stall_the_page(store: Store) -> None:
    """Browsers open sockets ahead of time and may send nothing on them for a while."""
    with serving(store, target=3) as server:
        idle = socket.create_connection(("127.0.0.1", server.server_port))
        try:
            item = Tab(server).next()
        finally:
            idle.close()
    assert item is not None and item["grader"] == "coherence"


# --- the command ------------------------------------------------------------------------------------

def test_label_command_prints_a_url_with_its_token_and_answers_quietly(store: Store,
                                                                        db_path: Path) -> None:
    # Ctrl-C as from a terminal: SIGINT at its default in the child even where this run
    # inherited it ignored (a test run started in the background by a script)
    proc = subprocess.Popen([sys.executable, "-m", "patchdb", "label", "--db", str(db_path),
                             "--labeler", "ada", "--grader", "coherence"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"Labeling page for ada: http://127\.0\.0\.1:(\d+)/\?token=([\w-]{43})"
                             r"  \(Ctrl-C stops; every label is already saved\)\n", line)
        assert match is not None, line
        port, token = int(match.group(1)), match.group(2)
        tab = Tab((port, token))
        status, page, _ = tab.raw("GET", f"/?token={token}")
        assert status == 200 and b"<title>patchdb label</title>" in page
        assert tab.raw("GET", "/")[0] == 403
        status, data = tab.call("GET", "/api/next")
        assert status == 200 and data["progress"] == [
            {"grader": "coherence", "labeled": 0, "target": 100, "available": 48}]
        for _, request, _ in MALFORMED:
            exchange(port, malformed(request, port, token))
        tab.label(data["item"], True)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip() == "Aborted."  # click turns Ctrl-C into Abort; nothing else, no traceback
    assert list(stored(store).values()) == [True]
