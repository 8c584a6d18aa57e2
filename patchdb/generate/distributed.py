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

        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    return replace(options, shard=(index + count * rank, count * world), device=device)


def torchrun_command(gpus: int, argv: list[str]) -> list[str]:
    """The command that reruns this `patchdb generate` under torchrun with one process per GPU
    (argv without --gpus)."""
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
            f"--nproc-per-node={gpus}", "-m", "patchdb", *kept]
