"""Judge options: what the user asked for, merged over the sweep config's [judge] table."""

from dataclasses import asdict, dataclass
from typing import Any

from patchdb.config import REASONING_EFFORTS, VERDICT_MODES, JudgeSettings
from patchdb.errors import JudgeError
from patchdb.judge.plan import MODES, check_graders
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
    backend = options.backend or defaults.backend
    if backend not in BACKENDS:
        raise JudgeError(f"unknown judge backend {backend!r} (known: {', '.join(BACKENDS)})")
    model = options.model
    if model is None:
        if backend == "hf" and defaults.backend != "hf":
            raise JudgeError("--judge-backend hf needs --judge-model (a path, hub id or alias)")
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
