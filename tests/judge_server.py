"""A real chat-completions server on loopback for judge tests and the judge benchmark.

Two servers live here:

* `FaultServer` (threaded, stdlib): answers like an OpenAI-compatible API and injects faults.
  What it does for a request is read from directives inside the judged answer, so the
  behaviour is deterministic however many calls are in flight:

      [[fault=500*2]]    the first 2 requests for this prompt get HTTP 500
      [[fault=429*1]]    ... HTTP 429 with Retry-After: 1
      [[fault=slow*1]]   ... a reply slower than the client's timeout
      [[fault=reset*1]]  ... a connection reset (RST) instead of a reply
      [[fault=length*1]] ... a reply cut off (finish_reason "length")
      [[fault=garbage*1]] ... HTTP 200 with a body that is not JSON
      [[fault=401]]      every request gets HTTP 401 (402 and 403 work the same way)
      [[reply=NO]]       the final word of the reply (default YES); [[reply=none]] ends
                         without a verdict word
      [[top=YES:-0.2|_No:-1.5]]  for a request with logprobs=true: the first token's top
                         logprobs, token:logprob separated by "|", "_" for a leading space
                         (default YES:-0.05|NO:-3.0); the first pair is the token returned
      [[nologprobs]]     a logprobs request is answered without logprobs (a server that
                         does not support them)

  Requests are counted per prompt text, so the coherence and detection prompts of one
  rollout each see the faults once.

* `serve_fast` (asyncio, one process): a minimal keep-alive HTTP/1.1 server that answers
  every request with a fixed reply after a fixed latency. The benchmark runs it in a separate
  process so that it is not the bottleneck.

Also here: `make_store`, which builds a store with rollouts inserted directly through the ORM.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from patchdb.config import config_from_dict
from patchdb.store import Rollout, open_store
from patchdb.store.sweeps import expected_units, get_experiments, register_sweep

_FAULT = re.compile(r"\[\[fault=(\w+)(?:\*(\d+))?\]\]")
_REPLY = re.compile(r"\[\[reply=(\w+)\]\]")
_TOP = re.compile(r"\[\[top=([^\]]+)\]\]")
DEFAULT_TOP = "YES:-0.05|NO:-3.0"
COST_PER_CALL = 0.0001


def completion_body(text: str, finish_reason: str = "stop", model: str = "judge") -> dict[str, Any]:
    """A chat.completion object with OpenRouter-style usage (reasoning tokens and cost)."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "total_tokens": 120,
            "completion_tokens_details": {"reasoning_tokens": 12},
            "cost": COST_PER_CALL,
        },
    }


def top_logprobs(spec: str) -> list[tuple[str, float]]:
    """[[top=...]]'s pairs: "YES:-0.2|_No:-1.5" is [("YES", -0.2), (" No", -1.5)]."""
    pairs = []
    for item in spec.split("|"):
        token, logprob = item.rsplit(":", 1)
        pairs.append((" " + token[1:] if token.startswith("_") else token, float(logprob)))
    return pairs


def logprobs_body(prompt: str, model: str) -> dict[str, Any]:
    """A one-token reply carrying the first token's top logprobs, as vLLM and llama.cpp give."""
    found = _TOP.search(prompt)
    pairs = top_logprobs(found.group(1) if found else DEFAULT_TOP)
    body = completion_body(pairs[0][0], "length", model)
    body["usage"]["completion_tokens"] = 1
    if "[[nologprobs]]" not in prompt:
        body["choices"][0]["logprobs"] = {"content": [{
            "token": pairs[0][0], "logprob": pairs[0][1], "bytes": None,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in pairs],
        }]}
    return body


@dataclass
class ServerStats:
    """What the server saw and injected, for assertions."""

    requests: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    replies: int = 0
    auth_headers: set[str] = field(default_factory=set)
    bodies: list[dict[str, Any]] = field(default_factory=list)


class FaultServer:
    """The threaded fault-injecting server; use `fault_server()` to run one."""

    def __init__(self, slow_s: float = 3.0, latency_s: float = 0.0) -> None:
        self.slow_s = slow_s
        self.latency_s = latency_s
        self.stats = ServerStats()
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        handler = self._handler_class()

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that stops (a fatal reply ends the judge) may drop its other
                # connections while we read them: not a server fault, and no traceback.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _decide(self, body: dict[str, Any]) -> tuple[str | None, str]:
        """(fault to inject or None, final word) for this request."""
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        reply = _REPLY.search(prompt)
        word = reply.group(1) if reply else "YES"
        with self._lock:
            self.stats.requests += 1
            self.stats.bodies.append(body)
            self._seen[prompt] += 1
            nth = self._seen[prompt]
            for match in _FAULT.finditer(prompt):
                kind, times = match.group(1), match.group(2)
                if times is None or nth <= int(times):
                    self.stats.injected[kind] += 1
                    return kind, word
                nth -= int(times)
            self.stats.replies += 1
        return None, word

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.stats.auth_headers.add(self.headers.get("Authorization", ""))
                fault, word = server._decide(body)
                if server.latency_s:
                    time.sleep(server.latency_s)
                try:
                    self._answer(fault, word, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _answer(self, fault: str | None, word: str, body: dict[str, Any]) -> None:
                err = {"error": {"message": "injected", "code": 0}}
                if fault in ("401", "402", "403"):
                    self._send(int(fault), err, {})
                elif fault == "500":
                    self._send(500, err, {})
                elif fault == "429":
                    self._send(429, err, {"Retry-After": "1"})
                elif fault == "slow":
                    time.sleep(server.slow_s)
                    self._send(200, completion_body("Too late. YES"), {})
                elif fault == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                elif fault == "garbage":
                    data = b"<html>502 Bad Gateway</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif fault == "length":
                    self._send(200, completion_body("The answer is cut o", "length"), {})
                elif body.get("logprobs"):
                    prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
                    self._send(200, logprobs_body(prompt, body.get("model", "judge")), {})
                else:
                    text = "The answer was read with care. " + (
                        "No verdict here." if word == "none" else f"Verdict: {word}"
                    )
                    self._send(200, completion_body(text, model=body.get("model", "judge")), {})

        return Handler

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def fault_server(slow_s: float = 3.0, latency_s: float = 0.0) -> Iterator[FaultServer]:
    server = FaultServer(slow_s=slow_s, latency_s=latency_s)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- the fast asyncio server for the benchmark -------------------------------------------------


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes, latency_s: float
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:].strip())
            if length:
                await reader.readexactly(length)
            await asyncio.sleep(latency_s)
            writer.write(response)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _serve_fast(port: int, latency_s: float, ready: Any) -> None:
    data = json.dumps(completion_body("Reasoned briefly. Verdict: YES")).encode()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, response, latency_s), "127.0.0.1", port, backlog=2048
    )
    ready.put(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def serve_fast(port: int, latency_s: float, ready: Any) -> None:
    """Process target: serve fixed replies after `latency_s`; puts the bound port on `ready`."""
    asyncio.run(_serve_fast(port, latency_s, ready))


# --- stores with rollouts, no model needed -----------------------------------------------------

SMALL_SWEEP = {
    "name": "small",
    "model": "tiny",
    "steer_layer": 1,
    "patch_layers": "2-3",
    "samples": 2,
    "positive_words": ["Bread", "Trees"],
    "negative_words": ["Dust"],
}


def small_config(**sweep: Any) -> Any:
    return config_from_dict({"sweep": {**SMALL_SWEEP, **sweep}})


def add_judge_config(store: Any) -> int:
    """A judge config row (model m, reasoning low) in an open store; its id."""
    from patchdb.store.models import JudgeConfig

    def add(session: Any) -> int:
        row = JudgeConfig(model="m", reasoning="low", template_version="v", backend="openai")
        session.add(row)
        session.flush()
        return int(row.id)

    return int(store.transact(add))


def make_store(
    db_path: Path,
    answer: str | Callable[[int, str], str] = "Yes, I notice a thought about {word}. ({i})",
    first: int = 0,
    last: int | None = None,
    **sweep: Any,
) -> int:
    """Register a small sweep and insert every rollout it expects; returns the rollout count.

    `answer` is a format string with {word} (the target's word, else the source's) and {i}
    (the rollout's running number), or a function of (i, word), so a test can put fault
    directives into chosen answers. Only rollouts numbered first..last-1 are inserted, so a
    test can add the rest later, as a running generate would.
    """
    config = small_config(**sweep)
    store = open_store(str(db_path), create=True)
    try:
        def fill(session: Any) -> int:
            sweep_row, _ = register_sweep(session, config)
            experiments = get_experiments(session, sweep_row)
            n, added = 0, 0
            for unit in expected_units(config, experiments):
                for sample in range(config.samples):
                    if n < first or (last is not None and n >= last):
                        n += 1
                        continue
                    word = unit.target_word or unit.source_word
                    session.add(
                        Rollout(
                            experiment_id=unit.experiment_id,
                            patch_layer=unit.patch_layer,
                            source_word=unit.source_word,
                            target_word=unit.target_word,
                            sample_index=sample,
                            answer=answer(n, word) if callable(answer)
                            else answer.format(word=word, i=n),
                            n_tokens=10,
                            finish_reason="length",
                            seed=sample,
                        )
                    )
                    n += 1
                    added += 1
            return added

        return store.transact(fill)
    finally:
        store.close()
