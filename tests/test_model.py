"""RA-CNN model: outputs, parameter sharing, gradient flow, crop wiring, checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import racnn.model as model_module
from racnn.attention import compose_boxes, crop_zoom
from racnn.backbones import IMAGENET_MEAN, IMAGENET_STD
from racnn.config import ConfigError, ModelConfig
from racnn.losses import classification_losses, ranking_loss, total_classification, true_class_prob
from racnn.model import build_model, create_model, fusion_keys, scale_keys

NUM_CLASSES = 5


def _cfg(**kw) -> ModelConfig:
    base = {"backbone": "tiny", "pretrained": False, "input_size": 32, "apn_grid": 2, "apn_hidden": 16}
    base.update(kw)
    return ModelConfig(**base)


def _model(seed: int = 0, checkpoint_activations: bool = False, **kw):
    torch.manual_seed(seed)
    model = build_model(_cfg(**kw), num_classes=NUM_CLASSES)
    model.checkpoint_activations = checkpoint_activations
    return model


def _images(b: int = 2, h: int = 32, w: int | None = None, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w or h, generator=gen)


def _full_loss(model, out, target, margin: float = 1.0) -> torch.Tensor:
    """All cross-entropies + ranking loss (margin 1: every pair active, so it reaches every scale)."""
    n = model.cfg.num_scales
    cls = total_classification(classification_losses(out.trained_logits, target), num_scales=n)
    probs = [true_class_prob(out.logits[k], target) for k in model.scale_keys]
    return cls + ranking_loss(probs, margin=margin)


# ------------------------------------------------------------------------------------------- outputs


def test_output_keys():
    assert (scale_keys(1), fusion_keys(1)) == (["s1"], [])
    assert (scale_keys(2), fusion_keys(2)) == (["s1", "s2"], ["s12"])
    assert (scale_keys(3), fusion_keys(3)) == (["s1", "s2", "s3"], ["s12", "s123"])
    keys = scale_keys(9) + fusion_keys(9)
    assert len(set(keys)) == 17 and keys[-1] == "s123456789"
    model = _model()
    assert (model.scale_keys, model.fusion_keys) == (["s1", "s2", "s3"], ["s12", "s123"])
    assert model.keys == model.scale_keys + model.fusion_keys


def test_every_accepted_number_of_scales_works_and_ten_is_refused_in_one_line():
    """Nine scales: nine distinct scale keys and eight fused ones, every one an output; the fused keys spell
    their scales by digit, so a tenth scale (whose ``s10`` would read as scales 1 and 0) is refused."""
    model = _model(num_scales=9, box_min_side=0.9)  # large boxes: 9 nested crops stay > 1 px
    out = model(_images(1))
    assert list(out.logits) == model.keys and len(model.keys) == 17
    with pytest.raises(ConfigError, match=r"num_scales must be in 1\.\.9") as info:
        create_model("tiny", NUM_CLASSES, num_scales=10)
    assert "\n" not in str(info.value)


def test_three_scale_outputs():
    model = _model()
    b = 3
    out = model(_images(b))
    assert list(out.logits) == ["s1", "s2", "s3", "s12", "s123"]
    for v in out.logits.values():
        assert v.shape == (b, NUM_CLASSES) and torch.isfinite(v).all()
    assert len(out.boxes) == 2 and all(bx.shape == (b, 3) for bx in out.boxes)
    assert len(out.crops) == 2 and all(c.shape == (b, 3, 32, 32) for c in out.crops)
    assert out.maps == []
    lo, hi = model.cfg.box_min_side, model.cfg.box_max_side
    for bx in out.boxes:
        assert ((bx[:, :2] - bx[:, 2:] >= -1e-6) & (bx[:, :2] + bx[:, 2:] <= 1 + 1e-6)).all()
        assert ((2 * bx[:, 2] >= lo - 1e-6) & (2 * bx[:, 2] <= hi + 1e-6)).all()
    # the fused heads see the concatenated pooled features of the first n scales
    assert model.fusions[0].in_features == 2 * model.backbones[0].channels
    assert model.fusions[1].in_features == 3 * model.backbones[0].channels


def test_return_maps():
    model = _model()
    out = model(_images(2), return_maps=True)
    assert len(out.maps) == 3 and all(m.shape == (2, 64, 2, 2) for m in out.maps)


@pytest.mark.parametrize(("num_scales", "keys"), [(2, ["s1", "s2", "s12"]), (1, ["s1"])])
def test_fewer_scales(num_scales, keys):
    model = _model(num_scales=num_scales)
    out = model(_images(2))
    assert list(out.logits) == keys
    assert len(out.boxes) == len(out.crops) == num_scales - 1
    assert len(model.backbones) == len(model.heads) == num_scales and len(model.apns) == num_scales - 1


# ------------------------------------------------------------------------------------------ parameters


def test_scales_have_separate_parameters_with_identical_initial_backbones():
    model = _model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))
    for t in list(model.parameters()) + list(model.buffers()):
        assert t.numel() > 0
    first = model.backbones[0].state_dict()
    for bb in model.backbones[1:]:
        other = bb.state_dict()
        assert other.keys() == first.keys()
        for k in first:
            assert torch.equal(other[k], first[k]), k
            assert other[k].data_ptr() != first[k].data_ptr(), k
    # changing one scale leaves the others alone
    with torch.no_grad():
        model.backbones[0].features[0].weight.add_(1.0)
    assert not torch.equal(model.backbones[0].features[0].weight, model.backbones[1].features[0].weight)


def test_parameter_groups_cover_every_parameter_exactly_once():
    model = _model()
    groups = model.parameter_groups()
    assert set(groups) == {"backbone", "head", "apn"}
    assert all(groups.values())
    grouped = [id(p) for g in groups.values() for p in g]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups["apn"]} == {id(p) for p in model.apns.parameters()}
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.backbones.parameters()}


def test_preprocessing():
    prep = _model().preprocessing
    assert isinstance(prep.mean, tuple) and isinstance(prep.std, tuple)
    assert len(prep.mean) == 3 and len(prep.std) == 3
    assert all(isinstance(v, float) for v in prep.mean + prep.std)
    assert prep.mean == pytest.approx(IMAGENET_MEAN) and prep.std == pytest.approx(IMAGENET_STD)


# -------------------------------------------------------------------------------------------- gradients

_BACKBONES = [
    # mobilenet_v2 needs 64: at 32 its last blocks are 1 x 1, where the BN after a 3 x 3 depthwise conv
    # removes any uniform shift, so the biases before it get an exactly zero gradient
    pytest.param("tiny", 3, 32, id="tiny"),
    pytest.param("mobilenet_v2", 2, 64, id="mobilenet_v2", marks=pytest.mark.slow),
    pytest.param("resnet18", 2, 32, id="resnet18", marks=pytest.mark.slow),
    pytest.param("vgg11", 2, 32, id="vgg11", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("backbone", "num_scales", "size"), _BACKBONES)
def test_every_parameter_gets_a_finite_nonzero_gradient(backbone, num_scales, size):
    model = _model(backbone=backbone, num_scales=num_scales, input_size=size)
    model.train()
    target = torch.tensor([1, 3])
    out = model(_images(2, size))
    loss = _full_loss(model, out, target)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero


def test_detach_boxes_freezes_the_apns_only():
    model = _model()
    model.train()
    target = torch.tensor([0, 4])
    out = model(_images(2), detach_boxes=True)
    assert all(not bx.requires_grad for bx in out.boxes)
    _full_loss(model, out, target).backward()
    for n, p in model.apns.named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, n
    for s, bb in enumerate(model.backbones):
        for n, p in bb.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (s, n)
    # same boxes as without detaching
    model.eval()
    with torch.no_grad():
        a = model(_images(2), detach_boxes=True).boxes
        b = model(_images(2)).boxes
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


# ----------------------------------------------------------------------------------------- crop wiring


def test_crop_from_previous_zooms_the_previous_scale():
    model = _model()
    model.eval()
    images = _images(2)
    with torch.no_grad():
        out = model(images)
    k = model.cfg.mask_k
    torch.testing.assert_close(out.crops[0], crop_zoom(images, out.boxes[0], 32, k))
    torch.testing.assert_close(out.crops[1], crop_zoom(out.crops[0], out.boxes[1], 32, k))


def test_crop_from_source_uses_the_big_image():
    model = _model(crop_from="source")
    model.eval()
    images = _images(2, 48)  # bigger than input_size
    with torch.no_grad():
        out = model(images)
    k = model.cfg.mask_k
    assert all(c.shape == (2, 3, 32, 32) for c in out.crops)
    torch.testing.assert_close(out.crops[0], crop_zoom(images, out.boxes[0], 32, k))
    absolute = compose_boxes(out.boxes[0], out.boxes[1])
    torch.testing.assert_close(out.crops[1], crop_zoom(images, absolute, 32, k))
    # and differs from zooming the (downsampled) previous scale
    assert not torch.allclose(out.crops[1], crop_zoom(out.crops[0], out.boxes[1], 32, k), atol=1e-3)


def test_input_of_another_size_is_resized():
    model = _model()
    model.eval()
    images = _images(2, 48, 40)
    resized = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        out = model(images)
        ref = model(resized)
    assert all(c.shape == (2, 3, 32, 32) for c in out.crops)
    for key in ref.logits:
        torch.testing.assert_close(out.logits[key], ref.logits[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.crops[0], ref.crops[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("crop_from", ["previous", "source"])
def test_zoom_size_gives_the_finer_scales_their_own_input_side(crop_from):
    """Paper Sec. 4.2: scale 1 at 448 px, attended regions zoomed to 224 px (here 48 then 32)."""
    model = _model(input_size=48, zoom_size=32, crop_from=crop_from)
    assert model.scale_sizes == [48, 32, 32]
    model.eval()
    images = _images(2, 48)
    with torch.no_grad():
        out = model(images)
    assert all(c.shape == (2, 3, 32, 32) for c in out.crops)
    k = model.cfg.mask_k
    torch.testing.assert_close(out.crops[0], crop_zoom(images, out.boxes[0], 32, k))
    second = crop_zoom(out.crops[0], out.boxes[1], 32, k)
    if crop_from == "source":
        second = crop_zoom(images, compose_boxes(out.boxes[0], out.boxes[1]), 32, k)
    torch.testing.assert_close(out.crops[1], second)
    # every parameter still learns, and the gradient reaches the APNs through the smaller crops
    model.train()
    _full_loss(model, model(images), torch.tensor([1, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert _model(input_size=48).scale_sizes == [48, 48, 48]  # default: one side for every scale


# ------------------------------------------------------------------------------------------ checkpointing


def _loss_and_grads(model, images, target):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = _full_loss(model, model(images), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpoint_activations_gives_the_same_loss_and_gradients(monkeypatch):
    calls = []
    original = model_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counting)
    images, target = _images(2), torch.tensor([2, 0])
    plain = _model(seed=3)
    ckpt = _model(seed=3, checkpoint_activations=True)
    loss_a, grads_a = _loss_and_grads(plain, images, target)
    assert not calls
    loss_b, grads_b = _loss_and_grads(ckpt, images, target)
    assert len(calls) == 3 * 4  # four segments per scale: the flag is honoured
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-5, msg=n)
    # eval / no-grad forwards never checkpoint
    ckpt.eval()
    with torch.no_grad():
        ckpt(images)
    assert len(calls) == 3 * 4


def test_checkpoint_activations_updates_batchnorm_stats_once():
    """The recomputation in backward must not update BatchNorm running statistics a second time."""
    images, target = _images(2), torch.tensor([2, 0])
    plain = _model(seed=3)
    ckpt = _model(seed=3, checkpoint_activations=True)
    _loss_and_grads(plain, images, target)
    _loss_and_grads(ckpt, images, target)
    bufs_a, bufs_b = dict(plain.named_buffers()), dict(ckpt.named_buffers())
    for n in bufs_a:
        torch.testing.assert_close(bufs_a[n], bufs_b[n], atol=1e-6, rtol=1e-6, msg=n)


def test_build_model_config_is_kept():
    cfg = _cfg(num_scales=2, mask_k=5.0)
    model = build_model(cfg, num_classes=7)
    assert model.cfg == cfg and model.num_classes == 7 and model.input_size == 32
    assert dataclasses.asdict(model.cfg)["mask_k"] == 5.0
    assert model.heads[0].out_features == 7


def test_detach_crops_keeps_each_apn_on_its_own_box() -> None:
    """APN initialisation: a loss on the scale-2 box must not reach APN 1 (through the crop it zoomed)."""
    model = _model(seed=5)
    out = model(_images(2), detach_crops=True)
    out.boxes[1].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.apns[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.apns[1].parameters())
    model.zero_grad(set_to_none=True)
    model(_images(2)).boxes[1].sum().backward()  # without it, APN 1 does get a gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.apns[0].parameters())
