"""Multi-process training with :mod:`torch.distributed`: ``torchrun --nproc_per_node=N -m racnn train ...``
(multi-node through torchrun's rendezvous). Without ``WORLD_SIZE > 1`` in the environment every helper here is
a no-op and training runs exactly as a single process.

What a run with N processes does (see :class:`racnn.training.loop.Trainer`):

- **process group** from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``):
  NCCL on CUDA (rank r on ``cuda:LOCAL_RANK``), gloo on CPU.
- **global batch**: ``train.batch_size`` is the batch of one step, all processes together; each takes
  ``batch_size / N`` images of a ``DistributedSampler`` shard (it must divide).
- **DDP per phase**: the alternating schedule trains the classifiers or the APNs, never both (except the joint
  mode). A DDP reducer only covers parameters that require grad when it is built, and one built over every
  parameter would wait for gradients that frozen parameters never get (or, with ``find_unused_parameters``,
  walk the graph and all-reduce the frozen half at every step). :class:`PhaseDDP` therefore builds the wrapper
  over the parameters the current phase trains and rebuilds it when that set changes (a few times per run);
  one wrapper lives at a time, so no stale reducer hook fires.
- **BatchNorm** is synchronised: ``SyncBatchNorm`` on CUDA and :class:`AllReduceBatchNorm` on CPU (torch's is
  GPU-only), so N processes with B/N images each normalise with the statistics of the whole batch B, as one
  process does; results then match a single process up to floating-point rounding.
- **metrics**: loss sums are all-reduced; accuracy and box accumulators are gathered; validation and test are
  sharded (rank r takes images r, r+N, ...: no padding, no duplicates) and gathered, so the counts are those
  of one process; the record that steers the schedule is broadcast from rank 0, so every rank decides alike.
- **files**: only rank 0 writes; the other ranks meet it at barriers where they read what it wrote.
"""

from __future__ import annotations

import gc
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..evaluation import Accumulator, accumulate
from ..fusion import fit_model_weights
from ..model import RACNN
from . import setup


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
        raise RuntimeError(f"train.device={device}: multi-process training runs on CUDA (NCCL) or CPU (gloo)")
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


class NonFiniteWatch:
    """The first step (1-based) whose loss was not finite, kept on the device by ``mark``; ``check`` reads it
    (over every rank) and raises a :class:`FloatingPointError` naming ``where`` and the step, then ``kept``.

    ``mark`` checks every ``train.log_every`` steps on an accelerator (no host sync per step) but at every step
    on the CPU, where reading the flag costs nothing: a NaN that reached the weights makes NaN attention boxes,
    and the next step's crop would index with them."""

    NEVER = 2**62

    def __init__(self, device: torch.device, env: DistEnv, every: int, where: str, kept: str) -> None:
        self.first = torch.full((), self.NEVER, dtype=torch.int64, device=device)
        self.every = 1 if device.type == "cpu" else every
        self.env, self.where, self.kept = env, where, kept

    def mark(self, loss: torch.Tensor, step: int) -> None:
        self.first = torch.where(torch.isfinite(loss.detach()), self.first, self.first.clamp(max=step))
        if step % self.every == 0:
            self.check()

    def check(self) -> None:
        step = int(all_reduce_min(self.first, self.env))  # the same decision on every rank
        if step < self.NEVER:
            raise FloatingPointError(
                f"{self.where}, step {step}: the loss is not finite (nan or inf); stopped, {self.kept}"
            )


def gather_accumulator(acc: Accumulator, env: DistEnv) -> Accumulator:
    """Every rank's :class:`Accumulator` merged in rank order (the same on every rank)."""
    if not env.active:
        return acc
    part = {
        "correct": dict(acc.correct),
        "n": acc.n,
        "ious": acc.ious,
        "centre_hits": acc.centre_hits,
        "sides": dict(acc.sides),
        "in_object": dict(acc.in_object),
        "head": (acc.head_hit, acc.head_n),
        "scores": (acc.logprobs, acc.targets),
    }
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, part)
    out = Accumulator(keep_scores=acc.keep_scores)
    for p in parts:
        for k, c in p["correct"].items():
            out.correct[k] += c
        out.n += p["n"]
        out.ious += p["ious"]
        out.centre_hits += p["centre_hits"]
        for s, sides in p["sides"].items():
            out.sides[s] += sides
        for s, hits in p["in_object"].items():
            out.in_object[s] += hits
        out.logprobs += p["scores"][0]
        out.targets += p["scores"][1]
        out.head_hit += p["head"][0]
        out.head_n += p["head"][1]
    return out


def epoch_record(
    sums: dict[str, torch.Tensor],
    acc: Accumulator,
    steps: int,
    seen: int,
    seconds: float,
    bad: int | None,
    env: DistEnv,
) -> dict[str, Any]:
    """A training epoch's record: loss means over the steps (``sums``: per-step loss terms, summed on the
    device), training accuracy and box sides, speed and (when skipping) unreadable images; over every rank,
    and rank 0's record on every rank so that all take the same decisions."""
    if not env.active:
        rec = {k: float(v) / max(steps, 1) for k, v in sums.items()}
    else:  # every rank ran `steps` steps on an equal share of each global batch
        total = all_reduce_sum(torch.stack([v.float() for v in sums.values()]), env)
        rec = {k: v / max(steps * env.world_size, 1) for k, v in zip(sums, total.tolist(), strict=True)}
        acc = gather_accumulator(acc, env)
        seen *= env.world_size
    summary = acc.summary()
    rec.update({f"train_{k}": v for k, v in summary.items() if k.startswith(("acc_", "box_side"))})
    rec.update(
        {"steps": steps, "time_s": round(seconds, 2), "images_per_s": round(seen / max(seconds, 1e-9), 2)}
    )
    if bad is not None:
        rec["bad_images"] = int(all_reduce_sum(torch.tensor(bad), env))
    return broadcast_object(rec, env)


def evaluate_split(
    model: RACNN,
    dataset: Any,
    cfg: Config,
    env: DistEnv,
    *,
    device: torch.device,
    desc: str,
    progress: bool,
    channels_last: bool = False,
    fit_fusion: bool = False,
) -> dict[str, float]:
    """:func:`racnn.evaluation.evaluate` on ``dataset``; under DDP each rank evaluates a shard (no collectives
    inside the model: it runs in eval mode, where synchronised BatchNorm uses its running statistics) and the
    accumulators are merged. ``fit_fusion``: fit the model's ``weighted`` fusion on these predictions
    (:func:`racnn.fusion.fit_model_weights`; every rank fits the same merged scores alike). With
    ``data.skip_bad_images`` the unreadable images are counted in ``bad_images``."""
    loader = setup.make_loader(dataset, cfg, world_size=env.world_size, rank=env.rank)
    acc = accumulate(
        model,
        loader,
        device=device,
        amp=cfg.train.amp,
        channels_last=channels_last,
        head_parts=getattr(dataset, "head_parts", None),
        desc=desc,
        progress=progress,
        keep_scores=fit_fusion,
    )
    acc = gather_accumulator(acc, env)
    metrics = acc.summary()
    if fit_fusion:
        metrics |= fit_model_weights(model, *acc.scores())
    if cfg.data.skip_bad_images:
        metrics["bad_images"] = int(all_reduce_sum(torch.tensor(loader.bad_images), env))
    return broadcast_object(metrics, env)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the gradients, over ranks too."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole batch over every rank, computed with
    differentiable all-reduces (works on gloo/CPU, where ``nn.SyncBatchNorm`` does not). Outside training, or
    without a process group, it is plain BatchNorm. Same parameters and buffers as ``nn.BatchNorm*d``."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        factor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast a C vector over B x C x ...
        xf = x.float()
        count = torch.full((1,), xf.numel() // xf.shape[1], dtype=xf.dtype, device=xf.device)
        total = all_reduce(torch.cat([xf.sum(dims), count]))  # C sums + the element count, all ranks
        n = total[-1]
        mean = total[:-1] / n  # C
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n  # C, biased (as used to normalise)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def _to_all_reduce_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (nn.SyncBatchNorm, AllReduceBatchNorm)
    ):
        out = AllReduceBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias  # the same Parameter objects
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_all_reduce_bn(child))
    return out


def sync_batchnorm(model: RACNN, device: torch.device, env: DistEnv) -> RACNN:
    """Synchronise every BatchNorm layer across ranks (in place; before the optimisers are built). State dict
    keys do not change, so checkpoints load into a plain model."""
    if not env.active:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_all_reduce_bn(model)  # type: ignore[return-value]


# BatchNorm is synchronised, so buffers agree on every rank: no broadcast before each forward (the keyword
# changed name in torch 2.10)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


class PhaseDDP:
    """What the training step calls: the raw model for a single process; under DDP a wrapper over the
    parameters that require grad now, rebuilt (and the previous one dropped) when the phase changes them."""

    def __init__(self, model: RACNN, device: torch.device, env: DistEnv) -> None:
        self.model, self.device, self.env = model, device, env
        self._key: tuple[bool, ...] | None = None
        self._wrapper: nn.Module | None = None

    def __call__(self) -> nn.Module:
        if not self.env.active:
            return self.model
        key = tuple(p.requires_grad for p in self.model.parameters())
        if key != self._key:
            self._wrapper = None
            gc.collect()  # the old reducer (and its autograd hooks) goes now, not at some later collection
            self._key = key
            if any(key):
                self._wrapper = nn.parallel.DistributedDataParallel(
                    self.model,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    **_NO_BUFFER_SYNC,
                )
        return self._wrapper if self._wrapper is not None else self.model
