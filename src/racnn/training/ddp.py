"""DDP for the alternating schedule: BatchNorm synchronised over ranks (on CPU too) and a wrapper rebuilt
when a phase changes the set of trained parameters.

- **the wrapper**: DDP registers hooks for the parameters that require grad when it is built, and the phases
  of RA-CNN train different parts (classifiers, then APNs). :class:`PhaseDDP` wraps exactly what the current
  phase trains and rebuilds it when that set changes (a few times per run); one wrapper lives at a time, so
  no stale reducer hook fires.
- **BatchNorm** is synchronised: ``SyncBatchNorm`` on CUDA and :class:`AllReduceBatchNorm` on CPU (torch's is
  GPU-only), so N processes with B/N images each normalise with the statistics of the whole batch B, as one
  process does; results then match a single process up to floating-point rounding.
"""

from __future__ import annotations

import gc
import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model import RACNN
from .distributed import DistEnv


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
