"""Multi-process training with :mod:`torch.distributed`: ``torchrun --nproc_per_node=N -m racnn train ...``
(multi-node through torchrun's rendezvous). Without ``WORLD_SIZE > 1`` in the environment every helper here is
a no-op and training runs exactly as a single process. This module holds the process group and the
collectives; the DDP wrapper and synchronised BatchNorm are in :mod:`racnn.training.ddp`.

What a run with N processes does (see :class:`racnn.training.trainer.Trainer`):

- **process group** from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``):
  NCCL on CUDA (rank r on ``cuda:LOCAL_RANK``), gloo on CPU; joined when ``fit`` starts.
- **global batch**: ``train.batch_size`` is the batch of one step, all processes together; each takes
  ``batch_size / N`` images of a ``DistributedSampler`` shard (it must divide).
- **DDP per phase** and **synchronised BatchNorm**: :mod:`racnn.training.ddp`.
- **metrics**: loss sums are all-reduced; accuracy and box accumulators are gathered; validation and test are
  sharded (rank r takes images r, r+N, ...: no padding, no duplicates) and gathered, so the counts are those
  of one process; the record that steers the schedule is broadcast from rank 0, so every rank decides alike.
- **files**: only rank 0 writes; the other ranks meet it at barriers where they read what it wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..evaluation import Accumulator


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run (``world_size`` 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_from_os() -> DistEnv:
    """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (absent: a single process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise RuntimeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None
    return DistEnv(rank, world, local) if world > 1 else DistEnv()


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (NCCL for CUDA devices, gloo otherwise); nothing for a single process."""
    if not env.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # evaluation is sharded, so no rank waits long for another; the default 30 min stays the bound
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))


def close(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device, env: DistEnv) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA runs; CPU stays CPU; MPS cannot run DDP."""
    if not env.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise RuntimeError(
            f"runtime.device={device}: multi-process training runs on CUDA (NCCL) or CPU (gloo)"
        )
    return device


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    nccl = dist.get_backend() == "nccl"
    t = t.to(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"), copy=True)
    dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks: a new tensor on the backend's device (``t`` itself for a single process)."""
    return _reduce(t, dist.ReduceOp.SUM) if env.active else t


def all_reduce_min(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Minimum over ranks: a new tensor on the backend's device (``t`` itself for a single process)."""
    return _reduce(t, dist.ReduceOp.MIN) if env.active else t


def gather_accumulator(acc: Accumulator, env: DistEnv) -> Accumulator:
    """Every rank's :class:`Accumulator` merged in rank order (the same on every rank)."""
    if not env.active:
        return acc
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, acc)
    return Accumulator.merged(parts)
