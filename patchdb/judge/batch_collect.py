"""Turning a finished batch's output and error files into judgment rows.

Every line is matched to its key by custom_id, never by its place in the file. A reply is read
by the live judge's rules: a finished reply (finish reason "stop") gets the verdict of its last
word or None (unparsed, never NO); a reply cut off at the token cap is read by the same rule and
stored with cut_off set, and when it gives no verdict it keeps the live judge's error text, so
`--retry-errors` sends it again. A request the
provider failed (an error line, a non-200 status, a body that is no chat completion, a line
that cannot be read) becomes an error row: it may have been billed, so only `--retry-errors`
sends it again. Requests the provider never ran (an expired or cancelled batch) get no row and
are submitted again by the next run.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from patchdb.judge.batch_plan import CUSTOM_ID_IN_TEXT, Key, parse_custom_id
from patchdb.judge.verdict import last_word_verdict, unfinished
from patchdb.judge.writer import _UPDATED
from patchdb.store.dialect import dialect_insert
from patchdb.store.models import Judgment, utcnow

NOT_RUN = ("batch_expired", "batch_cancelled")  # error codes of requests that never ran
NO_RESULT = "the batch ended without a result for this request"


@dataclass(frozen=True)
class Prices:
    """USD per million prompt and completion tokens at live prices, and the batch's share."""

    price_in: float | None = None
    price_out: float | None = None
    discount: float = 0.5


@dataclass
class Outcome:
    """A batch's results, one row of judgment values per key, and what did not fit."""

    rows: dict[Key, dict[str, Any]] = field(default_factory=dict)
    not_run: set[Key] = field(default_factory=set)
    unknown_lines: int = 0  # lines naming no key of this batch, or with no custom_id at all


def _cost(usage: dict[str, Any], prices: Prices) -> float | None:
    """The reply's cost: the provider's own figure when usage carries one, else its tokens
    at the given live prices times the batch discount, else unknown."""
    reported = usage.get("cost")
    if isinstance(reported, int | float):
        return float(reported)
    if prices.price_in is None or prices.price_out is None:
        return None
    tokens_in, tokens_out = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    return (tokens_in * prices.price_in + tokens_out * prices.price_out) / 1e6 * prices.discount


def reply_values(body: Any, prices: Prices) -> dict[str, Any]:
    """Judgment values of one 200 reply, by the live judge's verdict rules."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return error_values(f"bad reply: not a chat completion: {json.dumps(body)[:200]}")
    usage: dict[str, Any] = body["usage"] if isinstance(body.get("usage"), dict) else {}
    details = usage.get("completion_tokens_details") or {}
    choice = body["choices"][0] if body["choices"] else None
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    reply = text if isinstance(text, str) else None
    values: dict[str, Any] = {
        "raw_reply": reply, "verdict": None, "p_yes": None,
        "cut_off": finish == "length", "error": None, "attempts": 1,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "reasoning_tokens": details.get("reasoning_tokens") if isinstance(details, dict) else None,
        "cost": _cost(usage, prices), "latency_s": None,
    }
    if choice is None:
        values["error"] = "reply had no choices"
    else:  # finished or cut off, read as the live judge reads its last attempt
        values["verdict"], values["error"] = last_word_verdict(
            reply, finish, None if finish == "stop" else unfinished(finish))
    return values


def error_values(error: str) -> dict[str, Any]:
    return {"raw_reply": None, "verdict": None, "p_yes": None, "cut_off": False, "error": error,
            "attempts": 1, "prompt_tokens": None, "completion_tokens": None,
            "reasoning_tokens": None, "cost": None, "latency_s": None}


def _line_values(obj: dict[str, Any], prices: Prices) -> dict[str, Any] | None:
    """Values of one parsed line; None for a request the provider never ran."""
    response, error = obj.get("response"), obj.get("error")
    if isinstance(error, dict) and not response:
        code = str(error.get("code") or "")
        if code in NOT_RUN:
            return None
        return error_values(f"batch request failed: {code}: {error.get('message')}"[:500])
    if not isinstance(response, dict):
        return error_values("bad reply: a batch result line without a response")
    status, body = response.get("status_code"), response.get("body")
    if status != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else body
        return error_values(f"HTTP {status}: {message}"[:500])
    return reply_values(body, prices)


def read_results(files: Iterable[bytes], keys: set[Key], config_id: int,
                 prices: Prices) -> Outcome:
    """Match the lines of a batch's output and error files to its keys."""
    out = Outcome()
    for data in files:
        for raw in data.splitlines():
            if not raw.strip():
                continue
            text = raw.decode("utf-8", "replace")
            try:
                obj = json.loads(text)
                cid = obj.get("custom_id") if isinstance(obj, dict) else None
            except ValueError:
                obj, found = None, CUSTOM_ID_IN_TEXT.search(text)
                cid = found[1] if found else None
            parsed = parse_custom_id(cid) if isinstance(cid, str) else None
            if parsed is None or parsed[2] != config_id or parsed[:2] not in keys:
                out.unknown_lines += 1
                continue
            key = (parsed[0], parsed[1])
            values = (_line_values(obj, prices) if obj is not None else
                      error_values(f"bad reply: an unreadable line in the batch output: "
                                   f"{text[:200]}"))
            if values is None:
                out.not_run.add(key)
            else:
                out.rows[key] = values
    return out


def write_rows(session: Session, rows: list[tuple[Key, dict[str, Any]]], config_id: int,
               stage_run_id: int) -> None:
    """Insert or replace the judgments of one chunk of results (the unique key makes a
    collection that is run again harmless)."""
    now = utcnow()
    values = [{**v, "rollout_id": rid, "grader": grader, "judge_config_id": config_id,
               "stage_run_id": stage_run_id, "created_at": now} for (rid, grader), v in rows]
    stmt = dialect_insert(session, Judgment)
    stmt = stmt.on_conflict_do_update(
        index_elements=["rollout_id", "grader", "judge_config_id"],
        set_={c: stmt.excluded[c] for c in _UPDATED})
    session.execute(stmt, values)
