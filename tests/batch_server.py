"""A loopback server speaking OpenAI's files and batches endpoints, for `judge --batch` tests.

    POST /v1/files                    multipart upload (purpose "batch")
    GET  /v1/files/{id}/content       an input, output or error file
    POST /v1/batches                  create a batch on an uploaded file (validated at once)
    GET  /v1/batches                  list, newest first (limit, after)
    GET  /v1/batches/{id}             retrieve: each call moves the batch one step along its
                                      script of statuses; reaching an end state runs it
    POST /v1/batches/{id}/cancel      cancelling, then cancelled at the next retrieve
    POST /v1/chat/completions         the same replies live, for comparing both ways

Everything it knows lives in `BatchState`, which outlives a server: stop one and start another
on the same port with the same state, and batches carry on (a provider restart). `billed`
counts every request the server ran per custom_id, so a test can prove nothing ran twice.

What a request gets is read from directives in its prompt, so it is deterministic:
    [[reply=NO]] / [[reply=none]]   the reply's last word (default YES; none: no verdict)
    [[batch=length]]                a reply cut off (finish_reason "length")
    [[batch=garbage]]               its output line is cut in the middle (not JSON)
    [[batch=http500]]               a failed request: status 500 in the error file
    [[batch=invalid]]               the line fails validation: the whole batch fails
An expired batch runs its first half of requests; the rest get batch_expired error lines.
Output lines are written in a shuffled order (seeded), so only custom_id can match them.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

_REPLY = re.compile(r"\[\[reply=(\w+)\]\]")
_BATCH = re.compile(r"\[\[batch=(\w+)\]\]")
ENDED = ("completed", "failed", "expired", "cancelled")
DEFAULT_SCRIPT = ("validating", "in_progress", "finalizing", "completed")


def reply_text(prompt: str) -> str:
    """The judge's reply to a prompt, the same live and in a batch."""
    found = _REPLY.search(prompt)
    word = found.group(1) if found else "YES"
    return "The answer was read with care. " + (
        "No verdict here." if word == "none" else f"Verdict: {word}")


def completion(prompt: str, model: str, cost: float | None) -> dict[str, Any]:
    """A chat.completion body; usage carries a cost only when the server is told to."""
    cut = "[[batch=length]]" in prompt
    usage: dict[str, Any] = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                             "completion_tokens_details": {"reasoning_tokens": 12}}
    if cost is not None:
        usage["cost"] = cost
    return {"id": "chatcmpl-batch", "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": usage,
            "choices": [{"index": 0, "finish_reason": "length" if cut else "stop",
                         "message": {"role": "assistant",
                                     "content": "The answer is cut o" if cut
                                     else reply_text(prompt)}}]}


@dataclass
class BatchState:
    """Files, batches and counts; survives a server restart."""

    scripts: list[tuple[str, ...]] = field(default_factory=list)  # per created batch, in order
    cost: float | None = None  # put into every reply's usage (None: no cost, as OpenAI does)
    echo_key_on_upload: bool = False  # answer uploads with a 500 that repeats the caller's key
    fail_creates: int = 0  # answer this many batch creates with a 503, creating nothing
    # held by each batch list request (a find) before it is answered: a Barrier makes two
    # finds overlap; a broken or timed-out one lets them through
    list_gate: threading.Barrier | None = None
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    plans: dict[str, list[str]] = field(default_factory=dict)
    billed: Counter[str] = field(default_factory=Counter)
    live_calls: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    auth_headers: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seq: int = 0

    def new_id(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}-{self.seq:05d}"

    # --- the batch life ---------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        file_id = body["input_file_id"]
        batch_id = self.new_id("batch")
        n = len(self.batches)
        script = list(self.scripts[n] if n < len(self.scripts) else DEFAULT_SCRIPT)
        lines = self.files[file_id][1].splitlines()
        batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                 "input_file_id": file_id, "completion_window": body["completion_window"],
                 "status": script.pop(0), "created_at": int(time.time()),
                 "output_file_id": None, "error_file_id": None, "errors": None,
                 "metadata": body.get("metadata"),
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        bad = self._first_bad_line(lines)
        if bad is not None:
            batch["status"], script = "failed", []
            batch["errors"] = {"object": "list", "data": [
                {"code": "invalid_request", "line": bad[0], "message": bad[1], "param": None}]}
        self.batches[batch_id] = batch
        self.plans[batch_id] = script
        return batch

    def _first_bad_line(self, lines: list[bytes]) -> tuple[int, str] | None:
        seen: set[str] = set()
        for number, raw in enumerate(lines, 1):
            try:
                line = json.loads(raw)
            except ValueError:
                return number, "the line is not JSON"
            cid = line.get("custom_id")
            if not cid or cid in seen:
                return number, f"missing or repeated custom_id {cid!r}"
            seen.add(cid)
            if line.get("url") != "/v1/chat/completions" or line.get("method") != "POST":
                return number, "the url does not match the batch endpoint"
            if "[[batch=invalid]]" in json.dumps(line["body"]):
                return number, "the request body is not valid for this model"
        return None

    def step(self, batch_id: str) -> dict[str, Any]:
        """Retrieve: move one status along the script; run the batch when it ends."""
        batch = self.batches[batch_id]
        plan = self.plans[batch_id]
        if batch["status"] not in ENDED and plan:
            batch["status"] = plan.pop(0)
            if batch["status"] in ("completed", "expired", "cancelled"):
                self._run(batch)
        return batch

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.batches[batch_id]
        if batch["status"] not in ENDED:
            batch["status"] = "cancelling"
            self.plans[batch_id] = ["cancelled"]
        return batch

    def _run(self, batch: dict[str, Any]) -> None:
        requests = [json.loads(x) for x in self.files[batch["input_file_id"]][1].splitlines()]
        runs = {"completed": len(requests), "expired": len(requests) // 2,
                "cancelled": 0}[batch["status"]]
        out: list[str] = []
        err: list[str] = []
        for i, req in enumerate(requests):
            cid = req["custom_id"]
            if i >= runs:
                if batch["status"] == "expired":
                    err.append(json.dumps({"id": f"req-{i}", "custom_id": cid, "response": None,
                                           "error": {"code": "batch_expired",
                                                     "message": "not run before expiry"}}))
                continue
            self.billed[cid] += 1
            prompt = " ".join(m["content"] for m in req["body"]["messages"])
            directive = _BATCH.search(prompt)
            kind = directive.group(1) if directive else None
            if kind == "http500":
                err.append(json.dumps({"id": f"req-{i}", "custom_id": cid, "error": None,
                                       "response": {"status_code": 500, "request_id": f"r{i}",
                                                    "body": {"error": {"message": "overloaded",
                                                                       "type": "server_error"}}}}))
                batch["request_counts"]["failed"] += 1
                continue
            body = completion(prompt, req["body"]["model"], self.cost)
            line = json.dumps({"id": f"req-{i}", "custom_id": cid, "error": None,
                               "response": {"status_code": 200, "request_id": f"r{i}",
                                            "body": body}})
            out.append(line[: len(line) // 2] if kind == "garbage" else line)
            batch["request_counts"]["completed"] += 1
        random.Random(len(out)).shuffle(out)
        for name, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                file_id = self.new_id("file")
                self.files[file_id] = (f"{batch['id']}_{name}.jsonl",
                                       ("\n".join(lines) + "\n").encode())
                batch[name] = file_id


class BatchServer:
    """The HTTP face of a BatchState on loopback; `batch_server()` runs one."""

    def __init__(self, state: BatchState, port: int = 0) -> None:
        self.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, data: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _json(self, obj: Any, status: int = 200) -> None:
                self._send(status, json.dumps(obj).encode())

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if parts == ["v1", "batches"] and state.list_gate is not None:
                    with suppress(threading.BrokenBarrierError):
                        state.list_gate.wait()
                with state.lock:
                    state.auth_headers.add(self.headers.get("Authorization", ""))
                    if parts[:2] == ["v1", "files"] and len(parts) == 4:
                        state.calls["content"] += 1
                        if parts[2] not in state.files:
                            return self._json({"error": {"message": "no such file"}}, 404)
                        return self._send(200, state.files[parts[2]][1], "application/jsonl")
                    if parts == ["v1", "batches"]:
                        state.calls["list"] += 1
                        query = parse_qs(url.query)
                        limit = int(query.get("limit", ["20"])[0])
                        ids = sorted(state.batches, reverse=True)
                        if "after" in query:
                            ids = [i for i in ids if i < query["after"][0]]
                        page = [state.batches[i] for i in ids[:limit]]
                        return self._json({"object": "list", "data": page,
                                           "first_id": page[0]["id"] if page else None,
                                           "last_id": page[-1]["id"] if page else None,
                                           "has_more": len(ids) > limit})
                    if parts[:2] == ["v1", "batches"] and len(parts) == 3:
                        state.calls["retrieve"] += 1
                        if parts[2] not in state.batches:
                            return self._json({"error": {"message": "no such batch"}}, 404)
                        return self._json(state.step(parts[2]))
                self._json({"error": {"message": "unknown route"}}, 404)

            def do_POST(self) -> None:
                parts = urlparse(self.path).path.strip("/").split("/")
                data = self._body()
                with state.lock:
                    state.auth_headers.add(self.headers.get("Authorization", ""))
                    if parts == ["v1", "files"]:
                        state.calls["upload"] += 1
                        if state.echo_key_on_upload:  # as some providers do in error bodies
                            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                            return self._json({"error": {"message": f"no storage for key {key}"}},
                                              500)
                        return self._json(self._upload(data))
                    if parts == ["v1", "batches"]:
                        state.calls["create"] += 1
                        if state.fail_creates > 0:
                            state.fail_creates -= 1
                            return self._json({"error": {"message": "overloaded"}}, 503)
                        return self._json(state.create(json.loads(data)))
                    if parts[:2] == ["v1", "batches"] and parts[3:] == ["cancel"]:
                        state.calls["cancel"] += 1
                        return self._json(state.cancel(parts[2]))
                    if parts == ["v1", "chat", "completions"]:
                        state.live_calls += 1
                        body = json.loads(data)
                        prompt = " ".join(m["content"] for m in body["messages"])
                        return self._json(completion(prompt, body["model"], state.cost))
                self._json({"error": {"message": "unknown route"}}, 404)

            def _upload(self, data: bytes) -> dict[str, Any]:
                head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                message = BytesParser(policy=policy.HTTP).parsebytes(head + data)
                fields: dict[str, Any] = {}
                for part in message.iter_parts():  # type: ignore[attr-defined]
                    name = part.get_param("name", header="content-disposition")
                    fields[name] = (part.get_filename(), part.get_payload(decode=True))
                filename, content = fields["file"]
                file_id = state.new_id("file")
                state.files[file_id] = (filename, content)
                return {"id": file_id, "object": "file", "bytes": len(content),
                        "created_at": int(time.time()), "filename": filename,
                        "purpose": fields["purpose"][1].decode(), "status": "processed"}

        return Handler

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def batch_server(state: BatchState | None = None, port: int = 0) -> Iterator[BatchServer]:
    server = BatchServer(state or BatchState(), port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
