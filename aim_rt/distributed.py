"""Sharding a generate run across processes started by torchrun (torch.distributed): no cluster layer of our own.

Whole batches (fixed slices of the plan) are dealt out round-robin; completion is per image file, so a rerun
with any world size resumes exactly where the last one stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable


def _no_barrier() -> None:
    pass


@dataclass
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    barrier: Callable[[], None] = field(default=_no_barrier, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Shard:
    """The shard of this process: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain process is the whole job.

    The gloo process group only synchronises (barriers), so it serves CPU and GPU ranks alike.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Shard(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.barrier)


def fault_point(shard: Shard, batches_done: int) -> None:
    """Fault injection for the resume tests: AIM_RT_KILL_RANK_AFTER="R:N" kills rank R (no clean-up, as a
    crash or an OOM kill would) once it has finished N batches."""
    spec = os.environ.get("AIM_RT_KILL_RANK_AFTER")
    if not spec:
        return
    rank, after = (int(x) for x in spec.split(":"))
    if shard.rank == rank and batches_done >= after:
        os._exit(17)
