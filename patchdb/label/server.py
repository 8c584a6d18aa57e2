"""The labeling page's server: stdlib http.server on 127.0.0.1, one HTML page and a small JSON
API, for the one person who holds the URL's token. Each label is committed before the reply goes
out, so stopping the server loses nothing.

Every request is checked before it reaches the labels: the Host must be 127.0.0.1:<port> or
localhost:<port> (DNS rebinding), an Origin must be this page's, a fetch from another site is
refused, and the token printed in the URL must come with the page's address (`?token=`) or, for
the API, in the X-Patchdb-Token header, which a cross-site form cannot set. The API takes only
small `application/json` bodies. A refusal is a JSON error with a 4xx status; no request,
however malformed, prints anything on the labeler's terminal.

API (each call but the first also sends X-Patchdb-Session):
POST /api/session -> {"session"}: a session for one page load, with its own skips and undo.
GET /api/next: the answer to label (reserved for this session, without the judge's verdict or
reasoning) and the progress.
POST /api/label {"rollout_id", "grader", "label": true|false, "note"?}: returns the judge's
verdict and reasoning, shown only now so they cannot anchor the label.
POST /api/skip {"rollout_id", "grader"}; POST /api/undo {}; POST /api/close {}.
"""

import hmac
import json
import secrets
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from patchdb.errors import PatchdbError
from patchdb.label.page import CSP, PAGE
from patchdb.label.sessions import Conflict, Labeling, SessionEnded
from patchdb.store import open_store

TOKEN_HEADER = "X-Patchdb-Token"
SESSION_HEADER = "X-Patchdb-Session"
MAX_BODY = 16 * 1024
READ_TIMEOUT_S = 30.0  # a client silent this long mid-request loses its connection
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
NO_TOKEN_PAGE = ("<!DOCTYPE html><title>patchdb label</title><p>This page needs its token: open "
                 "the whole URL that <code>patchdb label</code> printed.</p>")


class Refused(Exception):
    """A request refused before it reaches the labels: an HTTP status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                     token.encode())


class LabelServer(ThreadingHTTPServer):
    """Connections get their own threads (a browser's idle preconnected socket must not stall
    the page); a connection dropped mid-reply is the client's business, never a traceback."""

    daemon_threads = True

    def __init__(self, port: int, token: str, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", port), handler)
        self.token = token

    def handle_error(self, request: Any, client_address: Any) -> None:
        return


def handler_for(labeling: Labeling, token: str,
                read_timeout_s: float = READ_TIMEOUT_S) -> type[BaseHTTPRequestHandler]:
    """A request handler for one labeler's page, guarded by `token`."""

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout_s
        server_version = "patchdb-label"
        sys_version = ""
        default_request_version = "HTTP/1.0"  # a status line even for a garbled request

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
            return

        def send_error(self, code: int, message: str | None = None,
                       explain: str | None = None) -> None:
            """http.server's own refusals (a garbled request line, an unknown method, headers
            too long), as JSON like every other refusal; an unknown method is 405, not 501."""
            self.close_connection = True
            if code == 501:
                code, message = 405, f"no method {self.command} here (GET and POST only)"
            self._send(code, _error(message or f"HTTP {code}"), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self._handle("POST")

        def _handle(self, method: str) -> None:
            try:
                status, body, kind = self._route(method)
            except Refused as exc:
                self.close_connection = True  # an unread body must not become a request
                status, body, kind = exc.status, _error(str(exc)), "application/json"
            except SessionEnded as exc:
                status, body, kind = 410, _error(str(exc)), "application/json"
            except Conflict as exc:
                status, body, kind = 409, _error(str(exc)), "application/json"
            except PatchdbError as exc:
                status, body, kind = 400, _error(str(exc)), "application/json"
            except TimeoutError:
                self.close_connection = True
                status, body, kind = 408, _error("the request stopped arriving"), "application/json"
            except Exception as exc:  # a bug must not print a traceback on the labeler's terminal
                self.close_connection = True
                status, body = 500, _error(f"internal error ({type(exc).__name__})")
                kind = "application/json"
            self._send(status, body, kind)

        def _send(self, status: int, body: bytes, kind: str) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                for name, value in SECURITY_HEADERS.items():
                    self.send_header(name, value)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                self.close_connection = True

        def _route(self, method: str) -> tuple[int, bytes, str]:
            self._check_origin()
            if not self.path.startswith("/"):
                raise Refused(400, "the request target must be a path")
            url = urlsplit(self.path)
            if not url.path.startswith("/api/"):
                return self._page(method, url.path, url.query)
            if self.headers.get("Sec-Fetch-Site", "same-origin") != "same-origin":
                raise Refused(403, "the API answers this page only, not another site")
            if not _matches(self._single(TOKEN_HEADER), token):
                raise Refused(403, f"a missing or wrong {TOKEN_HEADER} header")
            body = self._body(method)
            if (method, url.path) == ("POST", "/api/session"):
                return _json(labeling.open())
            session = self._single(SESSION_HEADER) or ""
            actions: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
                ("GET", "/api/next"): lambda: labeling.next(session),
                ("POST", "/api/label"): lambda: labeling.label(session, body),
                ("POST", "/api/skip"): lambda: labeling.skip(session, body),
                ("POST", "/api/undo"): lambda: labeling.undo(session),
                ("POST", "/api/close"): lambda: labeling.close(session),
            }
            action = actions.get((method, url.path))
            if action is None:
                raise Refused(404, f"no API call {method} {url.path}")
            return _json(action())

        def _page(self, method: str, path: str, query: str) -> tuple[int, bytes, str]:
            if method != "GET" or path not in ("/", "/index.html"):
                raise Refused(404, f"no page {method} {path}")
            self._body("GET")
            tokens = parse_qs(query).get("token", [])
            if len(tokens) != 1 or not _matches(tokens[0], token):
                return 403, NO_TOKEN_PAGE.encode(), "text/html"
            return 200, PAGE.encode(), "text/html"

        def _single(self, name: str) -> str | None:
            values = self.headers.get_all(name) or []
            if len(values) > 1:
                raise Refused(400, f"more than one {name} header")
            return values[0] if values else None

        def _check_origin(self) -> None:
            """Host (against DNS rebinding) and Origin (against other sites) name this server."""
            assert isinstance(self.server, LabelServer)
            port = self.server.server_port
            ours = {f"127.0.0.1:{port}", f"localhost:{port}"}
            if port == 80:  # the default port: clients leave it out of Host and Origin
                ours |= {"127.0.0.1", "localhost"}
            host = self._single("Host")
            if host is None or host.lower() not in ours:
                raise Refused(403, f"the Host header must be 127.0.0.1:{port} or localhost:{port}")
            origin = self._single("Origin")
            if origin is not None and origin.lower() not in {f"http://{h}" for h in ours}:
                raise Refused(403, "requests from another origin are refused")

        def _body(self, method: str) -> dict[str, Any]:
            """The JSON object of a POST; a GET has no body."""
            if self.headers.get("Transfer-Encoding") is not None:
                raise Refused(400, "chunked bodies are not accepted; send Content-Length")
            length = self._single("Content-Length")
            if method == "GET":
                if length not in (None, "0"):
                    raise Refused(400, "a GET request has no body")
                return {}
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "application/json" or len(self.headers.get_all("Content-Type") or []) > 1:
                raise Refused(415, "the API takes Content-Type: application/json only")
            if length is None:
                raise Refused(411, "a Content-Length header is needed")
            digits = length.strip()
            if not (digits.isascii() and digits.isdigit()):
                raise Refused(400, f"Content-Length is not a byte count: {length[:40]!r}")
            if len(digits) > 9 or int(digits) > MAX_BODY:
                raise Refused(413, f"the body is over {MAX_BODY} bytes")
            size = int(digits)
            data = self.rfile.read(size)
            if len(data) < size:
                raise Refused(400, "the body is shorter than its Content-Length")
            try:
                body = json.loads(data)
            except (ValueError, RecursionError):
                raise Refused(400, "the request body is not JSON") from None
            if not isinstance(body, dict):
                raise Refused(400, "the request body must be a JSON object")
            try:  # a lone surrogate ("\\ud800") parses, but no store or reply can hold it
                json.dumps(body, ensure_ascii=False).encode()
            except UnicodeEncodeError:
                raise Refused(400, "the request body holds text that is not valid Unicode "
                                   "(a lone surrogate)") from None
            return body

    return Handler


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()  # ASCII escapes: any message can be sent


def _json(data: dict[str, Any]) -> tuple[int, bytes, str]:
    return 200, json.dumps(data, ensure_ascii=False).encode(), "application/json"


def make_server(labeling: Labeling, port: int = 0, token: str | None = None,
                read_timeout_s: float = READ_TIMEOUT_S) -> LabelServer:
    """An HTTP server for the labeling page on 127.0.0.1 (port 0: a free port), guarded by
    `token` (default: a fresh random one, kept as `server.token`)."""
    token = token or secrets.token_urlsafe(32)
    return LabelServer(port, token, handler_for(labeling, token, read_timeout_s))


def server_url(server: LabelServer) -> str:
    """The page's URL with its token: the one thing that opens it."""
    return f"http://127.0.0.1:{server.server_port}/?token={server.token}"


def serve(db: str, sweep: str | None, graders: list[str], labeler: str, target: int,
          judge_config: int | None, port: int, announce: Callable[[str], None],
          plan: str = "balanced") -> None:
    """Serve the labeling page until Ctrl-C; the URL (with its token) is announced first."""
    store = open_store(db)
    try:
        labeling = Labeling(store, sweep, graders, labeler, target, judge_config, plan=plan)
        labeling.check()  # refuse a bad sweep or judge config before printing a URL
        server = make_server(labeling, port)
        announce(f"Labeling page for {labeler}: {server_url(server)}  (Ctrl-C stops; every "
                 "label is already saved)")
        try:
            server.serve_forever()
        finally:
            server.server_close()
    finally:
        store.close()
