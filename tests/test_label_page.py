"""The labeling page in headless Chromium: keys pressed on the page become rows in the store.

The page is served by the real server on a free loopback port; Chromium is driven over the
DevTools protocol (the small client of test_html_report), and keys arrive as real key events.
"""

import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from labeled_store import fill, init_store
from sqlalchemy import select
from test_html_report import CHROMIUM, DevTools, browser, wait_for

from patchdb.label.server import Session, make_server, server_url
from patchdb.store import Store, open_store
from patchdb.store.models import Label

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install -y chromium); CI installs it",
)


@pytest.fixture
def store(db_path: Path, tmp_path: Path) -> Iterator[Store]:
    init_store(str(db_path), tmp_path)
    store = open_store(str(db_path))
    store.transact(fill)
    yield store
    store.close()


@contextmanager
def serving(store: Store, target: int) -> Iterator[str]:
    state = Session(store, None, ["coherence"], "ada", target, None)
    server = make_server(state)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_url(server)
    finally:
        server.shutdown()
        server.server_close()


# the label page, served over loopback HTTP, has loaded (not the blank page Chromium starts on)
PAGE_LOADED = "location.protocol === 'http:' && document.readyState === 'complete'"


def press(tools: DevTools, key: str) -> None:
    """A real key press: keyDown and keyUp events through Chromium's input pipeline."""
    code = ord(key.upper())
    tools.call("Input.dispatchKeyEvent", type="keyDown", key=key, code=f"Key{key.upper()}",
               text=key, windowsVirtualKeyCode=code)
    tools.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=f"Key{key.upper()}",
               windowsVirtualKeyCode=code)


def shown(tools: DevTools) -> str:
    value: str = tools.js("document.body.dataset.rollout || ''")
    return value


def press_and_wait(tools: DevTools, key: str) -> str:
    """Press a key and wait until the page shows another answer (or is done)."""
    before = shown(tools)
    press(tools, key)
    wait_for(tools, f"document.body.dataset.state === 'done' || "
                    f"document.body.dataset.rollout !== {before!r}", timeout_s=30)
    return shown(tools)


def stored(store: Store) -> dict[int, bool]:
    with store.read() as s:
        rows = s.execute(select(Label.rollout_id, Label.label).where(
            Label.grader == "coherence", Label.labeler == "ada")).all()
    return {int(r): bool(v) for r, v in rows}


def rollout(key: str) -> int:
    return int(key.split(":")[0])


@needs_chromium
def test_keys_on_the_page_become_labels_with_skip_and_undo(store: Store) -> None:
    with serving(store, target=3) as url, browser(url, loaded=PAGE_LOADED) as tools:
        wait_for(tools, "document.body.dataset.state === 'asking'", timeout_s=30)
        first = shown(tools)
        page_text = tools.js("document.body.innerText")
        assert "thinking..." not in page_text  # the judge's reasoning is hidden before a label
        assert tools.js("document.getElementById('previous').hidden") is True
        assert "Do you detect an injected thought?" in page_text
        assert tools.js("document.getElementById('progress').textContent").endswith(
            "coherence 0/3")

        second = press_and_wait(tools, "y")
        assert stored(store) == {rollout(first): True}  # committed before the next is shown
        assert tools.js("document.getElementById('previous').hidden") is False
        judge = tools.js("document.getElementById('prev-judge').textContent")
        reply = tools.js("document.getElementById('prev-reply').textContent")
        assert judge in ("YES", "NO") and reply == f"thinking... {judge}"

        third = press_and_wait(tools, "n")
        assert stored(store) == {rollout(first): True, rollout(second): False}
        fourth = press_and_wait(tools, "s")  # skipped: no row
        assert fourth != third
        assert stored(store) == {rollout(first): True, rollout(second): False}

        assert press_and_wait(tools, "u") == third  # undo the skip
        assert press_and_wait(tools, "u") == second  # undo the NO: the row is gone
        assert stored(store) == {rollout(first): True}

        assert press_and_wait(tools, "y") == third
        press_and_wait(tools, "y")
        wait_for(tools, "document.body.dataset.state === 'done'", timeout_s=30)
        assert tools.js("document.getElementById('progress').textContent").endswith(
            "coherence 3/3")
    assert stored(store) == {rollout(first): True, rollout(second): True, rollout(third): True}


def test_api_refuses_answers_the_page_never_showed(store: Store) -> None:
    with serving(store, target=3) as url:
        request = urllib.request.Request(url + "api/label", method="POST",
                                         data=json.dumps({"rollout_id": 1, "grader": "coherence",
                                                          "label": True}).encode())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener.open(request, timeout=10)
        assert refused.value.code == 400
        assert json.loads(refused.value.read()) == {
            "error": "rollout 1 (coherence) was not shown on this page"}
    assert stored(store) == {}


def test_an_idle_connection_does_not_stall_the_page(store: Store) -> None:
    """Browsers open sockets ahead of time and may send nothing on them for a while."""
    import socket

    with serving(store, target=3) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        idle = socket.create_connection(("127.0.0.1", port))
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            data = json.load(opener.open(url + "api/next", timeout=5))
        finally:
            idle.close()
    assert data["item"]["grader"] == "coherence" and "judge_verdict" not in data["item"]


def test_label_command_prints_a_loopback_url_and_stops_on_ctrl_c(store: Store,
                                                                  db_path: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "patchdb", "label", "--db", str(db_path),
                             "--labeler", "ada", "--grader", "coherence"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Labeling page for ada: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].split()[0]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert "<title>patchdb label</title>" in opener.open(url, timeout=10).read().decode()
        data = json.load(opener.open(url + "api/next", timeout=10))
        assert data["progress"] == [{"grader": "coherence", "labeled": 0, "target": 100,
                                     "available": 48}]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "Aborted."  # click turns Ctrl-C into Abort
