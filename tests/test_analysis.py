"""Derivative maps (racnn.analysis) and ``racnn analyze derivative-map``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from racnn.analysis import (
    derivative_map,
    describe_update,
    display_map,
    model_derivative_map,
    scale2_loss,
)
from racnn.checkpoint import model_record, save_checkpoint
from racnn.cli import main
from racnn.cli_analyze import parse_box
from racnn.config import Config, ModelConfig, apply_overrides
from racnn.model import RACNN, build_model

TINY = {"backbone": "tiny", "pretrained": False, "input_size": 32, "apn_grid": 2, "apn_hidden": 8}


def tiny_model(**kw: object) -> RACNN:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **kw}), num_classes=4).eval()


def brightness_loss(crop: torch.Tensor) -> torch.Tensor:
    """A loss that only depends on the crop's mean brightness: lower when brighter."""
    return -crop.mean()


def ramp(size: int = 64, axis: int = -1) -> torch.Tensor:
    """3 x size x size, brightness growing linearly to the right (axis -1) or downwards (axis -2)."""
    r = torch.linspace(0, 1, size)
    img = r[None, :].expand(size, size) if axis == -1 else r[:, None].expand(size, size)
    return img[None].expand(3, size, size).clone()


def test_update_moves_the_box_towards_the_bright_side() -> None:
    box = torch.tensor([0.5, 0.5, 0.2])
    right = derivative_map(ramp(axis=-1), box, brightness_loss, out_size=16)
    assert right.update[0] > 0  # tx: right, where the image is brighter
    assert abs(float(right.update[1])) < 1e-3 * abs(float(right.update[0]))  # nothing to gain vertically
    down = derivative_map(ramp(axis=-2), box, brightness_loss, out_size=16)
    assert down.update[1] > 0 and abs(float(down.update[0])) < 1e-3 * abs(float(down.update[1]))
    flipped = derivative_map(ramp(axis=-1).flip(-1), box, brightness_loss, out_size=16)
    assert flipped.update[0] < 0
    assert "(right)" in describe_update(right) and "(left)" in describe_update(flipped)


def test_update_shrinks_onto_a_bright_centre_and_grows_around_a_dark_one() -> None:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    blob = torch.exp(-(xx**2 + yy**2) / 0.1)[None].expand(3, 64, 64)
    box = torch.tensor([0.5, 0.5, 0.3])
    assert derivative_map(blob, box, brightness_loss, out_size=16).update[2] < 0  # shrink onto the light
    assert derivative_map(1 - blob, box, brightness_loss, out_size=16).update[2] > 0  # grow out of the dark


def test_derivative_map_shapes_and_values() -> None:
    d = derivative_map(ramp(40), torch.tensor([0.4, 0.6, 0.25]), brightness_loss, out_size=12)
    assert d.saliency.shape == (40, 40) and d.crop.shape == (3, 12, 12) and d.grad_box.shape == (3,)
    assert torch.isfinite(d.saliency).all() and (d.saliency <= 0).all()
    # the crop only reads pixels inside the box: the map is zero far outside it
    assert d.saliency[:, 35:].abs().max() == 0 and d.saliency[5:35, 8:25].abs().max() > 0
    shown = display_map(d.saliency)
    assert shown.shape == (40, 40) and (shown <= 0).all() and shown.min() >= d.saliency.min()


@pytest.mark.parametrize("kind", ["ce", "rank"])
def test_model_derivative_map_on_a_tiny_model(kind: str) -> None:
    model = tiny_model()
    image = torch.randn(3, 32, 32)
    d = model_derivative_map(model, image, target=1, kind=kind)
    assert d.saliency.shape == (32, 32) and d.crop.shape == (3, 32, 32)
    assert torch.isfinite(d.saliency).all() and torch.isfinite(d.grad_box).all()
    with torch.no_grad():
        apn_box = model(image[None]).boxes[0][0]
    torch.testing.assert_close(d.box, apn_box)  # the default box is the scale-1 attention
    if kind == "ce":
        assert d.loss > 0 and d.saliency.abs().sum() > 0 and d.grad_box.abs().sum() > 0


def test_crop_from_source_differentiates_the_full_resolution_image() -> None:
    model = tiny_model(crop_from="source")
    image = torch.randn(3, 64, 64)
    source, _ = scale2_loss(model, image, 0)
    assert source.shape == (3, 64, 64)
    d = model_derivative_map(model, image, 0, box=torch.tensor([0.5, 0.5, 0.3]))
    assert d.saliency.shape == (64, 64)
    assert scale2_loss(tiny_model(), image, 0)[0].shape == (3, 32, 32)  # previous: the scale-1 input
    with pytest.raises(ValueError, match="loss kind"):
        scale2_loss(model, image, 0, kind="nope")


def test_parse_box() -> None:
    assert parse_box("0.5,0.4,0.25") == (0.5, 0.4, 0.25)
    for bad in ("0.5,0.5", "a,b,c", "0.1,0.5,0.3", "0.5,0.5,0"):
        with pytest.raises(ValueError, match="--box"):
            parse_box(bad)


def _checkpoint(tmp_path: Path) -> Path:
    cfg = apply_overrides(
        Config(), [f"model.{k}={str(v).lower()}" for k, v in TINY.items()] + ["data.image_size=32"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3, pretrained=False)
    path = tmp_path / "best.pt"
    save_checkpoint(model_record(model, cfg, ["001.A", "002.B", "003.C"]), path)
    return path


def test_cli_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _checkpoint(tmp_path)
    image = tmp_path / "bird.jpg"
    Image.new("RGB", (48, 40), (120, 80, 40)).save(image)
    out = tmp_path / "dmap.png"
    assert main(["analyze", "derivative-map", "--checkpoint", str(ckpt), str(image), "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "update tx" in printed and "wrote" in printed
    args = ["analyze", "derivative-map", "--checkpoint", str(ckpt), str(image), str(image)]
    args += ["--out", str(out), "--box", "0.5,0.5,0.3", "--label", "B", "--loss", "rank"]
    assert main(args) == 0
    assert "box (0.500, 0.500, 0.300)" in capsys.readouterr().out
    assert main([*args[:-6], "--out", str(out), "--box", "0.9,0.5,0.3"]) == 1  # box outside the image
