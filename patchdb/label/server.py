"""The labeling page's server: stdlib http.server on 127.0.0.1, one HTML page and a small JSON
API. Each label is committed before the reply goes out, so stopping the server loses nothing.

API: GET /api/next (the answer to label, without the judge's verdict, and the progress);
POST /api/label {"rollout_id", "grader", "label"} (returns the judge's verdict and reasoning,
shown only now so they cannot anchor the label); POST /api/skip {"rollout_id", "grader"};
POST /api/undo (takes back the last label or skip and shows that answer again).
"""

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import Any

from patchdb.errors import PatchdbError
from patchdb.label.labels import remove_label, set_label
from patchdb.label.page import PAGE
from patchdb.label.plan import Candidates, Item, plan_next
from patchdb.store import Store, open_store
from patchdb.store.sweeps import get_sweep

HIDDEN = ("judge_verdict", "judge_reply")


@dataclass
class Session:
    """What one labeling session remembers besides the store: skips, undo steps, a re-shown item."""

    store: Store
    sweep: str | None
    graders: list[str]
    labeler: str
    target: int
    judge_config: int | None
    skipped: set[tuple[int, str]] = field(default_factory=set)
    history: list[tuple[str, Item]] = field(default_factory=list)
    pending: Item | None = None
    shown: dict[tuple[int, str], Item] = field(default_factory=dict)
    candidates: dict[str, Candidates] = field(default_factory=dict)

    def next(self) -> dict[str, Any]:
        with self.store.read() as session:
            item, progress = plan_next(session, get_sweep(session, self.sweep), self.graders,
                                       self.labeler, self.target, self.judge_config, self.skipped,
                                       self.candidates)
        if self.pending is not None:
            item, self.pending = self.pending, None
        shown = None
        if item is not None:
            self.shown[(item.rollout_id, item.grader)] = item
            shown = {k: v for k, v in item.to_dict().items() if k not in HIDDEN}
        return {"item": shown, "progress": [vars(p) for p in progress], "labeler": self.labeler}

    def _known(self, body: dict[str, Any]) -> Item:
        key = (int(body["rollout_id"]), str(body["grader"]))
        if key not in self.shown:
            raise PatchdbError(f"rollout {key[0]} ({key[1]}) was not shown on this page")
        return self.shown[key]

    def label(self, body: dict[str, Any]) -> dict[str, Any]:
        item = self._known(body)
        value = bool(body["label"])
        self.store.transact(lambda s: set_label(s, item.rollout_id, item.grader, self.labeler,
                                                value, body.get("note") or None))
        self.history.append(("label", item))
        return {"rollout_id": item.rollout_id, "grader": item.grader, "label": value,
                "judge_verdict": item.judge_verdict, "judge_reply": item.judge_reply}

    def skip(self, body: dict[str, Any]) -> dict[str, Any]:
        item = self._known(body)
        self.skipped.add((item.rollout_id, item.grader))
        self.history.append(("skip", item))
        return {"skipped": item.rollout_id}

    def undo(self) -> dict[str, Any]:
        if not self.history:
            return {"undone": None}
        action, item = self.history.pop()
        if action == "label":
            self.store.transact(lambda s: remove_label(s, item.rollout_id, item.grader,
                                                       self.labeler))
        else:
            self.skipped.discard((item.rollout_id, item.grader))
        self.pending = item
        return {"undone": action, "rollout_id": item.rollout_id, "grader": item.grader}


def handler_for(state: Session) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to one labeling session. Connections get their own threads (a
    browser's idle preconnected socket must not stall the page), but the API calls run one at a
    time."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
            return

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data, ensure_ascii=False).encode(),
                       "application/json; charset=utf-8")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif self.path == "/api/next":
                self._answer(state.next)
            else:
                self._json(404, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            size = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(size) or b"{}")
            except ValueError:
                self._json(400, {"error": "the request body is not JSON"})
                return
            actions: dict[str, Callable[[], dict[str, Any]]] = {
                "/api/label": lambda: state.label(body),
                "/api/skip": lambda: state.skip(body),
                "/api/undo": state.undo,
            }
            action = actions.get(self.path)
            if action is None:
                self._json(404, {"error": f"no action {self.path}"})
            else:
                self._answer(action)

        def _answer(self, action: Callable[[], dict[str, Any]]) -> None:
            try:
                with lock:
                    data = action()
                self._json(200, data)
            except PatchdbError as exc:
                self._json(400, {"error": str(exc)})
            except (KeyError, TypeError, ValueError) as exc:
                self._json(400, {"error": f"bad request: {exc}"})

    return Handler


def make_server(state: Session, port: int = 0) -> HTTPServer:
    """An HTTP server for the session on 127.0.0.1 (port 0: a free port)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(state))
    server.daemon_threads = True
    return server


def server_url(server: HTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


def serve(db: str, sweep: str | None, graders: list[str], labeler: str, target: int,
          judge_config: int | None, port: int, announce: Callable[[str], None]) -> None:
    """Serve the labeling page until Ctrl-C; the URL is announced first."""
    store = open_store(db)
    try:
        state = Session(store, sweep, graders, labeler, target, judge_config)
        state.next()  # refuse a bad sweep or judge config before printing a URL
        state.shown.clear()
        server = make_server(state, port)
        announce(f"Labeling page for {labeler}: {server_url(server)}  (Ctrl-C stops; every "
                 "label is already saved)")
        try:
            server.serve_forever()
        finally:
            server.server_close()
    finally:
        store.close()
