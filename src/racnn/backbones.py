"""Backbones: name -> convolutional feature extractor that publishes channels, stride and normalisation.

A backbone knows nothing about RA-CNN. ``build_backbone("vgg19", pretrained=True)`` gives torchvision's VGG-19
conv layers (the paper's network) with ImageNet weights read from the torch hub cache (``TORCH_HOME``), never
downloaded: a missing file raises :class:`WeightsNotFoundError` telling how to provide it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not available offline."""


@dataclass(frozen=True)
class Preprocessing:
    """Input normalisation a backbone expects (data code reads it from the model)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class Backbone(nn.Module):
    """``features``: B x 3 x H x W -> B x channels x H/stride x W/stride (last conv layer)."""

    def __init__(self, features: nn.Sequential, *, channels: int, stride: int, preprocessing: Preprocessing):
        super().__init__()
        self.features = features
        self.channels = channels
        self.stride = stride
        self.preprocessing = preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _tiny() -> nn.Sequential:
    """A 4-layer stride-16 CNN (about 30k parameters) for fast tests; has BatchNorm like the real ones."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64))


def _trunk(model: nn.Module, name: str) -> nn.Sequential:
    """Cut a torchvision classifier down to its last conv layer, as an ``nn.Sequential``."""
    if name.startswith("vgg"):
        # conv5_4 (+ReLU) without the last max-pool: stride 16, 28 x 28 at 448 (the APN sees pool5 via its grid)
        return nn.Sequential(*list(model.features.children())[:-1])
    if hasattr(model, "features") and isinstance(model.features, nn.Module):
        # MobileNet, EfficientNet, DenseNet, ConvNeXt, ...; DenseNet ends on a BatchNorm, so add its ReLU
        layers = (
            list(model.features.children()) if isinstance(model.features, nn.Sequential) else [model.features]
        )
        if name.startswith("densenet"):
            layers.append(nn.ReLU(inplace=False))
        return nn.Sequential(*layers)
    if hasattr(model, "fc") and hasattr(
        model, "avgpool"
    ):  # ResNet, ResNeXt, Wide ResNet, RegNet, GoogLeNet-free
        return nn.Sequential(*[m for n, m in model.named_children() if n not in ("avgpool", "fc", "dropout")])
    raise ValueError(f"backbone {name!r}: cannot find the conv trunk of this torchvision model")


def _hub_path(weights: torchvision.models.WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def cached_weights(name: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights of ``name`` found in the hub cache: ``DEFAULT`` first, then the others (e.g.
    ``IMAGENET1K_V1`` when only that file is there). Never downloads."""
    enum = torchvision.models.get_model_weights(name)
    candidates = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    for w in candidates:
        if _hub_path(w).is_file():
            return w
    raise WeightsNotFoundError(
        f"{_hub_path(enum.DEFAULT)}: ImageNet weights for {name} not found (racnn never downloads); put the file "
        "there (or set TORCH_HOME to a folder holding hub/checkpoints/), pass model.weights_file=FILE, "
        "or train from random init with model.pretrained=false"
    )


def check_weights(name: str, *, pretrained: bool, weights_file: str | None = None) -> None:
    """Fail fast (before any data is read) when the requested weights are not on this machine."""
    if weights_file:
        if not Path(weights_file).is_file():
            raise WeightsNotFoundError(f"{weights_file}: weights file not found")
    elif pretrained:
        if name in _CUSTOM:
            raise WeightsNotFoundError(
                f"backbone {name!r} has no pretrained weights; set model.pretrained=false"
            )
        if name in torchvision.models.list_models(module=torchvision.models):
            cached_weights(name)


def backbone_preprocessing(name: str) -> Preprocessing:
    """Normalisation of a backbone's ImageNet weights (read off torchvision's weights entry; no file needed)."""
    if name in _CUSTOM:
        return Preprocessing()
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return Preprocessing()
    t = weights.transforms()
    return Preprocessing(tuple(t.mean), tuple(t.std))  # type: ignore[arg-type]


def _torchvision(name: str, *, pretrained: bool, weights_file: str | None) -> tuple[nn.Module, Preprocessing]:
    weights = cached_weights(name) if pretrained and not weights_file else None
    model = torchvision.models.get_model(name, weights=weights)
    prep = backbone_preprocessing(name)
    if weights_file:
        _load_weights_file(model, weights_file, f"torchvision's {name}")
    return model, prep


def _load_weights_file(module: nn.Module, weights_file: str, what: str) -> None:
    """Load a local state_dict (optionally wrapped as ``{"state_dict": ...}``) with clear one-line errors."""
    path = Path(weights_file)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__})") from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a state_dict of {what} ({first[:200]})") from e


_CUSTOM: dict[str, Callable[[], nn.Sequential]] = {"tiny": _tiny}
# The paper's networks and the ones our configs use; any other torchvision classification model works too.
KNOWN = ("tiny", "vgg16", "vgg19", "vgg19_bn", "resnet50", "mobilenet_v2")


def list_backbones() -> list[str]:
    """Named backbones: ``tiny`` plus every torchvision classification model."""
    return sorted(set(_CUSTOM) | set(torchvision.models.list_models(module=torchvision.models)))


@torch.no_grad()
def _probe(features: nn.Module) -> tuple[int, int]:
    """Channels and stride of a trunk, read off one small forward pass."""
    was_training = features.training
    features.eval()
    y = features(torch.zeros(1, 3, 64, 64))
    features.train(was_training)
    return int(y.shape[1]), max(1, round(64 / y.shape[-1]))


def build_backbone(name: str, *, pretrained: bool = False, weights_file: str | None = None) -> Backbone:
    """Build one scale's feature extractor; raises ``ValueError`` for an unknown name."""
    if name in _CUSTOM:
        if pretrained and not weights_file:
            raise WeightsNotFoundError(
                f"backbone {name!r} has no pretrained weights; set model.pretrained=false"
            )
        features = _CUSTOM[name]()
        prep = Preprocessing()
        if weights_file:
            _load_weights_file(features, weights_file, name)
    else:
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(
                f"unknown backbone {name!r}; known: tiny and torchvision classifiers such as "
                f"{', '.join(KNOWN[1:])} (see racnn.backbones.list_backbones())"
            )
        model, prep = _torchvision(name, pretrained=pretrained, weights_file=weights_file)
        features = _trunk(model, name)
    channels, stride = _probe(features)
    return Backbone(features, channels=channels, stride=stride, preprocessing=prep)
