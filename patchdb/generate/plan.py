"""What `patchdb generate` is asked to do and what is missing: the options, the plan of pending
units (expected units minus rollouts present, in this shard) and the run's result."""


import hashlib
from dataclasses import dataclass, field

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from patchdb.config import DTYPES, SweepConfig
from patchdb.controls import RANDOM_VECTOR_LAYER
from patchdb.errors import ConfigError
from patchdb.experiments import BASELINE_LAYER
from patchdb.generate.loading import default_device
from patchdb.store import Rollout, Store
from patchdb.store.baselines import baseline_units
from patchdb.store.readouts import (
    ReadoutUnit,
    expected_readouts,
    present_readouts,
    random_vector_units,
)
from patchdb.store.sweeps import (
    ExpectedUnit,
    expected_units,
    get_experiments,
    get_sweep,
    sweep_config,
)


@dataclass
class GenerateOptions:
    """What `patchdb generate` was asked to do; None means "the sweep's own value"."""

    sweep: str | None = None
    experiments: list[str] | None = None
    layers: list[int] | None = None
    words: list[str] | None = None
    samples: int | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None  # None: pick from free device memory
    device: str | None = None  # None: cuda:0 when available, else cpu
    dtype: str | None = None
    shard: tuple[int, int] | None = None  # (index, count), index in 0..count-1
    model: str | None = None
    compile: bool | None = None  # torch.compile the graphed decode step; None: auto_compile()
    share_prefix: bool = True  # keep the prompt's KV before the injection start once (GPU)
    gpus_per_model: int = 1  # >1: one model copy spread over this many cards (device_map="auto")
    baselines: bool = True  # also every target condition with no patch (patch_layer -1)
    readout_only: bool = False  # prefill every unit for its first-token readout; no rollouts
    refill: bool = True  # static decoder (GPU): finished rows take the next sample (refill.py)
    # with refill: KV by need, sized from the answers already stored; None: where the batch
    # a full cache a row allows is small (stage.PAGED_BELOW_ROWS)
    kv_pages: bool | None = None


# Compiling the decode step compiles one program per kind of decoder layer (GraphedDecoder's
# update_in_attention), not one per layer as it did (40-60 s for a 27B model). On an H200 with
# a Gemma-3-27B shape it cost 6.6 s more set-up and saved 2.6 s per 1,024-row batch of 100
# tokens (12.6 -> 10.0 s): it pays from about 260,000 decode tokens on.
AUTO_COMPILE_TOKENS = 300_000
UNPATCHED = {BASELINE_LAYER, RANDOM_VECTOR_LAYER}  # units whose target run has no patch


def auto_compile(device: str, pending_tokens: int) -> bool:
    """Compile by default on GPUs when the pending work is long enough to repay it."""
    return device.startswith("cuda") and pending_tokens >= AUTO_COMPILE_TOKENS


@dataclass
class PendingUnit:
    """A unit with the sample indexes it still lacks."""

    unit: ExpectedUnit
    samples: list[int]


@dataclass
class GeneratePlan:
    sweep_id: int
    sweep_name: str
    config: SweepConfig
    samples: int
    max_new_tokens: int
    expected: int  # units in scope (after narrowing and sharding)
    pending: list[PendingUnit]
    readouts_expected: int = 0
    readouts: list[ReadoutUnit] = field(default_factory=list)  # readouts missing
    # tokens drawn (EOS included) -> answers, over the stored rollouts of these experiments
    answer_lengths: dict[int, int] = field(default_factory=dict)


@dataclass
class GenerateResult:
    plan: GeneratePlan
    units_written: int = 0
    units_skipped: int = 0  # written by another process while this one ran
    rollouts_written: int = 0
    readouts_written: int = 0
    tokens: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    kv_pages: int = 0  # KV pages of the paged decoder (0: a full answer's cache a row)
    interrupted: bool = False
    stage_run_id: int | None = None
    model_id: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"invalid shard {text!r}: expected i/N, e.g. 0/4")
    index, count = int(parts[0]), int(parts[1])
    if count < 1 or index >= count:
        raise ConfigError(f"invalid shard {text!r}: need N >= 1 and 0 <= i < N (i counts from 0)")
    return index, count


def in_shard(unit: ExpectedUnit, shard: tuple[int, int] | None) -> bool:
    """A stable hash of the unit's key decides its shard, the same on every machine."""
    if shard is None:
        return True
    text = "\x1f".join(
        [unit.experiment, str(unit.patch_layer), unit.source_word, unit.target_word]
    )
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return value % shard[1] == shard[0]


def _check_options(options: GenerateOptions, config: SweepConfig) -> None:
    if options.samples is not None and not 1 <= options.samples <= config.samples:
        raise ConfigError(
            f"--samples must be between 1 and the sweep's {config.samples}, got {options.samples}"
        )
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {options.max_new_tokens}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {options.batch_size}")
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.device is not None:
        try:
            device = torch.device(options.device)
        except RuntimeError:
            raise ConfigError(f"invalid device {options.device!r} (e.g. cpu, cuda:0)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {options.device!r} asked for, but CUDA is not available")
    if options.gpus_per_model > 1 and not (options.device or default_device()).startswith("cuda"):
        raise ConfigError(f"--gpus-per-model {options.gpus_per_model} needs CUDA GPUs; "
                          f"device is {options.device or default_device()}")


def missing_samples(session: Session, unit: ExpectedUnit, samples: int) -> list[int]:
    """Sample indexes below `samples` that the unit has no rollout for."""
    present = set(
        session.scalars(
            select(Rollout.sample_index).where(
                Rollout.experiment_id == unit.experiment_id,
                Rollout.patch_layer == unit.patch_layer,
                Rollout.source_word == unit.source_word,
                Rollout.target_word == unit.target_word,
            )
        )
    )
    return [i for i in range(samples) if i not in present]


def plan_generate(store: Store, options: GenerateOptions) -> GeneratePlan:
    """Validate the options and find the missing units; reads only."""
    with store.read() as session:
        sweep = get_sweep(session, options.sweep)
        config = sweep_config(sweep)
        _check_options(options, config)
        experiments = get_experiments(session, sweep, options.experiments)
        baselines = (baseline_units(config, experiments, options.words)
                     + random_vector_units(config, experiments, options.words)
                     if options.baselines else [])
        units = [
            u
            for u in baselines + expected_units(config, experiments, options.layers, options.words)
            if in_shard(u, options.shard)
        ]
        readouts = [r for r in expected_readouts(config, experiments, units)
                    if in_shard(r.unit, options.shard)]
        have_readouts = present_readouts(session, [e.id for e in experiments])
        samples = options.samples or config.samples
        present: dict[tuple[int, int, str, str], set[int]] = {}
        rows = session.execute(
            select(
                Rollout.experiment_id,
                Rollout.patch_layer,
                Rollout.source_word,
                Rollout.target_word,
                Rollout.sample_index,
            ).where(Rollout.experiment_id.in_([e.id for e in experiments]))
        )
        for exp_id, layer, source, target, index in rows:
            present.setdefault((exp_id, layer, source, target), set()).add(index)
        lengths: dict[int, int] = {}
        for n_tokens, reason, count in session.execute(
            select(Rollout.n_tokens, Rollout.finish_reason, func.count())
            .where(Rollout.experiment_id.in_([e.id for e in experiments]),
                   Rollout.n_tokens.is_not(None))
            .group_by(Rollout.n_tokens, Rollout.finish_reason)
        ):
            drawn = int(n_tokens or 0) + (reason == "stop")  # the EOS was drawn too
            lengths[drawn] = lengths.get(drawn, 0) + int(count)
        pending = []
        for u in units:
            have = present.get((u.experiment_id, u.patch_layer, u.source_word, u.target_word), set())
            lacking = [i for i in range(samples) if i not in have]
            if lacking and not options.readout_only:
                pending.append(PendingUnit(u, lacking))
        return GeneratePlan(
            sweep_id=sweep.id,
            sweep_name=sweep.name,
            config=config,
            samples=samples,
            max_new_tokens=options.max_new_tokens or config.max_new_tokens,
            expected=len(units),
            pending=pending,
            readouts_expected=len(readouts),
            readouts=[r for r in readouts if r.key not in have_readouts],
            answer_lengths=lengths,
        )
