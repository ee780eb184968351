"""torchrun support: ranks take every ``world``-th work item, rank 0 gathers and writes the report.

``torchrun --nproc_per_node N -m tokenzip bench ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; we then open a
process group (gloo on CPU, NCCL on GPU). Without those variables everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    initialized_here: bool = False


def setup(device: str = "cpu") -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        here = True
    return Context(rank, world, local_rank, local_world, here)


def default_threads(ctx: Context) -> int:
    """Share the cores between the processes of one machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, ctx.local_world))


def gather(ctx: Context, obj: Any) -> list[Any]:
    """Every rank's object, on rank 0 (``[obj]`` without torchrun; other ranks get ``[]``)."""
    if ctx.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world if ctx.rank == 0 else None  # type: ignore[assignment]
    dist.gather_object(obj, out, dst=0)
    return out if ctx.rank == 0 else []


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def teardown(ctx: Context) -> None:
    if ctx.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()
