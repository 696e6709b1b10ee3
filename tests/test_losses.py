"""Loss terms: classification cross-entropies and the inter-scale ranking loss (paper Eqs. 7-8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from racnn.losses import (
    box_regression_loss,
    classification_losses,
    rank_ceiling,
    ranking_hinges,
    ranking_loss,
    total_classification,
    true_class_prob,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------- ranking


def test_ranking_loss_hand_case_single_sample():
    # pair 1: max(0, 0.5 - 0.3 + 0.05) = 0.25; pair 2: max(0, 0.3 - 0.6 + 0.05) = 0
    loss = ranking_loss([_t(0.5), _t(0.3), _t(0.6)], margin=0.05)
    assert loss.shape == ()
    assert math.isclose(float(loss), 0.25, abs_tol=1e-12)


def test_ranking_loss_hand_case_batch_mean():
    p1, p2, p3 = _t(0.5, 0.2), _t(0.3, 0.9), _t(0.6, 0.1)
    # pair 1: [0.25, 0] -> 0.125;  pair 2: [0, 0.9 - 0.1 + 0.05 = 0.85] -> 0.425
    loss = ranking_loss([p1, p2, p3], margin=0.05)
    assert math.isclose(float(loss), 0.125 + 0.425, abs_tol=1e-12)
    # the margin enters every active pair
    loss0 = ranking_loss([p1, p2, p3], margin=0.0)
    assert math.isclose(float(loss0), 0.1 + 0.4, abs_tol=1e-12)


def test_ranking_loss_zero_when_finer_scales_win_by_more_than_the_margin():
    p = [_t(0.1, 0.2, 0.3), _t(0.2, 0.3, 0.5), _t(0.3, 0.45, 0.9)]
    assert float(ranking_loss(p, margin=0.05)) == 0.0
    # ... but not when the lead is smaller than the margin
    assert float(ranking_loss(p, margin=0.2)) > 0.0


def test_quiet_ranking_hinge_stops_at_the_ceiling():
    # both scales at the label-smoothing optimum p_t* = 1 - 0.1 + 0.1/25 = 0.904: the paper's hinge is active
    # (0.904 - 0.89 + 0.05 > 0) on every image, the quiet one only where the finer scale is short of p_t* - m
    ceiling = rank_ceiling(0.1, 25, 0.05)
    assert math.isclose(ceiling, 1 - 0.1 + 0.1 / 25 - 0.05)
    coarse, fine = _t(0.904, 0.904, 0.5), _t(0.89, 0.80, 0.52)
    paper = ranking_hinges([coarse, fine], 0.05)[0]
    quiet = ranking_hinges([coarse, fine], 0.05, ceiling=ceiling)[0]
    assert (paper > 0).all()
    torch.testing.assert_close(quiet, _t(0.0, ceiling - 0.80, 0.5 + 0.05 - 0.52))
    # below the ceiling the quiet hinge is the paper's; the loss is the mean over images, summed over pairs
    loss = ranking_loss([coarse, fine, fine], 0.05, ceiling=ceiling)
    second = ranking_hinges([fine, fine], 0.05, ceiling=ceiling)[0]
    torch.testing.assert_close(second, _t(0.0, 0.05, 0.05))  # 0.80 + 0.05 is under the ceiling
    assert math.isclose(float(loss), float(quiet.mean() + second.mean()))
    # no smoothing: the ceiling is 1 - margin
    assert rank_ceiling(0.0, 25, 0.05) == 0.95


def test_ranking_loss_gradient_signs():
    p1 = _t(0.6, 0.2).requires_grad_(True)  # sample 0: active; sample 1: inactive
    p2 = _t(0.4, 0.7).requires_grad_(True)
    ranking_loss([p1, p2], margin=0.05).backward()
    # d/dp(s) = +1/B, d/dp(s+1) = -1/B where active; zero where inactive
    torch.testing.assert_close(p1.grad, _t(0.5, 0.0))
    torch.testing.assert_close(p2.grad, _t(-0.5, 0.0))


def test_ranking_loss_step_on_the_logits_raises_the_finer_scale():
    torch.manual_seed(0)
    target = torch.tensor([0, 3, 1, 2])
    logits1 = torch.randn(4, 5) * 0.1
    logits1[torch.arange(4), target] += 3.0  # scale 1 confident ...
    logits2 = (torch.randn(4, 5) * 0.1).requires_grad_(True)  # ... scale 2 not: every pair active
    logits1.requires_grad_(True)
    p1, p2 = true_class_prob(logits1, target), true_class_prob(logits2, target)
    assert (p1 - p2 + 0.05 > 0).all()
    ranking_loss([p1, p2], margin=0.05).backward()
    with torch.no_grad():
        new_p2 = true_class_prob(logits2 - 1.0 * logits2.grad, target)
        new_p1 = true_class_prob(logits1 - 1.0 * logits1.grad, target)
    assert (new_p2 > p2).all()
    assert (new_p1 < p1).all()


# -------------------------------------------------------------------------------------- probabilities


def test_true_class_prob_matches_manual_softmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 7)
    target = torch.tensor([0, 6, 3, 3, 1, 5])
    e = torch.exp(logits.double())
    manual = (e / e.sum(1, keepdim=True))[torch.arange(6), target]
    p = true_class_prob(logits, target)
    assert p.shape == (6,)
    torch.testing.assert_close(p.double(), manual, atol=1e-6, rtol=0)
    # bf16 logits are computed in float32
    assert true_class_prob(logits.bfloat16(), target).dtype == torch.float32


# ----------------------------------------------------------------------------------- classification


def _logits(num_scales: int, b: int = 4, k: int = 5) -> dict[str, torch.Tensor]:
    from racnn.model import fusion_keys, scale_keys

    gen = torch.Generator().manual_seed(2)
    return {key: torch.randn(b, k, generator=gen) for key in scale_keys(num_scales) + fusion_keys(num_scales)}


def test_classification_losses_keys_and_values():
    logits = _logits(3)
    target = torch.tensor([0, 4, 2, 2])
    terms = classification_losses(logits, target)
    assert set(terms) == {"ce_s1", "ce_s2", "ce_s3", "ce_s12", "ce_s123"}
    for key, value in logits.items():
        torch.testing.assert_close(terms[f"ce_{key}"], F.cross_entropy(value, target))
    assert len({float(v) for v in terms.values()}) == 5


def test_label_smoothing_changes_the_value():
    logits = _logits(2)
    target = torch.tensor([1, 0, 3, 2])
    plain = classification_losses(logits, target)
    smooth = classification_losses(logits, target, label_smoothing=0.2)
    for key in plain:
        assert not torch.allclose(plain[key], smooth[key])
        torch.testing.assert_close(smooth[key], F.cross_entropy(logits[key[3:]], target, label_smoothing=0.2))


@pytest.mark.parametrize("fusion_weight", [1.0, 0.5, 0.0])
def test_total_classification_hand_example(fusion_weight):
    terms = {
        "ce_s1": _t(1.0)[0],
        "ce_s2": _t(2.0)[0],
        "ce_s3": _t(3.0)[0],
        "ce_s12": _t(4.0)[0],
        "ce_s123": _t(5.0)[0],
    }
    total = total_classification(terms, num_scales=3, fusion_weight=fusion_weight)
    assert math.isclose(float(total), 6.0 + fusion_weight * 9.0, abs_tol=1e-12)
    two = {k: terms[k] for k in ("ce_s1", "ce_s2", "ce_s12")}
    assert math.isclose(
        float(total_classification(two, num_scales=2, fusion_weight=fusion_weight)),
        3.0 + fusion_weight * 4.0,
        abs_tol=1e-12,
    )
    one = {"ce_s1": terms["ce_s1"]}
    assert math.isclose(float(total_classification(one, num_scales=1, fusion_weight=fusion_weight)), 1.0)


def test_total_classification_is_differentiable_end_to_end():
    logits = {k: v.requires_grad_(True) for k, v in _logits(3).items()}
    target = torch.tensor([0, 1, 2, 3])
    total_classification(classification_losses(logits, target), num_scales=3, fusion_weight=0.5).backward()
    for key, v in logits.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, key
    # the fusion logits' gradient is scaled by the fusion weight
    ref = logits["s12"].detach().clone().requires_grad_(True)
    F.cross_entropy(ref, target).backward()
    torch.testing.assert_close(logits["s12"].grad, 0.5 * ref.grad)


# --------------------------------------------------------------------------------------- regression


def test_box_regression_loss():
    box = _t(0.4, 0.5, 0.2, 0.6, 0.3, 0.35).reshape(2, 3)
    assert float(box_regression_loss(box, box.clone())) == 0.0
    target = box.clone()
    target[0, 0] += 0.1  # |d| >= beta = 0.05: |d| - beta/2 = 0.075
    target[1, 2] += 0.01  # |d| < beta: d^2 / (2 beta) = 0.001
    loss = box_regression_loss(box, target)
    assert math.isclose(float(loss), (0.075 + 0.001) / 6, rel_tol=1e-6)
    # a gradient step reduces it
    b = box.clone().requires_grad_(True)
    box_regression_loss(b, target).backward()
    assert float(box_regression_loss(b.detach() - 0.5 * b.grad, target)) < float(loss)
