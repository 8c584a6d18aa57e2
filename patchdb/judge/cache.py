"""`judge --cache`: replies kept in table judge_cache, keyed by a hash of the request.

Two requests are identical when backend, model, reasoning effort, rendered prompt and verdict
mode match; the base URL is left out on purpose, so a proxy and the provider share one cache.
"""

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from patchdb.judge.client import Reply
from patchdb.store.models import JudgeCacheEntry


def request_hash(backend: str, model: str, reasoning: str, prompt: str,
                 verdict: str = "last-word") -> str:
    """The cache key. The last-word mode keeps the key it had before verdict modes existed."""
    parts = [backend, model, reasoning, prompt] + ([] if verdict == "last-word" else [verdict])
    key = json.dumps(parts, ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def reply_json(reply: Reply) -> str:
    """What the cache keeps of a finished reply (the text and what it cost when it was made)."""
    return json.dumps(
        {
            "text": reply.text,
            "finish_reason": reply.finish_reason,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "reasoning_tokens": reply.reasoning_tokens,
            "p_yes": reply.p_yes,
        }
    )


def cached_reply(data: str) -> Reply:
    """A cache hit as a Reply: no attempts made, nothing paid."""
    raw: dict[str, Any] = json.loads(data)
    return Reply(
        text=raw.get("text"),
        finish_reason=raw.get("finish_reason"),
        attempts=0,
        prompt_tokens=raw.get("prompt_tokens"),
        completion_tokens=raw.get("completion_tokens"),
        reasoning_tokens=raw.get("reasoning_tokens"),
        p_yes=raw.get("p_yes"),
        cost=0.0,
        cached=True,
    )


def lookup(session: Session, hashes: Iterable[str]) -> dict[str, str]:
    """reply_json by request hash for the hashes that are cached."""
    wanted = list(set(hashes))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        rows = session.execute(
            select(JudgeCacheEntry.request_hash, JudgeCacheEntry.reply_json).where(
                JudgeCacheEntry.request_hash.in_(chunk)
            )
        )
        found.update({h: r for h, r in rows})
    return found
