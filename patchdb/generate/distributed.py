"""Several GPUs: under torchrun each rank takes a disjoint share of the missing units.

No collective communication is needed: ranks split the work by the same stable hash that
`--shard` uses, write to the store independently, and a rank that dies leaves its units missing
for a rerun. `patchdb generate --gpus N` starts torchrun itself.
"""

import os
import sys
from dataclasses import replace

from patchdb.errors import ConfigError
from patchdb.generate.stage import GenerateOptions


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world, local


def check_gpus(gpus: int, device: str | None) -> None:
    """Refuse --gpus N where this machine has fewer than N CUDA GPUs, rather than quietly
    starting N processes on the CPU (`--device cpu` asks for CPU processes on purpose)."""
    import torch

    if device is not None and device.startswith("cpu"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"--gpus {gpus} needs CUDA GPUs, but CUDA is not available here; "
                          "run without --gpus to generate on the CPU")
    found = torch.cuda.device_count()
    if gpus > found:
        raise ConfigError(f"--gpus {gpus} asks for more GPUs than the {found} visible here")


def rank_options(options: GenerateOptions) -> GenerateOptions:
    """Give this rank its share: shard i/N (or the whole sweep) is split W ways as shard
    i + N*rank of N*W, which holds exactly the units of i/N across all ranks; and, unless a
    device was named, the rank's own GPU."""
    found = torchrun_rank()
    if found is None or found[1] == 1:
        return options
    rank, world, local = found
    index, count = options.shard if options.shard is not None else (0, 1)
    device = options.device
    if device is None:
        import torch

        device = rank_device(local, options.gpus_per_model, torch.cuda.is_available())
    return replace(options, shard=(index + count * rank, count * world), device=device)


def rank_device(local_rank: int, gpus_per_model: int, cuda: bool) -> str:
    """A rank's first card: ranks on one host take consecutive groups of gpus_per_model cards
    (rank 1 of 2-card copies starts at cuda:2)."""
    return f"cuda:{local_rank * gpus_per_model}" if cuda else "cpu"


def torchrun_command(gpus: int, argv: list[str], gpus_per_model: int = 1) -> list[str]:
    """The command that reruns this `patchdb generate` under torchrun with one process per model
    copy, gpus // gpus_per_model of them (argv without --gpus; the CLI has checked that
    gpus is a multiple of gpus_per_model)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        if arg.startswith("--gpus="):
            continue
        kept.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={gpus // gpus_per_model}", "-m", "patchdb", *kept]
