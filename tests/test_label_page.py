"""The labeling page in headless Chromium: keys pressed on the page become rows in the store, and
two tabs of the page are two sessions.

The page is served by the real server on a free loopback port; Chromium is driven over the
DevTools protocol (the small client of test_html_report), and keys arrive as real key events.
The server's guards, request by request, are tested in test_label_server.
"""

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from label_client import Tab, serving
from label_client import stored as stored_labels
from labeled_store import fill, init_store
from test_html_report import CHROMIUM, DevTools, browser, wait_for

from patchdb.label.server import server_url
from patchdb.store import Store, open_store

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


def press_and_settle(tools: DevTools, key: str) -> None:
    """Press a key and wait until the page has finished what it does (even if it shows the same
    answer again)."""
    before = int(tools.js("document.body.dataset.steps || '0'"))
    press(tools, key)
    wait_for(tools, f"Number(document.body.dataset.steps || '0') > {before}", timeout_s=30)


def stored(store: Store) -> dict[int, bool]:
    return stored_labels(store, "coherence")


def rollout(key: str) -> int:
    return int(key.split(":")[0])


@needs_chromium
def test_keys_on_the_page_become_labels_with_skip_and_undo(store: Store) -> None:
    with serving(store, target=3) as server, \
            browser(server_url(server), loaded=PAGE_LOADED) as tools:
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



@needs_chromium
def test_two_tabs_are_two_sessions_and_a_closed_tab_frees_its_answer(store: Store) -> None:
    """A second tab of the same URL shows another answer; undo in one tab never takes back a
    label of the other; closing a tab frees the answer it showed at once."""
    with serving(store, target=10) as server, \
            browser(server_url(server), loaded=PAGE_LOADED) as first:
        wait_for(first, "document.body.dataset.state === 'asking'", timeout_s=30)
        devtools = f"http://127.0.0.1:{first.sock.getpeername()[1]}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opened = json.load(opener.open(urllib.request.Request(
            f"{devtools}/json/new?{server_url(server)}", method="PUT"), timeout=30))
        second = DevTools(opened["webSocketDebuggerUrl"])
        wait_for(second, f"{PAGE_LOADED} && document.body.dataset.state === 'asking'",
                 timeout_s=30)
        a, b = shown(first), shown(second)
        assert a != b

        c = press_and_wait(second, "y")
        assert stored(store) == {rollout(b): True}
        press_and_settle(first, "u")  # the first tab labeled nothing: nothing to undo
        assert stored(store) == {rollout(b): True} and shown(first) == a
        assert c not in (a, b)

        # Closing the second tab frees c: a new page load is shown c, the plan's next answer.
        second.sock.close()
        opener.open(f"{devtools}/json/close/{opened['id']}", timeout=30)
        deadline = time.monotonic() + 30
        while True:
            probe = Tab(server)  # a page load that looks, then closes (so it holds nothing)
            item = probe.next()
            assert probe.call("POST", "/api/close", {})[0] == 200
            if item is not None and f"{item['rollout_id']}:{item['grader']}" == c:
                break
            assert time.monotonic() < deadline, "the closed tab kept its answer"
            time.sleep(0.1)
        press_and_wait(first, "n")
    assert stored(store) == {rollout(b): True, rollout(a): False}
