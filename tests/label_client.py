"""The labeling page's server for the tests: `serving` runs the real server on a free loopback
port, and `Tab` speaks its API as one page load of the page's script does."""

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select

from patchdb.label.server import LabelServer, make_server
from patchdb.label.sessions import Labeling
from patchdb.store import Store
from patchdb.store.models import Label


@contextmanager
def serving(store: Store, target: int, clock: Callable[[], float] = time.monotonic,
            read_timeout_s: float = 30) -> Iterator[LabelServer]:
    """The real server for labeler ada (coherence only) on a free loopback port."""
    labeling = Labeling(store, None, ["coherence"], "ada", target, None, clock=clock)
    server = make_server(labeling, read_timeout_s=read_timeout_s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class Tab:
    """One page load, calling the API as the page's script does: token and session headers."""

    def __init__(self, server: LabelServer | tuple[int, str], open_session: bool = True) -> None:
        self.port, self.token = (server if isinstance(server, tuple)
                                 else (server.server_port, server.token))
        self.session: str | None = None
        if open_session:
            status, data = self.call("POST", "/api/session", {})
            assert status == 200, data
            self.session = data["session"]

    def raw(self, method: str, path: str, body: Any = None,
            headers: dict[str, str | None] | None = None) -> tuple[int, bytes, http.client.HTTPMessage]:
        """Status, body bytes and headers of one request; a header given as None is left out."""
        sent: dict[str, str | None] = {"Host": f"127.0.0.1:{self.port}",
                                       "X-Patchdb-Token": self.token,
                                       "X-Patchdb-Session": self.session}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data,
                         headers={k: v for k, v in sent.items() if v is not None})
            response = conn.getresponse()
            return response.status, response.read(), response.msg
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str | None] | None = None) -> tuple[int, Any]:
        status, raw, _ = self.raw(method, path, body, headers)
        return status, json.loads(raw)

    def next(self) -> dict[str, Any] | None:
        status, data = self.call("GET", "/api/next")
        assert status == 200, data
        item: dict[str, Any] | None = data["item"]
        return item

    def label(self, item: dict[str, Any], value: bool) -> dict[str, Any]:
        status, data = self.call("POST", "/api/label", {"rollout_id": item["rollout_id"],
                                                        "grader": item["grader"], "label": value})
        assert status == 200, data
        result: dict[str, Any] = data
        return result


def stored(store: Store, grader: str | None = None) -> dict[int, bool]:
    """Every label in the store (of one grader, if given): rollout id -> YES."""
    query = select(Label.rollout_id, Label.label)
    if grader is not None:
        query = query.where(Label.grader == grader)
    with store.read() as s:
        rows = s.execute(query).all()
    return {int(r): bool(v) for r, v in rows}
