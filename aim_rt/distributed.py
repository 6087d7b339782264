"""Sharding a generate run across processes started by torchrun (torch.distributed): no cluster layer of our own.

Whole batches (fixed slices of the plan) are dealt out round-robin; completion is per image file, so a rerun
with any world size resumes exactly where the last one stopped.

Start-up is bounded: every rank announces itself in the rendezvous store, and a rank that is not there within
AIM_RT_DIST_TIMEOUT seconds (default 60) is named in the error instead of the job waiting forever.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

from .errors import AiMError

DEFAULT_TIMEOUT_S = 60.0


def _no_barrier() -> None:
    pass


def _same(obj: Any) -> Any:
    return obj


@dataclass
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    barrier: Callable[[], None] = field(default=_no_barrier, repr=False)
    # rank 0's value, on every rank (a broadcast); the identity for a single process
    share: Callable[[Any], Any] = field(default=_same, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DistributedError(AiMError):
    """torchrun start-up that cannot complete: a rank missing, a bad environment."""


def _env_int(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def startup_timeout() -> float:
    value = os.environ.get("AIM_RT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise DistributedError(f"AIM_RT_DIST_TIMEOUT={value!r} must be a number of seconds > 0")
    return seconds


@contextmanager
def _c_stderr_silenced():
    """c10d logs each failed connection attempt (with a C++ stack) straight to fd 2; our one-line error says it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _store(rank: int, world: int, timeout: float):
    """The rendezvous TCPStore (torchrun's agent hosts it when TORCHELASTIC_USE_AGENT_STORE is set)."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise DistributedError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set; start ranks with torchrun")
    is_master = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        with _c_stderr_silenced():
            return dist.TCPStore(host, int(port), world, is_master, timedelta(seconds=timeout),
                                 wait_for_workers=False)
    except Exception as e:  # DistNetworkError, RuntimeError: all mean the same to the user
        who = "could not listen" if is_master else "could not reach rank 0's store"
        raise DistributedError(f"rank {rank} {who} at {host}:{port} within {timeout:g} s ({type(e).__name__}); "
                               "is rank 0 running? (AIM_RT_DIST_TIMEOUT sets the wait)") from None


def _wait_for_ranks(store, rank: int, world: int, timeout: float) -> None:
    """Each rank checks in; all wait until every rank has, or name the missing ones."""
    tag = f"aim_rt/up/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.set(f"{tag}/{rank}", "1")
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(world) if not store.check([f"{tag}/{r}"])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise DistributedError(f"rank(s) {', '.join(map(str, missing))} of {world} did not start within "
                                   f"{timeout:g} s (AIM_RT_DIST_TIMEOUT); start every rank with torchrun, or unset "
                                   "WORLD_SIZE for a single process")
        time.sleep(0.05)


def from_environment() -> Shard:
    """The shard of this process: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain process is the whole job.

    The gloo process group only synchronises (barriers, rank 0's verdicts), so it serves CPU and GPU ranks alike.
    """
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return Shard()
    import torch.distributed as dist

    rank = _env_int("RANK", "0")
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if not dist.is_initialized():
        timeout = startup_timeout()
        store = _store(rank, world, timeout)
        _wait_for_ranks(store, rank, world, timeout)
        dist.init_process_group("gloo", store=dist.PrefixStore("aim_rt/pg", store), rank=rank, world_size=world)

    def share(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return Shard(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", "0"), dist.barrier, share)


def fault_point(shard: Shard, batches_done: int) -> None:
    """Fault injection for the resume tests: AIM_RT_KILL_RANK_AFTER="R:N" kills rank R (no clean-up, as a
    crash or an OOM kill would) once it has finished N batches."""
    spec = os.environ.get("AIM_RT_KILL_RANK_AFTER")
    if not spec:
        return
    rank, after = (int(x) for x in spec.split(":"))
    if shard.rank == rank and batches_done >= after:
        os._exit(17)
