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

from patchdb.judge.verdict import parse_verdict


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
    ],
)
def test_verdict_rule(reply: str | None, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


# --- a reply cut off before it finished never gives a verdict ----------------------------------


class CutOffServer(FaultServer):
    """The fault server, except that a cut-off reply ends with a verdict word ("... YES"), so
    a judge that parsed cut-off replies would get a verdict out of it."""

    def _handler_class(self) -> Any:
        base: Any = super()._handler_class()

        class Handler(base):  # type: ignore[misc, valid-type]
            def _answer(self, fault: str | None, word: str, body: dict[str, Any]) -> None:
                if fault == "length":
                    self._send(200, completion_body("I was about to answer YES", "length"), {})
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
    """Rollout 0: cut off on every attempt; rollout 1: cut off once, then a finished NO."""
    if i == 0:
        return f"answer {i} [[fault=length*3]]"
    if i == 1:
        return f"answer {i} [[fault=length*1]] [[reply=NO]]"
    return f"answer {i}"


def test_a_cut_off_reply_is_retried_and_never_gives_a_verdict(
        db_path: Path, server: CutOffServer) -> None:
    make_store(db_path, _answer)
    result = run_cli("judge", "--db", db_path, "--graders", "coherence", "--max-attempts", "3")
    assert result.exit_code == 0, result.output
    assert server.stats.injected["length"] == 4  # 3 for rollout 0, 1 for rollout 1
    with sqlite3.connect(db_path) as conn:
        rows = dict(((answer.split(" [[")[0]), (verdict, error, attempts, raw))
                    for answer, verdict, error, attempts, raw in conn.execute(
            "SELECT r.answer, j.verdict, j.error, j.attempts, j.raw_reply "
            "FROM judgments j JOIN rollouts r ON r.id = j.rollout_id"))
    assert rows["answer 0"] == (None, "reply not finished (finish reason 'length')", 3,
                                "I was about to answer YES")
    assert rows["answer 1"] == (0, None, 2, "The answer was read with care. Verdict: NO")
    assert rows["answer 2"][:3] == (1, None, 1)
