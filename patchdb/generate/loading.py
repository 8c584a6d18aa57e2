"""Loading a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

patchdb never downloads: a hub id must already sit in the local Hugging Face cache. A GGUF file
is dequantised once and cached as safetensors under `$PATCHDB_CACHE_DIR/models/<hash>`, so the
second load reads plain weights instead of dequantising again.
"""

import hashlib
import inspect
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from patchdb.errors import ModelError
from patchdb.generate.model_spec import (  # noqa: F401  (re-exported: the spec's old home)
    ALIASES,
    ModelSource,
    alias_gguf,
    cache_root,
    model_id_for,
    resolve_model,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_FORMAT = "1"  # bump when the layout of a cached GGUF changes


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    device: torch.device
    dtype: torch.dtype


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})") from None


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def forward_arguments(model: Any) -> tuple[str, str | None]:
    """The names the model's forward takes for a cache (transformers renamed past_key_values
    to cache) and for computing only the last positions' logits (None where it has none)."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values",
            "logits_to_keep" if "logits_to_keep" in params else None)


def _spread_memory(spread: list[int]) -> dict[int, int]:
    """max_memory for device_map="auto" over these CUDA devices (bytes each), or ModelError."""
    if not torch.cuda.is_available():
        raise ModelError(f"spreading a model over {len(spread)} GPUs needs CUDA, which is not "
                         "available here")
    count = torch.cuda.device_count()
    if max(spread) >= count:
        raise ModelError(f"spreading a model over GPUs {spread} needs {max(spread) + 1} GPUs; "
                         f"this machine has {count}")
    return {i: int(torch.cuda.mem_get_info(i)[0] * SPREAD_WEIGHT_FRACTION) for i in spread}


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {name} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(
                f"device {name} does not exist (this machine has "
                f"{torch.cuda.device_count()} CUDA devices)"
            )
    return device


def gguf_cache_dir(gguf: Path) -> Path:
    """The cache folder of one GGUF file, keyed by its path, size and modification time."""
    st = gguf.stat()
    key = f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{CACHE_FORMAT}"
    return cache_root() / "models" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _write_gguf_cache(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once and save it as safetensors + config + tokenizer, atomically."""
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild it from config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "patchdb-source.txt").write_text(f"{gguf.resolve()}\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _say(message: str) -> None:
    """One status line on stderr, so a user knows what a silent wait is spent on."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def cached_gguf(gguf: Path, announce: bool = False) -> Path:
    """The safetensors folder of a GGUF file, writing it on first use."""
    target = gguf_cache_dir(gguf)
    if not (target / "config.json").exists():
        if announce:
            _say(f"Dequantising {gguf.name} once into {target} (the slow part of a first load; "
                 "later loads read this cache)...")
        try:
            _write_gguf_cache(gguf, target)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot convert GGUF file {gguf}: {exc}") from None
    return target


def _from_pretrained(location: str, options: dict[str, Any]) -> PreTrainedModel:
    """AutoModelForCausalLM, or the image-text-to-text class for multimodal wrappers."""
    try:
        return AutoModelForCausalLM.from_pretrained(location, **options)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(location, **options)


# Of each card's free memory, the share the weights of a model spread over cards may take (the
# rest holds the KV cache); accelerate balances the layers across the cards below this cap.
SPREAD_WEIGHT_FRACTION = 0.9


def load_model(
    spec: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
    spread: list[int] | None = None, announce: bool = True,
) -> LoadedModel:
    """Load a model in eval mode on `device` in `dtype`, with its tokenizer (pad = eos if unset).

    `spread`: CUDA device indexes to spread one copy of the model over with device_map="auto"
    (for a model too large for one card); `device` is then the first of them. `announce`: say
    on stderr what is being loaded and how long it took."""
    source = resolve_model(spec)
    started = time.monotonic()
    torch_type = torch_dtype(dtype)
    target = _device(device)
    max_memory = _spread_memory(spread) if spread and len(spread) > 1 else None
    if max_memory is not None:
        target = torch.device("cuda", min(max_memory))
    location = source.location
    if source.kind == "dir" and not (Path(location) / "config.json").is_file():
        raise ModelError(f"{spec} is not a model directory (it has no config.json)")
    if announce:
        _say(f"Loading model {spec} ({source.kind}) on {target} in {dtype}...")
    if source.kind == "gguf":
        location = str(cached_gguf(Path(source.location), announce))
    options: dict[str, Any] = {"local_files_only": True}
    if source.kind == "hub" and revision:
        options["revision"] = revision
    with _quiet_loading():
        tokenizer, model = _load(spec, source, location, options, torch_type, target, max_memory)
    if target.type == "cpu":
        torch.nn.Module.to(model, target)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(f"model {spec!r} has no chat template; patchdb needs a chat model")
    if announce:
        _say(f"Loaded {source.model_id} in {time.monotonic() - started:.1f} s.")
    return LoadedModel(model, tokenizer, source.model_id, target, torch_type)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" bars from transformers: a load from disk takes seconds."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load(
    spec: str,
    source: ModelSource,
    location: str,
    options: dict[str, Any],
    torch_type: torch.dtype,
    target: torch.device,
    max_memory: dict[int, int] | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **options)
        config = AutoConfig.from_pretrained(location, **options)
        model_options = dict(options, dtype=torch_type)
        if max_memory is not None:
            model_options.update(device_map="auto", max_memory=max_memory)
        elif target.type != "cpu":
            model_options["device_map"] = str(target)
        model = _from_pretrained(location, dict(model_options, config=config))
    except OSError as exc:
        if source.kind == "hub":
            raise ModelError(
                f"model {spec!r} is not in the local Hugging Face cache and patchdb does not "
                f"download; fetch it first with `hf download {spec}`"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model from {location}: {first}") from None
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"cannot load model {spec!r}: {first}") from None
    return tokenizer, model
