"""Judge options: what the user asked for, merged over the sweep config's [judge] table."""

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from patchdb.config import REASONING_EFFORTS, VERDICT_MODES, JudgeSettings
from patchdb.errors import JudgeError
from patchdb.judge.plan import MODES, check_graders
from patchdb.judge.providers import DEFAULT_URLS, KEY_VARS, OPENAI, OPENROUTER, provider_of
from patchdb.redact import redact_arguments

BACKENDS = ("openai", "hf")


@dataclass
class JudgeOptions:
    """Everything `patchdb judge` can be told. None means "the sweep config's value"."""

    mode: str = "only_missing"
    experiments: list[str] | None = None
    layers: list[int] | None = None
    graders: list[str] | None = None
    model: str | None = None
    reasoning: str | None = None
    base_url: str | None = None
    backend: str | None = None
    concurrency: int | None = None
    max_attempts: int | None = None
    timeout_s: float = 120.0
    limit: int | None = None
    max_cost: float | None = None
    cache: bool = False
    follow: bool = False
    follow_wait_s: float = 600.0  # --follow: how long to wait for a generate run to start
    prompts: str | None = None
    backoff_base_s: float = 1.0
    poll_s: float = 2.0
    grace_s: float = 10.0
    write_batch: int = 200  # at most this many results per store transaction
    lease_s: float = 60.0  # how long a claimed key stays this run's without a renewal
    hf_batch_size: int | None = None  # None: the sweep's [judge] batch_size
    hf_max_new_tokens: int | None = None  # None: the sweep's [judge] max_new_tokens
    hf_dtype: str = "float32"
    hf_device: str | None = None  # None: CUDA when present, else CPU
    verdict: str | None = None  # None: the sweep's [judge] verdict ("last-word")
    progress: bool = True

    def arguments(self) -> dict[str, Any]:
        """What stage_runs records: every option, with any password in --base-url hidden."""
        return redact_arguments({k: v for k, v in asdict(self).items() if k != "progress"})


@dataclass(frozen=True)
class Resolved:
    """The settings a run actually uses."""

    model: str
    reasoning: str
    base_url: str | None
    backend: str
    concurrency: int
    max_attempts: int
    verdict: str = "last-word"  # how a verdict is read: part of the judge config's identity


def resolve(options: JudgeOptions, defaults: JudgeSettings) -> Resolved:
    """Options win over the sweep config's [judge] table; check the values."""
    if options.mode not in MODES:
        raise JudgeError(f"unknown mode {options.mode!r} (known: {', '.join(MODES)})")
    check_graders(options.graders)
    # --base-url names an API server, so it picks the API judge over a config's hf judge
    backend = options.backend or ("openai" if options.base_url else defaults.backend)
    if backend not in BACKENDS:
        raise JudgeError(f"unknown judge backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "hf" and options.base_url:
        raise JudgeError("--base-url is for the API judge; --judge-backend hf runs the judge "
                         "in this process: give one of them")
    model = options.model
    if model is None:
        if backend == "hf" and defaults.backend != "hf":
            raise JudgeError("--judge-backend hf needs --judge-model (a path, hub id or alias)")
        if backend != "hf" and defaults.backend == "hf":
            raise JudgeError(f"the API judge (--base-url or --judge-backend openai) needs "
                             f"--judge-model: the sweep's judge model {defaults.model!r} is "
                             "for the in-process judge")
        model = defaults.model
    reasoning = options.reasoning or defaults.reasoning
    if reasoning not in REASONING_EFFORTS:
        raise JudgeError(
            f"unknown reasoning effort {reasoning!r} (known: {', '.join(REASONING_EFFORTS)})"
        )
    if backend == "hf":
        reasoning = "none"
    concurrency = options.concurrency or defaults.concurrency
    max_attempts = options.max_attempts or defaults.max_attempts
    if concurrency < 1 or max_attempts < 1:
        raise JudgeError("concurrency and max attempts must be at least 1")
    verdict = options.verdict or defaults.verdict
    if verdict not in VERDICT_MODES:
        raise JudgeError(f"unknown verdict mode {verdict!r} (known: {', '.join(VERDICT_MODES)})")
    return Resolved(model, reasoning, options.base_url or defaults.base_url, backend,
                    concurrency, max_attempts, verdict)


def describe_judge(resolved: Resolved, env: Mapping[str, str] | None = None) -> str:
    """One line saying which judge a run uses: the backend, where it is and the model. It
    names the key's variable, never the key, and shows a URL's host, never its password."""
    if resolved.backend == "hf":
        return (f"Judge: in-process (--judge-backend hf), model {resolved.model}, verdict "
                f"{resolved.verdict}.")
    env = os.environ if env is None else env
    url = resolved.base_url
    if not url:
        name = next((n for n in (OPENROUTER, OPENAI) if env.get(KEY_VARS[n])), None)
        if name is None:
            return (f"Judge: API, model {resolved.model}, but none to call: set "
                    "OPENROUTER_API_KEY or OPENAI_API_KEY, or give --base-url.")
        where = f"{_host(DEFAULT_URLS[name])} with {KEY_VARS[name]}"
    else:
        provider = provider_of(url.rstrip("/"))
        key = KEY_VARS[provider] if provider is not None else "PATCHDB_JUDGE_API_KEY"
        where = f"{_host(url)} {f'with {key}' if env.get(key) else 'with no key'}"
    return (f"Judge: API at {where}, model {resolved.model}, reasoning {resolved.reasoning}, "
            f"verdict {resolved.verdict}.")


def _host(url: str) -> str:
    """scheme://host[:port] of a URL, without user or password."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "an unreadable URL"
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}"
