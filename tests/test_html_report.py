"""The HTML report: what report.html and its rollout pages hold, and what a user sees in headless
Chromium after following a rate cell to its rollouts and filtering them.

The Chromium tests drive Debian's `chromium` over the DevTools protocol with a small WebSocket
client written here (no selenium or playwright), and with `--dump-dom` for a filter in the URL.
"""

import base64
import gc
import json
import math
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.experiments import EXPERIMENTS, experiment_keys, judged_word
from patchdb.label.labels import set_label
from patchdb.report import build_report
from patchdb.report.calibration_html import has_labels
from patchdb.report.html import REPORT_FILE, write_html_report
from patchdb.store import Experiment, JudgeConfig, Judgment, Rollout, Store, open_store
from patchdb.store.models import Sweep
from patchdb.store.sweeps import get_sweep

CONFIG = """
[sweep]
name = "tiny"
model = "HuggingFaceTB/SmolLM2-135M-Instruct"
dtype = "float32"
steer_layer = 1
patch_layers = "3-4"
samples = 2
positive_words = ["Bread", "Trees"]
negative_words = ["Dust", "Milk"]
"""
# An answer that would break a page that did not escape: markup, a script end tag, non-ASCII.
NASTY = 'I detect <b>Bread</b></script><script>document.title="pwned"</script> — 麵包 🍞 & co'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install -y chromium); CI installs it",
)


def verdicts(layer: int, source: str, target: str, sample: int) -> tuple[bool, bool]:
    """The made-up judge: incoherent on sample 1 at layer 4; detects at layer 3 or for Bread."""
    return not (layer == 4 and sample == 1), layer == 3 or judged_word(source, target) == "Bread"


def judged(where: tuple[str, int, str, int, str], verdict: bool, answer: str) -> dict[str, Any]:
    """The stored judgment: the made-up verdict, except one unparsed reply and one failed call."""
    if where == ("steered_to_unsteered", 4, "Bread", 1, "detection"):
        return {"verdict": None, "raw_reply": "Hard to say. MAYBE"}
    if where == ("unsteered_to_steered", 3, "Trees", 1, "coherence"):
        return {"verdict": None, "raw_reply": None, "error": "HTTP 500 after 3 attempts"}
    reply = f"Reasoning about {where[4]} of <{answer}>. " + ("YES" if verdict else "NO")
    return {"verdict": verdict, "raw_reply": reply}


def fill(session: Session) -> None:
    """12 keys x 2 layers x 2 samples, judged by `verdicts`, plus the odd cases a page must show."""
    main = JudgeConfig(model="judge-a", reasoning="low", template_version="v1", backend="openai")
    other = JudgeConfig(model="judge-b", reasoning="low", template_version="v1", backend="openai")
    session.add_all([main, other])
    session.flush()
    for exp in session.scalars(select(Experiment).order_by(Experiment.id)):
        d = EXPERIMENTS[exp.name]
        keys = experiment_keys(d, ["Bread", "Trees"], ["Dust", "Milk"])
        for layer in (3, 4):
            for source, target in keys:
                for sample in (0, 1):
                    answer = f"{exp.name} {layer} {source or '-'}>{target or '-'} #{sample}"
                    if (exp.name, layer, source, target, sample) == (
                            "failure_to_success", 3, "Dust", "Bread", 0):
                        answer = NASTY
                    rollout = Rollout(experiment_id=exp.id, patch_layer=layer, source_word=source,
                                      target_word=target, sample_index=sample, answer=answer,
                                      n_tokens=12, finish_reason="stop", seed=sample)
                    session.add(rollout)
                    session.flush()
                    coherent, detected = verdicts(layer, source, target, sample)
                    for grader, verdict in (("coherence", coherent),
                                            (d.detection_grader, detected)):
                        where = (exp.name, layer, source or target, sample, grader)
                        session.add(Judgment(rollout_id=rollout.id, grader=grader,
                                             judge_config_id=main.id,
                                             **judged(where, verdict, answer)))
                    if exp.name == "failure_to_success" and layer == 3 and sample == 0:
                        session.add(Judgment(rollout_id=rollout.id, grader="coherence",
                                             judge_config_id=other.id, verdict=False,
                                             raw_reply="judge-b says NO"))


@pytest.fixture
def store(tmp_path: Path, db_path: Path) -> Iterator[Store]:
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    assert run_cli("init", "--config", str(config), "--db", str(db_path)).exit_code == 0
    store = open_store(str(db_path))
    store.transact(fill)
    yield store
    store.close()


@pytest.fixture
def page(store: Store, tmp_path: Path) -> Path:
    return write_html_report(store, None, tmp_path / "report")


def embedded(path: Path) -> dict[str, Any]:
    """The data a rollout page carries."""
    html = path.read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="rollout-data">(.*?)</script>', html, re.S)
    assert match is not None
    data: dict[str, Any] = json.loads(match.group(1))
    return data


def linked_pages(page: Path) -> list[Path]:
    """The rollout pages report.html links to from its Rollouts section, in order."""
    section = page.read_text("utf-8").split('<section id="browser">')[1].split("</section>")[0]
    return [page.parent / href for href in re.findall(r'<a href="([^"#]+)">', section)]


def stored_answers(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT id, answer FROM rollouts"))


def test_main_page_is_self_contained_and_links_the_rollout_pages(page: Path,
                                                                   db_path: Path) -> None:
    html = page.read_text(encoding="utf-8")
    assert page.name == REPORT_FILE
    assert html.count('src="data:image/png;base64,') == 4  # one plot per experiment
    # nothing loads from elsewhere; links go only to its own rollout pages or its own anchors
    assert not re.search(r'src="(?!data:)', html)
    assert set(re.findall(r'href="([^"#]*)', html)) - {""} == {
        f"rollouts/{e}/layer_{layer}.html" for e in EXPERIMENTS for layer in (3, 4)}
    assert "<script" not in html  # no rollouts inlined, no code
    assert not any(answer in html for answer in stored_answers(db_path).values())
    assert "judge config #1 (openai: judge-a" in html  # the config with the most judgments
    assert "judgments from 2 judge configs" in html
    assert "All 48 rollouts are in the rollout pages, one page per experiment and layer." in html
    pages = linked_pages(page)
    order = re.findall(r'<section id="rates-([^"]+)">', html)  # the sweep's experiments
    assert sorted(order) == sorted(EXPERIMENTS)
    assert [p.relative_to(page.parent).as_posix() for p in pages] == [
        f"rollouts/{e}/layer_{layer}.html" for e in order for layer in (3, 4)]
    # a cell holds the number of rollouts on its page: 2 samples of each key
    row = html.split("<th>failure_to_success</th>")[-1].split("</tr>")[0]
    assert re.findall(r">(\d+)</a>", row) == ["8", "8"]


def test_rollout_pages_hold_every_rollout_exactly_once(page: Path, db_path: Path) -> None:
    answers = stored_answers(db_path)
    assert len(answers) == 48
    seen: list[int] = []
    for path in linked_pages(page):
        data = embedded(path)
        experiment, layer = path.parent.name, int(path.stem.removeprefix("layer_"))
        assert {(r["experiment"], r["layer"]) for r in data["rollouts"]} == {(experiment, layer)}
        for r in data["rollouts"]:
            assert r["answer"] == answers[r["id"]]
            seen.append(r["id"])
        html = path.read_text(encoding="utf-8")
        assert html.count("</script>") == 2  # the data tag and the code tag; none from an answer
        assert '<a href="../../report.html">' in html
    assert sorted(seen) == sorted(answers)  # every rollout, none twice
    nasty_page = page.parent / "rollouts" / "failure_to_success" / "layer_3.html"
    assert "<b>Bread</b>" not in nasty_page.read_text(encoding="utf-8")
    nasty = [r for r in embedded(nasty_page)["rollouts"] if r["answer"] == NASTY]
    assert len(nasty) == 1 and nasty[0]["key"] == "Dust_to_Bread"
    assert nasty[0]["judgments"]["coherence"]["reply"] == f"Reasoning about coherence of <{NASTY}>. YES"


def test_rollout_pages_on_each_backend(store_db: str, tmp_path: Path) -> None:
    """The pages' query (each key's first samples, the judgments joined) on SQLite and
    PostgreSQL: every rollout on one page, with its verdicts."""
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    assert run_cli("init", "--config", str(config), "--db", store_db).exit_code == 0
    store = open_store(store_db)
    try:
        store.transact(fill)
        with store.read() as session:
            answers = {rid: answer for rid, answer in session.execute(
                select(Rollout.id, Rollout.answer))}
        page = write_html_report(store, None, tmp_path / "report")
    finally:
        store.close()
    rows = [r for p in linked_pages(page) for r in embedded(p)["rollouts"]]
    assert sorted(r["id"] for r in rows) == sorted(answers)
    assert all(r["answer"] == answers[r["id"]] for r in rows)
    unparsed = [r for r in rows if r["experiment"] == "steered_to_unsteered" and r["layer"] == 4
                and r["source"] == "Bread" and r["sample"] == 1]
    assert unparsed[0]["judgments"]["detection"] == {"verdict": None,
                                                     "reply": "Hard to say. MAYBE", "error": None}
    assert unparsed[0]["score"] is None
    assert rate_cells(page.read_text("utf-8"), "failure_to_success")[2] == ["4", "50", "0"]


def rate_cells(html: str, experiment: str) -> list[list[str]]:
    """The rate table of one experiment as rows of cell texts (header row first)."""
    section = html.split(f'<section id="rates-{experiment}">')[1].split("</section>")[0]
    table = section.split('<table class="rates">')[1].split("</table>")[0]
    table = re.sub(r'<span class="band">[^<]*</span>', "", table)  # the bands: band_cells
    cells = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in table.split("<tr>")[1:]]
    return [[re.sub(r"<[^>]+>", "", cell) for cell in row] for row in cells]


def band_cells(html: str, experiment: str) -> list[list[str]]:
    """The 95% bands in one experiment's rate table, per row (cells without one left out)."""
    section = html.split(f'<section id="rates-{experiment}">')[1].split("</section>")[0]
    table = section.split('<table class="rates">')[1].split("</table>")[0]
    return [re.findall(r'<span class="band">([^<]*)</span>', row)
            for row in table.split("<tr>")[2:]]


def test_rate_tables_carry_the_bands_over_words(page: Path) -> None:
    """failure_to_success: at layer 3 both sources of each target score 2/2; at layer 4
    Bread's score 1/2 and Trees' 0/2. Two sources that agree (no spread to estimate): the band
    is Wilson's at one source's 2 samples, not the line's 4, with Student's t on 1 df (2
    sources) for z. In whole percent."""
    html = page.read_text(encoding="utf-8")
    t1 = math.tan(math.pi * 0.475)  # Student's t, 97.5%, 1 df

    def band(p: float, n: float) -> str:
        centre = (p + t1 * t1 / (2 * n)) / (1 + t1 * t1 / n)
        half = t1 / (1 + t1 * t1 / n) * math.sqrt(p * (1 - p) / n + t1 * t1 / (4 * n * n))
        return f"{round(100 * max(0.0, centre - half))}-{round(100 * min(1.0, centre + half))}"

    assert band_cells(html, "failure_to_success") == [[band(1.0, 2)] * 2,
                                                      [band(0.5, 2), band(0.0, 2)]]
    assert band(1.0, 2) != band(1.0, 4)
    assert "Small figures: the 95% band of a mean line (Wilson-t over 2 sources)." in html
    assert "(Wilson-t over 2 words)" in html


def test_rate_tables_show_percent_like_the_terminal(page: Path) -> None:
    html = page.read_text(encoding="utf-8")
    # Layer 3: everything coherent and detected. Layer 4: sample 1 incoherent, only Bread detected.
    assert rate_cells(html, "failure_to_success") == [
        ["Layer", "Bread", "Trees"], ["3", "100", "100"], ["4", "50", "0"]]
    # Bread at layer 4: sample 1's detection is unparsed, so only sample 0 (a success) counts.
    # Trees at layer 3: sample 1's coherence call failed, so only sample 0 counts.
    assert rate_cells(html, "steered_to_unsteered") == [
        ["Layer", "Bread", "Trees", "Mean"], ["3", "100", "100", "100"],
        ["4", "100", "0", "50"]]
    assert rate_cells(html, "unsteered_to_steered")[1:] == [
        ["3", "100", "100", "100"], ["4", "50", "0", "25"]]
    assert "<h3>Rate (%) per patch layer and steered word</h3>" in html


def test_rate_cells_link_to_their_words_rollouts(page: Path) -> None:
    html = page.read_text(encoding="utf-8")
    section = html.split('<section id="rates-failure_to_success">')[1].split("</section>")[0]
    links = re.findall(r'<a href="([^"]+)">', section.split('<table class="rates">')[1])
    assert links == ["rollouts/failure_to_success/layer_3.html#word=Bread",
                     "rollouts/failure_to_success/layer_3.html#word=Trees",
                     "rollouts/failure_to_success/layer_4.html#word=Bread",
                     "rollouts/failure_to_success/layer_4.html#word=Trees"]
    assert all((page.parent / link.split("#")[0]).exists() for link in links)


def test_rollout_pages_hold_at_most_the_cap_per_key(store: Store, tmp_path: Path) -> None:
    path = write_html_report(store, "tiny", tmp_path / "capped", samples_per_key=1)
    rollouts = [r for p in linked_pages(path) for r in embedded(p)["rollouts"]]
    assert len(rollouts) == 24
    assert {r["sample"] for r in rollouts} == {0}
    assert "The rollout pages hold 24 of the 48 rollouts: at most 1 samples" in path.read_text(
        "utf-8")
    layer = (tmp_path / "capped" / "rollouts" / "steered_to_unsteered" / "layer_4.html")
    assert ("This page holds 2 of the 4 rollouts of this experiment at this layer"
            in layer.read_text("utf-8"))


def test_the_cap_takes_the_lowest_sample_indices_where_some_are_missing(
        store_db: str, tmp_path: Path) -> None:
    """A key whose samples are 9, 4, 7 and 1 (stored in that order, the rest never generated)
    shows 1 and 4 under a cap of 2, a key with one sample shows it, on SQLite and PostgreSQL."""
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    assert run_cli("init", "--config", str(config), "--db", store_db).exit_code == 0
    store = open_store(store_db)

    def gaps(session: Session) -> None:
        exp = session.scalars(select(Experiment).where(
            Experiment.name == "steered_to_unsteered")).one()
        for layer, word, sample in [(3, "Bread", 9), (3, "Bread", 4), (3, "Bread", 7),
                                    (3, "Bread", 1), (3, "Trees", 5), (4, "Bread", 0),
                                    (4, "Bread", 2), (4, "Bread", 3)]:
            session.add(Rollout(experiment_id=exp.id, patch_layer=layer, source_word=word,
                                target_word="", sample_index=sample, answer=f"{word} #{sample}",
                                n_tokens=3, finish_reason="stop", seed=sample))

    try:
        store.transact(gaps)
        path = write_html_report(store, "tiny", tmp_path / "capped", samples_per_key=2)
    finally:
        store.close()
    shown = sorted((r["layer"], r["source"], r["sample"])
                   for p in linked_pages(path) for r in embedded(p)["rollouts"])
    assert shown == [(3, "Bread", 1), (3, "Bread", 4), (3, "Trees", 5), (4, "Bread", 0),
                     (4, "Bread", 2)]


def test_a_second_report_removes_pages_of_layers_gone_from_the_store(
        store: Store, page: Path) -> None:
    stale = page.parent / "rollouts" / "failure_to_success" / "layer_9.html"
    stale.write_text("from an earlier report")
    kept = page.parent / "rollouts" / "notes.txt"
    kept.write_text("the user's own file")
    write_html_report(store, None, page.parent)
    assert not stale.exists() and kept.exists()
    assert len(linked_pages(page)) == 8


def test_report_command_writes_the_page_next_to_the_plots(store: Store, db_path: Path,
                                                          tmp_path: Path) -> None:
    result = run_cli("report", "--db", str(db_path), "--out", str(tmp_path / "out"), "--html")
    assert result.exit_code == 0, result.output
    page = tmp_path / "out" / REPORT_FILE
    assert f"HTML report: {page}" in result.output
    assert sum(len(embedded(p)["rollouts"]) for p in linked_pages(page)) == 48
    assert rate_cells(page.read_text("utf-8"), "failure_to_success")[2] == ["4", "50", "0"]


@pytest.mark.parametrize("options", [["--ci"], ["--experiments", "steered_to_unsteered"],
                                     ["--judge-config", "1"]])
def test_report_html_with_other_options_shows_the_plain_rates(store: Store, db_path: Path,
                                                              tmp_path: Path,
                                                              options: list[str]) -> None:
    """The page reuses the command's rates only where they are the plain ones of every
    experiment under the same judge config; a narrowed command's page counts its own."""
    result = run_cli("report", "--db", str(db_path), "--out", str(tmp_path / "out"), "--html",
                     *options)
    assert result.exit_code == 0, result.output
    html = (tmp_path / "out" / REPORT_FILE).read_text("utf-8")
    assert rate_cells(html, "failure_to_success")[1:] == [["3", "100", "100"], ["4", "50", "0"]]
    assert rate_cells(html, "steered_to_unsteered")[2] == ["4", "100", "0", "50"]


def test_the_report_runs_without_the_cyclic_collector_and_turns_it_back_on(
        store: Store, tmp_path: Path) -> None:
    """What `report --html` runs (build_report, then write_html_report with its rates) sets off
    no collection of the cyclic garbage collector inside either function (patchdb.report.gc_pause),
    and the collector is on again after each, also after an error; a caller who had it off
    finds it off."""
    bodies = {getattr(f, "__wrapped__", f).__code__ for f in (build_report, write_html_report)}
    inside: list[int] = []  # generations collected while either function's body was running

    def seen(phase: str, info: dict[str, int]) -> None:
        frame = sys._getframe(0).f_back
        while phase == "start" and frame is not None:
            if frame.f_code in bodies:
                inside.append(info["generation"])
                return
            frame = frame.f_back

    gc.callbacks.append(seen)
    try:
        report = build_report(store, None, out_dir=tmp_path / "out")
        on_after_report = gc.isenabled()
        page = write_html_report(store, None, tmp_path / "out", report=report)
        on_after_page = gc.isenabled()
        with pytest.raises(ValueError, match="samples_per_key"):
            write_html_report(store, None, tmp_path / "bad", samples_per_key=0)
        on_after_error = gc.isenabled()
        gc.disable()
        try:
            write_html_report(store, None, tmp_path / "again")
            off_after = not gc.isenabled()
        finally:
            gc.enable()
    finally:
        gc.callbacks.remove(seen)
    assert page.exists() and len(report.experiments) == 4
    assert inside == []
    assert on_after_report and on_after_page and on_after_error and off_after


def test_a_label_in_another_sweep_gives_no_calibration_section(store_db: str,
                                                                tmp_path: Path) -> None:
    """has_labels looks from the labels to their sweep: a label on sweep "other" is found for
    "other" and not for "tiny", on SQLite and PostgreSQL."""
    for name in ("tiny", "other"):
        config = tmp_path / f"{name}.toml"
        config.write_text(CONFIG.replace('name = "tiny"', f'name = "{name}"'))
        assert run_cli("init", "--config", str(config), "--db", store_db).exit_code == 0
    store = open_store(store_db)

    def one_label(session: Session) -> None:
        exp = session.scalars(select(Experiment).join(Sweep).where(Sweep.name == "other")).first()
        assert exp is not None
        rollout = Rollout(experiment_id=exp.id, patch_layer=3, source_word="Bread",
                          target_word="", sample_index=0, answer="labeled", n_tokens=1)
        session.add(rollout)
        session.flush()
        set_label(session, rollout.id, "coherence", "ada", True)

    try:
        store.transact(one_label)
        with store.read() as session:
            found = {name: has_labels(session, get_sweep(session, name))
                     for name in ("tiny", "other")}
    finally:
        store.close()
    assert found == {"tiny": False, "other": True}


def test_unjudged_sweep_still_gets_a_page(tmp_path: Path, db_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(CONFIG)
    run_cli("init", "--config", str(config), "--db", str(db_path))
    store = open_store(str(db_path))
    html = write_html_report(store, None, tmp_path / "out").read_text("utf-8")
    store.close()
    assert ('<p class="note missing">No rates: no rollouts yet: run `patchdb generate`</p>'
            in html and "All 0 rollouts are in the rollout pages" in html)
    assert not (tmp_path / "out" / "rollouts").exists() or not any(
        (tmp_path / "out" / "rollouts").rglob("*.html"))


# --- headless Chromium -------------------------------------------------------------------------

def chromium_args(profile: str) -> list[str]:
    assert CHROMIUM is not None
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-proxy-server", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--window-size=1280,1600"]


class DevTools:
    """Just enough of a WebSocket client (RFC 6455) to send DevTools commands to one page."""

    def __init__(self, ws_url: str) -> None:
        url = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)
        assert response.split(b"\r\n")[0].split()[1] == b"101", response
        self.last_id = 0

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            data += chunk
        return data

    def _send(self, payload: bytes) -> None:
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        mask = os.urandom(4)
        masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n))
        self.sock.sendall(b"\x81" + size + mask + masked.tobytes())

    def _receive(self) -> dict[str, Any]:
        parts = []
        while True:
            head = self._read(2)
            n = head[1] & 0x7F
            if n >= 126:
                n = int.from_bytes(self._read(2 if n == 126 else 8), "big")
            parts.append(self._read(n))
            if head[0] & 0x80:  # the last frame of the message
                message: dict[str, Any] = json.loads(b"".join(parts))
                return message

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self._send(json.dumps({"id": self.last_id, "method": method, "params": params}).encode())
        while True:
            message = self._receive()
            if message.get("id") == self.last_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result

    def js(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")


FILE_LOADED = "location.protocol === 'file:' && document.readyState === 'complete'"


@contextmanager
def browser(url: str, loaded: str = FILE_LOADED) -> Iterator[DevTools]:
    """Chromium showing `url`, driven over its DevTools port, handed over once the JavaScript
    condition `loaded` holds; killed afterwards."""
    # Chromium's helper processes may still write to the profile as it is removed
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([*chromium_args(profile), "--remote-debugging-port=0", url],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 120  # a loaded CI machine starts chromium slowly
            while not port_file.exists() or not port_file.read_text().strip():
                assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            pages: list[dict[str, Any]] = []
            while not pages:
                assert time.monotonic() < deadline, "chromium opened no page"
                targets = json.load(opener.open(f"http://127.0.0.1:{port}/json/list", timeout=30))
                pages = [t for t in targets if t["type"] == "page"]
            tools = DevTools(pages[0]["webSocketDebuggerUrl"])
            while not tools.js(loaded):
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.1)
            yield tools
            tools.sock.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


VISIBLE_ROWS = """Array.from(document.querySelectorAll('#rows .rollout')).map(a => ({
  id: Number(a.dataset.rolloutId), key: a.querySelector('.key').textContent,
  layer: a.querySelector('.layer').textContent, answer: a.querySelector('.answer').textContent,
  markup: a.querySelector('.answer').children.length,
  verdicts: Array.from(a.querySelectorAll('.grader')).map(
    g => g.dataset.grader + ' ' + g.querySelector('.verdict').textContent)}))"""


def choose(tools: DevTools, field: str, value: str) -> None:
    """Pick an option in one of the browser's filters, the way a change by a user arrives."""
    tools.js(f"(() => {{ const s = document.getElementById('f-{field}'); s.value = {value!r};"
             " s.dispatchEvent(new Event('change')); })()")


def wait_for(tools: DevTools, condition: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not tools.js(condition):
        assert time.monotonic() < deadline, f"never true: {condition}"
        time.sleep(0.05)


def wait_across_pages(tools: DevTools, condition: str, timeout_s: float = 60) -> None:
    """Wait for `condition` while a link loads another page (its evaluation fails meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if tools.js(condition):
                return
        except AssertionError:  # the old page's context went away mid-evaluation
            pass
        assert time.monotonic() < deadline, f"never true: {condition}"
        time.sleep(0.05)


ON_PAGE = ("location.pathname.endsWith({path!r}) && document.readyState === 'complete' && "
           "document.querySelectorAll('#rows .rollout').length === {n}")


@needs_chromium
def test_a_rate_cell_opens_its_rollouts_and_filters_work_in_chromium(page: Path,
                                                                     tmp_path: Path) -> None:
    with browser(page.as_uri()) as tools:
        assert tools.js("document.title") == "patchdb report: tiny"
        # A rate cell takes the researcher to the page of its layer, filtered to its word.
        tools.js("document.querySelector('#rates-failure_to_success a[href="
                 "\"rollouts/failure_to_success/layer_4.html#word=Bread\"]').click()")
        wait_across_pages(tools, ON_PAGE.format(path="failure_to_success/layer_4.html", n=4))
        assert {r["key"] for r in tools.js(VISIBLE_ROWS)} == {"Dust_to_Bread", "Milk_to_Bread"}
        assert {r["layer"] for r in tools.js(VISIBLE_ROWS)} == {"layer 4"}
        assert tools.js("document.getElementById('f-word').value") == "Bread"
        choose(tools, "word", "")
        assert len(tools.js(VISIBLE_ROWS)) == 8  # 4 keys x 2 samples at this layer
        choose(tools, "verdict", "score:pass")
        rows = tools.js(VISIBLE_ROWS)
        assert [r["key"] for r in rows] == ["Dust_to_Bread", "Milk_to_Bread"]
        assert rows[0]["verdicts"] == ["coherence YES", "detection_identification YES"]
        assert tools.js("document.getElementById('match-count').textContent") == (
            "2 of 8 rollouts on this page match.")
        assert "verdict=score%3Apass" in tools.js("location.hash")
        # The page's own links lead to the experiment's other layers.
        tools.js("Array.from(document.querySelectorAll('a')).find("
                 "a => a.textContent === 'layer 3').click()")
        wait_across_pages(tools, ON_PAGE.format(path="failure_to_success/layer_3.html", n=8))
        choose(tools, "key", "Dust_to_Bread")
        rows = tools.js(VISIBLE_ROWS)
        assert [r["answer"] for r in rows][0] == NASTY and rows[0]["markup"] == 0
        # the answer's script never ran
        assert tools.js("document.title") == ("patchdb rollouts: tiny, failure_to_success, "
                                              "layer 3")
        shot = base64.b64decode(tools.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "report.png").write_bytes(shot)
    pixels = np.asarray(Image.open(tmp_path / "report.png").convert("L"), dtype=float)
    assert pixels.shape[1] >= 1000 and pixels.std() > 10, "the screenshot looks blank"


@needs_chromium
def test_a_filter_in_the_url_hash_applies_on_load(page: Path) -> None:
    layer = page.parent / "rollouts" / "steered_to_unsteered" / "layer_4.html"
    url = layer.as_uri() + "#verdict=detection:unparsed"
    # Chromium's helper processes may still write to the profile as it is removed
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        dom = subprocess.run([*chromium_args(profile), "--dump-dom", url], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    rows = re.findall(r'<article class="rollout" data-rollout-id="(\d+)">(.*?)</article>', dom)
    assert len(rows) == 1
    assert '<span class="key">Bread</span>' in rows[0][1]
    assert ">unparsed</span>" in rows[0][1] and "Hard to say. MAYBE" in rows[0][1]
