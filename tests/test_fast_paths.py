"""Correctness of every fast path (speed is the benchmark's business, see benchmarks/speed.py):

* ``crop_zoom`` (one ``grid_sample`` on the raw image with the mask folded into shifted sample positions and
  gains), ``crop_zoom_gather`` and the C++ kernel ``crop_zoom_cpp`` (``runtime.compile_crop`` on a CPU) equal
  the literal ``crop_zoom_reference`` in values and in the gradients
  with respect to the box and the image (float64, tight tolerance), including the cases where the folding
  could go wrong: border boxes, samples clamped at the border, pixel-aligned samples, near-hard masks;
* its no-grad, channels_last and low-precision paths;
* the APN's pool shortcut;
* the whole (tiny) model under channels_last, bf16 autocast and activation checkpointing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import NEEDS_CXX, compare_crop, crop_boxes
from racnn.attention import (
    APN,
    _sample_positions,
    adaptive_pool,
    box_from_unit,
    crop_zoom,
    crop_zoom_gather,
    crop_zoom_reference,
)
from racnn.config import ModelConfig
from racnn.crop_cpp import crop_zoom_cpp
from racnn.losses import classification_losses, ranking_loss, total_classification, true_class_prob
from racnn.model import build_model

CPP = pytest.param(crop_zoom_cpp, marks=NEEDS_CXX, id="cpp")
FAST = [pytest.param(crop_zoom, id="grid_sample"), pytest.param(crop_zoom_gather, id="gather"), CPP]
OURS = [pytest.param(crop_zoom, id="grid_sample"), CPP]  # the crops a model runs


@pytest.mark.parametrize("fn", FAST)
@pytest.mark.parametrize(("shape", "out"), [((8, 3, 16, 16), 8), ((8, 2, 12, 19), 5), ((8, 1, 9, 7), 23)])
@pytest.mark.parametrize("k", [10.0, 0.7, 200.0])
@pytest.mark.parametrize("image_grad", [False, True], ids=["box_grad", "box_and_image_grad"])
def test_fast_crop_equals_reference(fn, shape, out, k, image_grad):
    gen = torch.Generator().manual_seed(sum(shape) + out)
    image = torch.rand(*shape, generator=gen, dtype=torch.float64)
    boxes = crop_boxes(shape[0], gen)
    compare_crop(fn, image, boxes[: shape[0]], out, k, image_grad)
    compare_crop(fn, image, boxes[shape[0] :], out, k, image_grad)


@pytest.mark.parametrize("fn", OURS)
def test_crop_zoom_448_to_224_equals_reference(fn):
    """The benchmark's geometry (448 -> 224, zoom factor 2 and below) on a 3-image batch. No sample lies on a
    pixel centre: there the bilinear interpolant has a kink, and which one-sided slope a formulation returns
    depends on the last bit of its coordinate arithmetic (the pixel-aligned case is in ``_boxes``, on small
    images where every formulation computes the coordinate exactly)."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 3, 448, 448, generator=gen, dtype=torch.float64)
    boxes = torch.tensor([[0.5, 0.5, 0.3], [0.313, 0.617, 0.27], [0.5, 0.5, 0.5]], dtype=torch.float64)
    xs, ys = _sample_positions(boxes, 224)
    pos = torch.cat([xs, ys]) * 448 - 0.5  # continuous pixel index of every sample
    assert ((pos - pos.round()).abs() > 1e-6).all()
    compare_crop(fn, image, boxes, 224, 10.0, image_grad=True)


@pytest.mark.parametrize("fn", OURS)
def test_crop_zoom_far_outside_box_is_finite(fn):
    """Both tap weights underflow to 0 (near-hard mask, box off the image): output and gradient stay 0."""
    image = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    box = torch.tensor([[1.6, 1.6, 0.1], [-0.6, 0.5, 0.1]], dtype=torch.float64, requires_grad=True)
    y = fn(image, box, 4, 200.0)
    (g,) = torch.autograd.grad(y.sum(), box)
    assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(g).all()
    torch.testing.assert_close(y, crop_zoom_reference(image, box, 4, 200.0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("fn", OURS)
def test_crop_zoom_no_grad_path_equals_grad_path(fn):
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(4, 3, 20, 20, generator=gen)
    boxes = box_from_unit(torch.rand(4, 3, generator=gen), 0.25, 1.0)
    with_grad = fn(image, boxes.requires_grad_(True), 11)
    with torch.no_grad():
        without = fn(image, boxes, 11)
    # the no-grad path may run other kernels: float32 rounding of values in [0, 1], far below 1e-6
    torch.testing.assert_close(without, with_grad.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fn", OURS)
def test_crop_zoom_channels_last_in_channels_last_out(fn):
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(3, 3, 24, 20, generator=gen, dtype=torch.float64)
    boxes = box_from_unit(torch.rand(3, 3, generator=gen, dtype=torch.float64), 0.25, 1.0)
    cl = image.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = fn(cl, boxes, 9)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, crop_zoom_reference(image, boxes, 9), atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(y.sum(), cl)
    im = image.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(crop_zoom_reference(im, boxes, 9).sum(), im)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("fn", OURS)
def test_crop_zoom_low_precision_box_is_computed_in_float32(fn):
    """A bf16 box (APN under autocast) is placed with float32 arithmetic: no sub-pixel rounding at 448."""
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 448, 448, generator=gen)
    box = torch.tensor([[0.517, 0.433, 0.301], [0.45, 0.55, 0.2]]).bfloat16()
    torch.testing.assert_close(fn(image, box, 32), fn(image, box.float(), 32), atol=0, rtol=0)
    y = fn(image.bfloat16(), box.float(), 32)  # bf16 image: sampled in float32, returned in bf16
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fn(image.bfloat16().float(), box.float(), 32), atol=0.01, rtol=0)


def test_apn_pool_shortcut_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Features already grid x grid skip the pool, which is the identity there; other sizes pool."""
    import racnn.attention as attention

    torch.manual_seed(0)
    apn = APN(6, grid=3, hidden=8).double()
    feats = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(adaptive_pool(feats, 3), feats.flatten(2), atol=0, rtol=0)
    pooled = []
    monkeypatch.setattr(
        attention, "adaptive_pool", lambda f, g: pooled.append(f.shape) or adaptive_pool(f, g)
    )
    z = torch.sigmoid(apn.fc2(torch.tanh(apn.fc1(feats.flatten(1)))))
    torch.testing.assert_close(apn(feats), box_from_unit(z, apn.min_side, apn.max_side), atol=0, rtol=0)
    assert pooled == []  # the shortcut
    assert apn(torch.randn(4, 6, 5, 4, dtype=torch.float64)).shape == (4, 3)
    assert pooled == [(4, 6, 5, 4)]


@pytest.mark.parametrize("size", [(7, 7), (14, 14), (5, 4), (2, 3), (4, 4)])
def test_the_apn_pool_is_adaptive_average_pooling(size: tuple[int, int]) -> None:
    """The matrix product equals ``nn.AdaptiveAvgPool2d`` (overlapping windows at 7 -> 4, fewer cells than
    the grid at 2 x 3) in float64 to rounding, and its gradient too."""
    feats = torch.randn(2, 5, *size, dtype=torch.float64, requires_grad=True)
    ours = adaptive_pool(feats, 4)
    ref = nn.AdaptiveAvgPool2d(4)(feats).flatten(2)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), feats)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), feats)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=0)


def _apn_autocast_reference(apn: APN, feats: torch.Tensor) -> torch.Tensor:
    """The APN as autocast computes it without the cached cast (fc1 through nn.Linear)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.sigmoid(apn.fc2(torch.tanh(apn.fc1(feats.flatten(1)))))
        return box_from_unit(z, apn.min_side, apn.max_side)


def test_apn_cached_low_precision_weight_equals_autocast():
    """Under autocast with frozen weights the bf16 copy of fc1 is kept between calls: same output as
    autocast's own per-call cast, refreshed after the weights change, unused while they train."""
    torch.manual_seed(0)
    apn = APN(8, grid=2, hidden=16)
    feats = torch.randn(4, 8, 2, 2)
    apn.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = apn(feats)
        cached = apn._fc1_cast
        with torch.inference_mode():
            again = apn(feats)
    assert cached is not None and apn._fc1_cast is cached  # reused, not re-cast
    torch.testing.assert_close(first, _apn_autocast_reference(apn, feats), atol=0, rtol=0)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    with torch.no_grad():
        apn.fc1.weight.mul_(-1.5)  # an optimiser step / load_state_dict: the version changes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        updated = apn(feats)
    assert apn._fc1_cast is not cached
    torch.testing.assert_close(updated, _apn_autocast_reference(apn, feats), atol=0, rtol=0)
    assert not torch.equal(updated, first)
    # training the APN: autocast's differentiable cast, no copy kept, gradients reach fc1
    apn.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        apn(feats).float().sum().backward()
    assert apn._fc1_cast is None and apn.fc1.weight.grad is not None and apn.fc1.weight.grad.abs().sum() > 0
    out = apn(feats)  # outside autocast: float32, no copy
    assert out.dtype == torch.float32 and apn._fc1_cast is None


# ----------------------------------------------------------------------------------- the whole model


def _model(checkpoint_activations: bool = False, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny", pretrained=False, input_size=32, apn_grid=2, apn_hidden=16, **kw)
    model = build_model(cfg, num_classes=5)
    model.checkpoint_activations = checkpoint_activations
    model.train()
    return model


def _loss_and_grads(model, images, *, detach_boxes=False, autocast=False):
    target = torch.tensor([1, 3, 0, 4])
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(images, detach_boxes=detach_boxes)
    cls = total_classification(classification_losses(out.logits, target), num_scales=3)
    probs = [true_class_prob(out.logits[k], target) for k in model.scale_keys]
    loss = cls + ranking_loss(probs, margin=1.0)  # margin 1: the ranking loss reaches every APN
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_channels_last_model_matches_contiguous():
    ref_out, ref_loss, ref_grads = _loss_and_grads(_model(), _images())
    model = _model().to(memory_format=torch.channels_last)
    out, loss, grads = _loss_and_grads(model, _images().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(out.boxes + out.crops, ref_out.boxes + ref_out.crops, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("detach_boxes", [True, False], ids=["classify", "attend"])
def test_bf16_autocast_is_finite_and_close_to_float32(channels_last, detach_boxes):
    """Loose: bf16 boxes move by up to ~1 px on this random tiny model, and the attention-phase gradient
    through the steep box mask follows them; the classification-phase gradient points the same way."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref_out, ref_loss, ref_grads = _loss_and_grads(_model(), _images(), detach_boxes=detach_boxes)
    model = _model().to(memory_format=fmt)
    images = _images().contiguous(memory_format=fmt)
    out, loss, grads = _loss_and_grads(model, images, detach_boxes=detach_boxes, autocast=True)
    assert all(torch.isfinite(v).all() for v in out.logits.values())
    assert torch.isfinite(loss) and abs(float(loss / ref_loss) - 1) < 0.02
    for a, b in zip(out.boxes, ref_out.boxes, strict=True):
        assert float((a.detach().float() - b.detach()).abs().max()) < 0.05
    assert grads.keys() == ref_grads.keys()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    if detach_boxes:
        a = torch.cat([ref_grads[n].flatten() for n in grads])
        b = torch.cat([grads[n].float().flatten() for n in grads])
        assert float(a @ b / (a.norm() * b.norm())) > 0.8


@pytest.mark.parametrize("detach_boxes", [False, True], ids=["attend", "classify"])
def test_checkpoint_activations_gives_identical_gradients(detach_boxes):
    images = _images().contiguous(memory_format=torch.channels_last)
    _, ref_loss, ref_grads = _loss_and_grads(
        _model().to(memory_format=torch.channels_last), images, detach_boxes=detach_boxes
    )
    model = _model(checkpoint_activations=True).to(memory_format=torch.channels_last)
    _, loss, grads = _loss_and_grads(model, images, detach_boxes=detach_boxes)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_has_no_host_sync():
    model = _model().cuda()
    images, target = _images().cuda(), torch.tensor([1, 3, 0, 4]).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(images)
        cls = total_classification(classification_losses(out.logits, target), num_scales=3)
        probs = [true_class_prob(out.logits[f"s{i + 1}"], target) for i in range(3)]
        (cls + ranking_loss(probs)).backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
