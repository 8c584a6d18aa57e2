"""Judge calls through any OpenAI-compatible chat-completions API, with our own retries.

The openai client runs with max_retries=0: this module retries 429, 5xx, timeouts, dropped
connections and replies cut off before they finished (finish reason not "stop"), with
exponential backoff and jitter, honouring Retry-After. 401/403/402/404 stop the whole run
(FatalJudgeError). The API key is never put into any text this module returns or raises, and
a provider's key is sent only to that provider's own host (patchdb.judge.providers).
"""

import asyncio
import email.utils
import os
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from patchdb import redact
from patchdb.errors import JudgeError
from patchdb.judge.logprobs import (
    LOGPROBS,
    TOP_LOGPROBS,
    balanced_p_yes,
    p_yes_from_top,
    verdict_messages,
)
from patchdb.judge.providers import (
    DEFAULT_URLS,
    KEY_PREFIXES,
    KEY_VARS,
    NAMES,
    OPENAI,
    OPENROUTER,
    key_owner,
    provider_of,
)

NO_KEY = "no-key-needed"
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0
POOL_SIZE = 16  # connections per HTTP client; see ApiJudge.__init__
FATAL_STATUS = {
    401: "the judge API rejected the API key (401 Unauthorized)",
    402: "the judge API account has no credit left (402 Payment Required)",
    403: "the judge API refused access (403 Forbidden)",
    404: "the judge API does not know this model or URL (404 Not Found)",
}


class FatalJudgeError(JudgeError):
    """A judge error that no retry can fix: the run stops at once."""


@dataclass(frozen=True)
class Endpoint:
    """Where judge calls go. The key is left out of repr so it cannot leak into logs."""

    base_url: str
    api_key: str = field(repr=False)


def resolve_endpoint(base_url: str | None, env: Mapping[str, str] | None = None) -> Endpoint:
    """Pick the base URL and key. With no URL: OpenRouter with OPENROUTER_API_KEY, else OpenAI
    with OPENAI_API_KEY. A provider's key goes only to that provider's own https host
    (providers.provider_of); any other URL gets PATCHDB_JUDGE_API_KEY or a placeholder key."""
    env = os.environ if env is None else env
    if not base_url:
        for name in (OPENROUTER, OPENAI):
            if env.get(KEY_VARS[name]):
                return Endpoint(DEFAULT_URLS[name], env[KEY_VARS[name]])
        raise JudgeError(
            "no judge API key: set OPENROUTER_API_KEY or OPENAI_API_KEY, or point --base-url "
            "at a server that needs none (or use --judge-backend hf)"
        )
    url = base_url.rstrip("/")
    provider = provider_of(url)
    key = env.get(KEY_VARS[provider]) if provider is not None else None
    generic = env.get("PATCHDB_JUDGE_API_KEY")
    owner = key_owner(generic)
    if not key and owner is not None and owner != provider:
        # a provider's key put in the variable that goes to any URL (a sweep config's too)
        host = urlsplit(DEFAULT_URLS[owner]).hostname
        raise JudgeError(
            f"PATCHDB_JUDGE_API_KEY holds what looks like an {NAMES[owner]} key "
            f"({KEY_PREFIXES[owner][0]}...), and the judge URL is not {host}: it is not sent "
            f"there. Put that key in {KEY_VARS[owner]}, which goes to {host} only")
    return Endpoint(url, key or generic or NO_KEY)


@dataclass
class Reply:
    """The outcome of one judge call after all its attempts."""

    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost: float | None = None
    latency_s: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)  # failed attempts by cause
    cached: bool = False
    p_yes: float | None = None  # logprobs verdict mode: P(YES) normalised over YES and NO

    def add_usage(self, usage: Any) -> None:
        """Sum usage over attempts: a cut-off reply that is retried was still paid for."""
        if usage is None:
            return
        self.prompt_tokens = (self.prompt_tokens or 0) + (usage.prompt_tokens or 0)
        self.completion_tokens = (self.completion_tokens or 0) + (usage.completion_tokens or 0)
        details = getattr(usage, "completion_tokens_details", None)
        reasoning = getattr(details, "reasoning_tokens", None) if details is not None else None
        if reasoning is not None:
            self.reasoning_tokens = (self.reasoning_tokens or 0) + int(reasoning)
        cost = (getattr(usage, "model_extra", None) or {}).get("cost")
        if isinstance(cost, int | float):
            self.cost = (self.cost or 0.0) + float(cost)


def scrub(text: str, secret: str) -> str:
    """Text that may reach a user or the store, without the key or any other secret in it."""
    return redact.scrub(text, *([secret] if secret != NO_KEY else []))


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a server asked us to wait (Retry-After as seconds or an HTTP date)."""
    if not headers:
        return None
    raw = headers.get("retry-after-ms")
    if raw:
        try:
            return max(0.0, float(raw) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int, base: float, retry_after: float | None) -> float:
    """Exponential backoff with jitter; a server's Retry-After wins when it is given."""
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S)
    return min(MAX_BACKOFF_S, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


class ApiJudge:
    """Sends grader prompts to a chat-completions endpoint, one call per prompt."""

    batch_size = 1

    def __init__(
        self,
        endpoint: Endpoint,
        model: str,
        reasoning: str,
        *,
        timeout_s: float = 120.0,
        max_attempts: int = 3,
        backoff_base_s: float = 1.0,
        concurrency: int = 512,
        verdict: str = "last-word",
    ) -> None:
        import httpx2
        import openai

        self.endpoint = endpoint
        self.provider = provider_of(endpoint.base_url)
        self.model = model
        self.reasoning = reasoning
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.verdict = verdict
        self.succeeded = 0
        self._openai = openai
        # httpx's connection pool does work proportional to its size on every request, so
        # one pool of 512 connections spends more CPU than the calls do. Workers share
        # small pools instead: worker `slot` always uses client slot // POOL_SIZE.
        ssl_context = httpx2.create_ssl_context()
        per_pool = min(POOL_SIZE, concurrency)
        limits = httpx2.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        self.clients = [
            openai.AsyncOpenAI(
                base_url=endpoint.base_url,
                api_key=endpoint.api_key,
                max_retries=0,
                timeout=timeout_s,
                http_client=openai.DefaultAsyncHttpxClient(
                    limits=limits, timeout=timeout_s, verify=ssl_context
                ),
            )
            for _ in range(-(-concurrency // per_pool))
        ]

    def _request_options(self) -> dict[str, Any]:
        if self.provider == OPENAI:
            return {"reasoning_effort": self.reasoning}
        return {"extra_body": {"reasoning": {"effort": self.reasoning}}}

    async def judge(self, prompts: list[str], slot: int = 0) -> list[Reply]:
        """Replies for prompts (one at a time); `slot` is the calling worker's number."""
        client = self.clients[(slot // POOL_SIZE) % len(self.clients)]
        return [await self.call(p, client) for p in prompts]

    async def call(self, prompt: str, client: Any = None) -> Reply:
        """One grader prompt, retried until it gives a finished reply or attempts run out."""
        client = client if client is not None else self.clients[0]
        reply = Reply()
        started = time.monotonic()
        openai = self._openai
        for attempt in range(1, self.max_attempts + 1):
            reply.attempts = attempt
            wait: float | None = None
            try:
                completion = await client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    **self._request_options(),
                )
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in FATAL_STATUS:
                    raise FatalJudgeError(
                        f"{FATAL_STATUS[status]} at {self.endpoint.base_url}; stopped"
                    ) from None
                detail = scrub(str(exc), self.endpoint.api_key)[:300]
                if status != 429 and status < 500 and status != 408:
                    reply.error = f"HTTP {status}: {detail}"  # a bad request: retrying won't help
                    break
                reason = "429" if status == 429 else str(status)
                reply.failures[reason] += 1
                reply.error = f"HTTP {status}: {detail}"
                wait = retry_after_s(exc.response.headers)
            except openai.APITimeoutError:
                reply.failures["timeout"] += 1
                reply.error = "timed out"
            except openai.APIConnectionError as exc:
                cause = exc.__cause__
                text = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
                reply.failures["connection"] += 1
                reply.error = "connection failed: " + scrub(text, self.endpoint.api_key)[:300]
                if self.succeeded == 0 and attempt == self.max_attempts:
                    raise FatalJudgeError(
                        f"cannot reach the judge API at {self.endpoint.base_url} "
                        f"({reply.error})"
                    ) from None
            except (openai.APIError, ValueError, TypeError) as exc:  # not a chat completion
                reply.failures["bad_reply"] += 1
                text = f"{type(exc).__name__}: {exc}"
                reply.error = "bad reply: " + scrub(text, self.endpoint.api_key)[:300]
            else:
                choice = completion.choices[0] if completion.choices else None
                reply.add_usage(completion.usage)
                reply.text = choice.message.content if choice is not None else None
                reply.finish_reason = choice.finish_reason if choice is not None else None
                if reply.finish_reason == "stop":
                    reply.error = None
                    self.succeeded += 1
                    break
                if choice is None:  # e.g. OpenRouter's HTTP 200 carrying an upstream error
                    reply.failures["empty_reply"] += 1
                    reply.error = "reply had no choices"
                else:
                    reply.failures[f"finish_{reply.finish_reason}"] += 1
                    reply.error = f"reply not finished (finish reason {reply.finish_reason!r})"
            if attempt < self.max_attempts:
                await asyncio.sleep(backoff_s(attempt, self.backoff_base_s, wait))
        if self.verdict == LOGPROBS and reply.error is None and reply.text is not None:
            await self.ask_verdict(prompt, reply, client)
        reply.latency_s = time.monotonic() - started
        return reply

    async def ask_verdict(self, prompt: str, reply: Reply, client: Any) -> None:
        """Logprobs mode: one more turn asks for the verdict, once in each order of the two
        words; P(YES) comes from the twenty likeliest first tokens of each (one token, no
        reasoning effort), balanced over the orders. Sets reply.p_yes, or reply.error when
        every attempt of a request failed."""
        answers = []
        for order in (0, 1):
            answer = await self._ask_verdict_once(prompt, reply, client, order)
            if reply.error is not None:
                return
            answers.append(answer)
        reply.p_yes = balanced_p_yes(answers)

    async def _ask_verdict_once(self, prompt: str, reply: Reply, client: Any,
                                order: int) -> float | None:
        openai = self._openai
        for attempt in range(1, self.max_attempts + 1):
            wait: float | None = None
            try:
                completion = await client.chat.completions.create(
                    model=self.model, messages=verdict_messages(prompt, reply.text or "", order),
                    max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS,
                )
            except openai.APIStatusError as exc:
                if exc.status_code in FATAL_STATUS:
                    raise FatalJudgeError(
                        f"{FATAL_STATUS[exc.status_code]} at {self.endpoint.base_url}; stopped"
                    ) from None
                reply.failures[f"verdict_{exc.status_code}"] += 1
                reply.error = "verdict request failed: HTTP " + scrub(
                    f"{exc.status_code}: {exc}", self.endpoint.api_key)[:300]
                wait = retry_after_s(exc.response.headers)
            except (openai.APIError, ValueError, TypeError) as exc:
                reply.failures["verdict_failed"] += 1
                reply.error = "verdict request failed: " + scrub(
                    f"{type(exc).__name__}: {exc}", self.endpoint.api_key)[:300]
            else:
                reply.add_usage(completion.usage)
                reply.error = None
                return p_yes_from_top(self._top_tokens(completion))
            if attempt < self.max_attempts:
                await asyncio.sleep(backoff_s(attempt, self.backoff_base_s, wait))
        return None

    def _top_tokens(self, completion: Any) -> list[tuple[str, float]]:
        """(token, logprob) of the reply's first token and its top alternatives."""
        choice = completion.choices[0] if completion.choices else None
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if not content:
            raise FatalJudgeError(
                f"the judge API at {self.endpoint.base_url} returned no logprobs; "
                "--verdict logprobs needs a server that does (vLLM, llama.cpp server), "
                "or use --verdict last-word")
        first = content[0]
        pairs = [(t.token, t.logprob) for t in (first.top_logprobs or [])]
        return [*pairs, (first.token, first.logprob)]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
