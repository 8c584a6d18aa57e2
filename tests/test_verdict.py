"""The verdict rule, case by case, and no verdict from a judge reply that was cut off.

Each expected value below was worked out by hand from the rule: (1) the letters of the last
whitespace-separated word, case-folded, decide if they are exactly "yes" or "no"; (2) else the
letters of the last 10 characters, case-folded, decide if they end with "yes" or "no"; (3) else
the reply is unparsed (None), never NO.
"""

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from judge_server import FaultServer, completion_body, make_store

from patchdb.judge.batch_collect import Prices, reply_values
from patchdb.judge.verdict import last_word_verdict, parse_verdict


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Verdict:YES", True),  # word "verdictyes"; tail "erdict:YES" -> "erdictyes" ends yes
        ("The model reports nothing, so NO.", False),  # word "NO." -> "no"
        ("yes/no", False),  # word "yesno"; tail "yes/no" -> "yesno" ends no
        ("**YES**", True),  # word -> "yes"
        ("I reasoned.\nYES\n```", True),  # word "```" -> ""; tail "d.\nYES\n```" -> "dyes"
        ("Yesterday", None),  # word "yesterday"; tail letters "yesterday" end "ay"
        ("", None),
        (None, None),
        ("  \n\t ", None),  # no word; tail letters ""
        ("Answer: no", False),  # word "no"
        ("Final answer: YES!", True),  # word "YES!" -> "yes"
        ("Yes. No.", False),  # the last word wins
        ("YES\n", True),
        ("NO YES maybe", None),  # word "maybe"; tail " YES maybe" -> "yesmaybe"
        ("YES, probably", None),  # word "probably"; tail ", probably" -> "probably"
        ("Nope", None),  # word "nope"; tail "nope" ends "pe"
        ("It says NO\n\n**Verdict**", None),  # tail "*Verdict**" -> "verdict": NO is too early
        ("verdict: yes .", True),  # word "." -> ""; tail "ict: yes ." -> "ictyes"
        ("Answer:YES", True),  # exactly 10 characters: "answeryes" ends yes
        ("Eyes", True),  # word "eyes"; tail letters "eyes" end with "yes": the rule says YES
        ("The thought was about a casino", False),  # tail "t a casino" -> "tacasino" ends no
        ("NO, clearly.", None),  # word "clearly"; tail ", clearly." -> "clearly"
        # the tail is taken after trailing whitespace is stripped
        ("Verdict:YES" + " " * 8, True),  # tail "erdict:YES" -> "erdictyes"
        ("Verdict:NO\n\n", False),  # word "verdictno"; tail "Verdict:NO" -> "verdictno"
        ("It says YES\n\n**Verdict** \t\n", None),  # tail "*Verdict**" -> "verdict"
        # exactly ten characters: the 10th from the end counts, the 11th does not
        ("The verdict is YES --- --", True),  # word "--"; tail "YES --- --" -> "yes"
        ("The verdict is YES ---- --", None),  # tail "ES ---- --" -> "es"
        ("The verdict is YES --- --  \n", True),  # stripped: "YES --- --"
        ("It is NO -------", False),  # word "-------"; tail "NO -------" -> "no"
        ("It is NO --------", None),  # tail "O --------" -> "o"
    ],
)
def test_verdict_rule(reply: str | None, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


# --- a reply cut off before it finished: retried; after the last attempt, read as it is ----------


class CutOffServer(FaultServer):
    """The fault server, except that a cut-off reply ends with a verdict word ("... YES") unless
    the answer asks for one that stops mid-word, so reading a cut-off reply gives a verdict."""

    def _handler_class(self) -> Any:
        base: Any = super()._handler_class()

        class Handler(base):  # type: ignore[misc, valid-type]
            def _answer(self, fault: str | None, word: str, body: dict[str, Any]) -> None:
                if fault == "length":
                    text = ("I was about to answer NO, but" if "[[midword]]" in str(body)
                            else "I was about to answer YES")
                    self._send(200, completion_body(text, "length"), {})
                else:
                    super()._answer(fault, word, body)

        return Handler


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[CutOffServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_BACKOFF", "0.01")
    srv = CutOffServer()
    srv.start()
    monkeypatch.setenv("PATCHDB_JUDGE_BASE_URL", srv.base_url)
    try:
        yield srv
    finally:
        srv.stop()


def _answer(i: int, _word: str) -> str:
    """0: cut off on every attempt, ending in YES; 1: cut off once, then a finished NO; 2: cut
    off, then HTTP 500 on the last attempts; 3: cut off on every attempt, ending in "but"."""
    return {0: "answer 0 [[fault=length*3]]",
            1: "answer 1 [[fault=length*1]] [[reply=NO]]",
            2: "answer 2 [[fault=length*1]] [[fault=500*2]]",
            3: "answer 3 [[fault=length*3]] [[midword]]"}.get(i, f"answer {i}")


UNFINISHED = "reply not finished (finish reason 'length')"


def test_a_cut_off_reply_is_retried_then_read_as_the_original_read_it(
        db_path: Path, server: CutOffServer) -> None:
    make_store(db_path, _answer)
    result = run_cli("judge", "--db", db_path, "--graders", "coherence", "--max-attempts", "3")
    assert result.exit_code == 0, result.output
    assert server.stats.injected["length"] == 3 + 1 + 1 + 3
    with sqlite3.connect(db_path) as conn:
        rows = dict(((answer.split(" [[")[0]), (verdict, cut_off, error, attempts, raw))
                    for answer, verdict, cut_off, error, attempts, raw in conn.execute(
            "SELECT r.answer, j.verdict, j.cut_off, j.error, j.attempts, j.raw_reply "
            "FROM judgments j JOIN rollouts r ON r.id = j.rollout_id"))
    # still cut off after the last attempt: its last word YES is its verdict, marked cut off
    assert rows["answer 0"] == (1, 1, None, 3, "I was about to answer YES")
    assert rows["answer 1"] == (0, 0, None, 2, "The answer was read with care. Verdict: NO")
    # the last attempt failed: no verdict from the cut-off reply of an earlier one
    assert rows["answer 2"][0] is None and rows["answer 2"][2].startswith("HTTP 500")
    # cut off with no verdict in it: unparsed, and the error keeps it for --retry-errors
    assert rows["answer 3"] == (None, 1, UNFINISHED, 3, "I was about to answer NO, but")
    assert rows["answer 4"][:4] == (1, 0, None, 1)
    status = run_cli("status", "--db", db_path)
    total = [line for line in status.output.splitlines() if line.startswith("total")][0]
    # unparsed, cut off, errors: answers 2 and 3 have no verdict and a stored reply that was
    # cut off (answer 2's from its first attempt), so both count as cut off
    assert total.split()[-3:] == ["0", "2", "0"]


@pytest.mark.parametrize(("text", "finish", "error", "expected"), [
    ("Verdict: YES", "stop", None, (True, None)),
    ("Verdict: YES", "length", UNFINISHED, (True, None)),  # an API reply cut off at the end
    ("Verdict: YES", "length", None, (True, None)),  # a local reply cut off (no retries)
    ("Verdict: Y", "length", UNFINISHED, (None, UNFINISHED)),
    ("Verdict: Y", "length", None, (None, None)),
    (None, "length", UNFINISHED, (None, UNFINISHED)),  # the cap spent on reasoning
    ("Verdict: YES", "length", "HTTP 500: boom", (None, "HTTP 500: boom")),
    ("Verdict: YES", "content_filter", "reply not finished (finish reason 'content_filter')",
     (None, "reply not finished (finish reason 'content_filter')")),
    ("Verdict: YES", None, "reply had no choices", (None, "reply had no choices")),
])
def test_what_a_last_word_reply_stores(text: str | None, finish: str | None, error: str | None,
                                       expected: tuple[bool | None, str | None]) -> None:
    assert last_word_verdict(text, finish, error) == expected


@pytest.mark.parametrize(("text", "finish", "verdict", "cut_off", "error"), [
    ("Reasoned. Verdict: NO", "stop", False, False, None),
    ("Reasoned. Verdict: NO", "length", False, True, None),  # cut off after its verdict
    ("Reasoned. Verdict: N", "length", None, True, UNFINISHED),  # waits for --retry-errors
    ("Reasoned. Verdict: NO", "content_filter", None, False,
     "reply not finished (finish reason 'content_filter')"),
])
def test_a_batch_reply_is_read_as_the_live_judge_reads_its_last_attempt(
        text: str, finish: str, verdict: bool | None, cut_off: bool, error: str | None) -> None:
    body = {"choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
    values = reply_values(body, Prices())
    assert (values["verdict"], values["cut_off"], values["error"], values["raw_reply"]) == (
        verdict, cut_off, error, text)
