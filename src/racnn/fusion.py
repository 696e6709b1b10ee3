"""Fusion: one prediction from the first n scales (paper Table 2, "scale 1+2" and "scale 1+2+3").

``model.fusion`` names the kind that the model's fused outputs (``s12``, ``s123``, ...) use, and with them
``predict``, ``export``, ONNX and model selection. Every evaluation reports every kind side by side
(``acc_s123_concat``, ``acc_s123_mean_prob``, ...), so they can be compared on the same trained model.

- ``concat``: the paper's: a linear classifier on the concatenated pooled features of the scales, trained by
  its own cross-entropy together with the scales. On a few hundred training images every scale is near 100%
  right on its training data, so this head learns nothing about which scale generalises.
- ``mean_prob``: the log of the mean of the scales' softmax probabilities (no parameters).
- ``mean_logprob``: the mean of the scales' log-probabilities, i.e. the normalised product of their
  distributions (no parameters); the test-time fusion of WS-DAN-like methods, in log space.
- ``weighted``: ``sum_s w_s log p_s`` with one non-negative weight per scale, fitted on *held-out*
  predictions (the validation split, after every validation; :func:`fit_weights`). The weights are the
  model's ``fusion_weights`` buffer; until fitted they are ``1/n``, i.e. ``mean_logprob``.

Every kind returns log-scores (B x K): their softmax is a distribution and their argmax the prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# the kinds of fused output (model.fusion), each a branch of fuse()
FUSIONS = ("concat", "mean_prob", "mean_logprob", "weighted")

__all__ = ["FUSIONS", "cross_fitted_correct", "fit_model_weights", "fit_weights", "fuse"]


def fuse(
    kind: str,
    scale_logits: Sequence[torch.Tensor],
    *,
    concat: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused log-scores of the scales ``scale_logits`` (n tensors, B x K each) -> B x K.

    ``concat``: the concat head's logits (needed for ``kind="concat"``); ``weights``: n per-scale weights
    (needed for ``"weighted"``)."""
    if kind == "concat":
        if concat is None:
            raise ValueError("fusion 'concat' needs the concat head's logits")
        return concat
    logp = torch.stack([z.float().log_softmax(1) for z in scale_logits])  # n x B x K
    if kind == "mean_prob":
        return torch.logsumexp(logp, 0) - math.log(len(scale_logits))
    if kind == "mean_logprob":
        return logp.mean(0)
    if kind == "weighted":
        if weights is None:
            raise ValueError("fusion 'weighted' needs the per-scale weights")
        return torch.einsum("n,nbk->bk", weights.to(logp.dtype), logp)
    raise ValueError(f"unknown fusion {kind!r} (known: {', '.join(FUSIONS)})")


def fit_weights(logprobs: torch.Tensor, target: torch.Tensor, *, steps: int = 100) -> torch.Tensor:
    """Per-scale weights ``w >= 0`` that minimise the cross-entropy of ``softmax(sum_s w_s logprobs[s])`` on
    held-out predictions. ``logprobs``: n x M x K log-probabilities of n scales on M images; ``target``: M.
    A tiny convex problem (n parameters): L-BFGS from the uniform ``1/n``. Returns n weights (float32)."""
    n = logprobs.shape[0]
    lp, y = logprobs.detach().double(), target.detach().long()
    # w = softplus(v): non-negative, smooth; v0 gives w = 1/n
    v = torch.full((n,), math.log(math.expm1(1.0 / n)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(torch.einsum("n,nmk->mk", F.softplus(v), lp), y)
        loss.backward()
        return loss

    if y.numel() > 0:
        opt.step(closure)
    w = F.softplus(v.detach())
    if not torch.isfinite(w).all():  # a degenerate split (e.g. one image): keep the uniform weights
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return w.float()


def cross_fitted_correct(logprobs: torch.Tensor, target: torch.Tensor, *, folds: int = 5) -> int:
    """Images the ``weighted`` fusion gets right when each fold's weights are fitted on the *other* folds:
    an honest accuracy on the split the weights are fitted on (its in-sample accuracy would flatter it).
    Folds are interleaved (image i in fold i mod ``folds``). ``logprobs``: n x M x K; ``target``: M."""
    m = target.numel()
    folds = max(1, min(folds, m))
    fold = torch.arange(m) % folds
    correct = 0
    for f in range(folds):
        held = fold == f
        train = ~held if folds > 1 else held
        w = fit_weights(logprobs[:, train], target[train])
        pred = torch.einsum("n,nmk->mk", w.double(), logprobs[:, held].double()).argmax(1)
        correct += int((pred == target[held]).sum())
    return correct


@torch.no_grad()
def fit_model_weights(
    model: torch.nn.Module, logprobs: torch.Tensor, target: torch.Tensor
) -> dict[str, float]:
    """Fit the ``weighted`` fusion of ``model`` (its ``fusion_weights``) on held-out predictions: ``logprobs``
    (N x M x K, every scale) and ``target`` (M). Returns the honest accuracy of that fusion on these images
    (:func:`cross_fitted_correct`) as ``{"acc_s12_weighted": .., ..}``, plus ``acc_s12`` .. when the model's
    fusion is ``weighted``; the caller's in-sample figures under those keys are to be replaced."""
    num_scales = model.cfg.num_scales
    m = target.numel()
    out: dict[str, float] = {}
    if num_scales < 2 or m == 0:
        return out
    for n, key in enumerate(model.fusion_keys, start=2):
        model.fusion_weights[n - 2, :n] = fit_weights(logprobs[:n], target).to(model.fusion_weights)
        out[f"acc_{key}_weighted"] = cross_fitted_correct(logprobs[:n], target) / m
        if model.cfg.fusion == "weighted":
            out[f"acc_{key}"] = out[f"acc_{key}_weighted"]
    return out
