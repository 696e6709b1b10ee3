"""Loss terms of RA-CNN (paper Eqs. 7-8) as pure functions returning named scalars."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .model import fusion_keys, scale_keys


def true_class_prob(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``p_t``: softmax probability of the true class. B x K, B -> B."""
    return logits.float().softmax(dim=1).gather(1, target[:, None]).squeeze(1)


def ranking_hinges(
    probs: list[torch.Tensor],
    margin: float = 0.05,
    *,
    detach_coarse: bool = False,
    ceiling: float | None = None,
) -> list[torch.Tensor]:
    """Eq. 8 per adjacent pair of scales and image: ``max(0, p_t(s) - p_t(s+1) + margin)``, B each.

    ``detach_coarse`` makes ``p_t(s)`` a fixed reference: the gradient then only raises ``p_t(s+1)``, so the
    APN that feeds scale s is never rewarded for making scale s worse (its crop also feeds the pair (s, s+1)).
    ``ceiling`` caps what the finer scale is asked for: ``max(0, min(p_t(s) + margin, ceiling) - p_t(s+1))``,
    so the hinge goes quiet once the finer scale is as confident as its loss lets it be (with label smoothing
    eps, the cross-entropy's optimum is ``p_t = 1 - eps + eps / K``; both scales sit near it on training
    images, and the plain hinge then stays active on almost every image, pushing the APN by noise).
    """
    hinges = []
    for coarse, fine in itertools.pairwise(probs):
        goal = (coarse.detach() if detach_coarse else coarse) + margin
        if ceiling is not None:
            goal = goal.clamp(max=ceiling)
        hinges.append((goal - fine).clamp(min=0))
    return hinges


def ranking_loss(
    probs: list[torch.Tensor],
    margin: float = 0.05,
    *,
    detach_coarse: bool = False,
    ceiling: float | None = None,
) -> torch.Tensor:
    """Inter-scale pairwise ranking loss, Eq. 8, summed over adjacent scales and averaged over the batch:
    ``sum_s mean_b max(0, p_t(s) - p_t(s+1) + margin)``. ``probs``: per-scale ``p_t``, B each. Keywords as
    :func:`ranking_hinges`. (The paper's loss as one function, for users and tests; the training step sums
    :func:`ranking_hinges` itself, as it also logs their active share.)"""
    total = probs[0].new_zeros(())
    for hinge in ranking_hinges(probs, margin, detach_coarse=detach_coarse, ceiling=ceiling):
        total = total + hinge.mean()
    return total


def rank_ceiling(label_smoothing: float, num_classes: int, margin: float) -> float:
    """``loss.rank_quiet``'s cap on the finer scale's goal: within ``margin`` of the largest ``p_t`` the
    smoothed cross-entropy aims for, ``1 - eps + eps / K``."""
    return 1.0 - label_smoothing + label_smoothing / num_classes - margin


def classification_losses(
    logits: dict[str, torch.Tensor], target: torch.Tensor, *, label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    """Cross-entropy of every output (per-scale ``ce_s1``.. and fusion ``ce_s12``, ``ce_s123``), Eq. 7's L_cls."""
    return {
        f"ce_{k}": F.cross_entropy(v.float(), target, label_smoothing=label_smoothing)
        for k, v in logits.items()
    }


def total_classification(
    terms: dict[str, torch.Tensor], *, num_scales: int, fusion_weight: float = 1.0
) -> torch.Tensor:
    """Sum of the per-scale cross-entropies plus ``fusion_weight`` times the fusion ones (the model's output
    keys, :func:`racnn.model.scale_keys` and :func:`~racnn.model.fusion_keys`)."""
    scale = sum(terms[f"ce_{k}"] for k in scale_keys(num_scales))
    fused = [terms[f"ce_{k}"] for k in fusion_keys(num_scales)]
    return scale + fusion_weight * sum(fused, torch.zeros((), device=scale.device))


def box_regression_loss(box: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """APN initialisation: smooth-L1 between predicted and target ``(cx, cy, half)``, B x 3 each."""
    return F.smooth_l1_loss(box, target, beta=0.05)
