"""The OpenAI-compatible files and batches endpoints, through the openai package's client.

Upload an input file (purpose "batch"), create a batch on it, look it up, cancel it, download
its output and error files. Reads (retrieve, list, download) are retried by the client; create
is sent once, since a create whose reply was lost may still have started a batch: the caller
looks for it by its input file before creating another. The key comes from the environment
(client.resolve_endpoint) and never appears in anything this module returns or raises.
"""

from dataclasses import dataclass
from typing import Any

from patchdb.errors import JudgeError
from patchdb.judge.batch_plan import COMPLETION_WINDOW, ENDPOINT
from patchdb.judge.client import FATAL_STATUS, Endpoint, FatalJudgeError, scrub

ENDED = ("completed", "failed", "expired", "cancelled")


@dataclass
class BatchInfo:
    """What the provider says about one batch."""

    id: str
    status: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    total: int | None
    completed: int | None
    failed: int | None
    first_error: str | None  # a failed validation: the first bad line and why

    @property
    def ended(self) -> bool:
        return self.status in ENDED


def _info(batch: Any) -> BatchInfo:
    counts = batch.request_counts
    first = None
    errors = getattr(getattr(batch, "errors", None), "data", None) or []
    if errors:
        err = errors[0]
        where = f"line {err.line}" if getattr(err, "line", None) is not None else "input file"
        first = f"{where}: {err.message or err.code}"
    return BatchInfo(batch.id, batch.status, batch.input_file_id, batch.output_file_id,
                     batch.error_file_id, counts.total if counts else None,
                     counts.completed if counts else None, counts.failed if counts else None,
                     first)


class BatchApi:
    """Files and batches calls against one endpoint."""

    def __init__(self, endpoint: Endpoint, timeout_s: float = 120.0) -> None:
        import openai

        self.endpoint = endpoint
        self._openai = openai
        self.client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key,
                                    max_retries=3, timeout=timeout_s)
        self.once = self.client.with_options(max_retries=0)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One API call; errors become one JudgeError line without the key."""
        openai = self._openai
        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as exc:
            if exc.status_code in FATAL_STATUS:
                raise FatalJudgeError(f"{FATAL_STATUS[exc.status_code]} at "
                                      f"{self.endpoint.base_url}; stopped") from None
            detail = scrub(str(exc), self.endpoint.api_key)[:300]
            raise JudgeError(f"{what} failed: HTTP {exc.status_code}: {detail}") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            text = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            raise JudgeError(f"{what} failed: cannot reach the judge API at "
                             f"{self.endpoint.base_url} "
                             f"({scrub(text, self.endpoint.api_key)[:300]})") from None
        except (openai.APIError, ValueError, TypeError) as exc:
            text = scrub(f"{type(exc).__name__}: {exc}", self.endpoint.api_key)[:300]
            raise JudgeError(f"{what} failed: bad reply ({text})") from None

    def upload(self, data: bytes, filename: str) -> str:
        """Upload a JSONL input file; its file id."""
        result = self._call("uploading the batch input file", self.client.files.create,
                            file=(filename, data, "application/jsonl"), purpose="batch")
        return str(result.id)

    def create(self, input_file_id: str, metadata: dict[str, str]) -> BatchInfo:
        """Start a batch on an uploaded file (sent once, never retried here)."""
        return _info(self._call("creating the batch", self.once.batches.create,
                                input_file_id=input_file_id, endpoint=ENDPOINT,
                                completion_window=COMPLETION_WINDOW, metadata=metadata))

    def find(self, input_file_id: str) -> BatchInfo | None:
        """A batch already created on this input file, if any (newest first)."""
        def scan() -> BatchInfo | None:
            for batch in self.client.batches.list(limit=100):
                if batch.input_file_id == input_file_id:
                    return _info(batch)
            return None

        result: BatchInfo | None = self._call("listing batches", scan)
        return result

    def retrieve(self, batch_id: str) -> BatchInfo:
        return _info(self._call(f"looking up batch {batch_id}", self.client.batches.retrieve,
                                batch_id))

    def cancel(self, batch_id: str) -> BatchInfo:
        return _info(self._call(f"cancelling batch {batch_id}", self.client.batches.cancel,
                                batch_id))

    def content(self, file_id: str) -> bytes:
        """The bytes of an output or error file."""
        result = self._call(f"downloading file {file_id}", self.client.files.content, file_id)
        return bytes(result.content)

    def close(self) -> None:
        self.client.close()
