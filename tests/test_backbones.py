"""Backbones: registry, channels/stride, offline pretrained weights and local weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from racnn.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    WeightsNotFoundError,
    build_backbone,
    list_backbones,
)

SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared/weights"
MOBILENET_FILE = SHARED_WEIGHTS / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    # torch.hub.get_dir() reads TORCH_HOME at call time (unless torch.hub.set_dir was called)
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home


@pytest.fixture
def shared_torch_home(monkeypatch):
    if not MOBILENET_FILE.is_file():
        pytest.skip(f"{MOBILENET_FILE} not present")
    monkeypatch.setenv("TORCH_HOME", str(SHARED_WEIGHTS))
    assert Path(torch.hub.get_dir()) == SHARED_WEIGHTS / "hub"
    return SHARED_WEIGHTS


@pytest.mark.parametrize(("name", "channels", "stride"), [("tiny", 64, 16), ("mobilenet_v2", 1280, 32)])
def test_channels_and_stride_match_a_real_forward(name, channels, stride):
    torch.manual_seed(0)
    bb = build_backbone(name)
    assert isinstance(bb, Backbone)
    assert (bb.channels, bb.stride) == (channels, stride)
    bb.eval()
    with torch.no_grad():
        y = bb(torch.randn(1, 3, 3 * stride, 2 * stride))  # non-square, not the probe's 64 x 64
    assert y.shape == (1, bb.channels, 3, 2)
    assert bb.preprocessing.mean == IMAGENET_MEAN and bb.preprocessing.std == IMAGENET_STD


def test_build_backbone_leaves_train_mode_and_batchnorm_stats_alone():
    bb = build_backbone("tiny")
    assert bb.training
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(int(m.num_batches_tracked) == 0 for m in bns)


def test_tiny_is_random_and_has_batchnorm():
    torch.manual_seed(0)
    a = build_backbone("tiny")
    torch.manual_seed(1)
    b = build_backbone("tiny")
    assert not torch.equal(a.features[0].weight, b.features[0].weight)
    assert sum(p.numel() for p in a.parameters()) < 100_000


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'") as info:
        build_backbone("resnet9000")
    msg = str(info.value)
    for known in ("tiny", "vgg19", "resnet50", "mobilenet_v2"):
        assert known in msg


def test_list_backbones():
    names = list_backbones()
    for n in ("tiny", "vgg19", "vgg19_bn", "vgg16", "resnet50", "mobilenet_v2", "resnet18", "vgg11"):
        assert n in names
    assert names == sorted(names) and len(names) == len(set(names))
    assert "fasterrcnn_resnet50_fpn" not in names  # classification models only


def test_tiny_pretrained_without_file_raises():
    with pytest.raises(WeightsNotFoundError, match=r"model\.pretrained=false"):
        build_backbone("tiny", pretrained=True)


def test_pretrained_weights_missing_from_hub_cache(empty_torch_home):
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("mobilenet_v2", pretrained=True)
    msg = str(info.value)
    # names the file it looked for: <TORCH_HOME>/hub/checkpoints/<file of one of torchvision's weights>
    folder = empty_torch_home / "hub" / "checkpoints"
    files = [Path(w.url).name for w in torchvision.models.get_model_weights("mobilenet_v2")]
    assert any(str(folder / f) in msg for f in files), msg
    assert "TORCH_HOME" in msg and "model.pretrained=false" in msg
    assert isinstance(info.value, FileNotFoundError)
    assert not any(empty_torch_home.rglob("*.pth"))  # nothing was downloaded


def test_pretrained_mobilenet_v2_from_the_shared_cache(shared_torch_home):
    bb = build_backbone("mobilenet_v2", pretrained=True)
    ref = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    torch.testing.assert_close(bb.features[0][0].weight, ref.features[0][0].weight, atol=0, rtol=0)
    torch.testing.assert_close(bb.features[18][0].weight, ref.features[18][0].weight, atol=0, rtol=0)
    assert bb.preprocessing.mean == pytest.approx(IMAGENET_MEAN)
    assert bb.preprocessing.std == pytest.approx(IMAGENET_STD)
    # not just any weights: a random model differs
    random_init = torchvision.models.mobilenet_v2(weights=None)
    assert not torch.equal(random_init.features[0][0].weight, ref.features[0][0].weight)


@pytest.mark.parametrize(("wrapped", "pretrained"), [(False, True), (True, False)])
def test_weights_file_is_loaded(tmp_path, empty_torch_home, wrapped, pretrained):
    torch.manual_seed(3)
    src = torchvision.models.mobilenet_v2(weights=None)
    src.features[18][1].running_var.uniform_(0.5, 2.0)  # not the default ones
    path = tmp_path / "mnv2.pth"
    state = src.state_dict()
    torch.save({"state_dict": state} if wrapped else state, path)
    # the (empty) hub cache is never consulted when a weights file is given
    bb = build_backbone("mobilenet_v2", pretrained=pretrained, weights_file=str(path))
    torch.testing.assert_close(bb.features[0][0].weight, src.features[0][0].weight, atol=0, rtol=0)
    torch.testing.assert_close(
        bb.features[18][1].running_var, src.features[18][1].running_var, atol=0, rtol=0
    )


def test_weights_file_of_another_architecture(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="not a state_dict") as info:
        build_backbone("mobilenet_v2", weights_file=str(path))
    assert str(path) in str(info.value)


def test_missing_weights_file(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("mobilenet_v2", weights_file=str(path))
    assert str(path) in str(info.value)


def test_tiny_weights_file(tmp_path):
    torch.manual_seed(4)
    src = build_backbone("tiny")
    path = tmp_path / "tiny.pth"
    torch.save(src.features.state_dict(), path)
    torch.manual_seed(5)
    bb = build_backbone("tiny", pretrained=True, weights_file=str(path))
    torch.testing.assert_close(bb.features[0].weight, src.features[0].weight, atol=0, rtol=0)


def test_tiny_weights_file_of_another_architecture(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="not a state_dict") as info:
        build_backbone("tiny", weights_file=str(path))
    assert str(path) in str(info.value)
