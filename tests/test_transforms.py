"""Paired transforms (image + box + parts) and image loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from racnn.data import DatasetError, build_transform, load_image

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _bright_rect_image(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black image with a white rectangle covering pixels [x1, x2) x [y1, y2)."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 255, 255))
    return image


def _bright_mask(image: torch.Tensor) -> torch.Tensor:
    """[H, W] bool: where the de-normalised image is brighter than 0.5."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (image * std + mean).mean(0) > 0.5


def _check_box_covers_bright(image: torch.Tensor, box: torch.Tensor, margin: float = 2.0) -> None:
    """Every bright pixel lies in the box (+margin) and the box interior (-margin) is bright."""
    size = image.shape[-1]
    x1, y1, x2, y2 = (box * size).tolist()
    bright = _bright_mask(image)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    outer = (xs > x1 - margin) & (xs < x2 + margin) & (ys > y1 - margin) & (ys < y2 + margin)
    inner = (xs > x1 + margin) & (xs < x2 - margin) & (ys > y1 + margin) & (ys < y2 - margin)
    assert not (bright & ~outer).any(), "bright pixels outside the box"
    assert bright[inner].all(), "dark pixels inside the box"


def test_eval_squash_resize_scales_box_and_parts() -> None:
    box = (16, 8, 56, 30)
    image = _bright_rect_image(80, 40, box)
    parts = torch.tensor([[36.0, 19.0, 1.0], [5.0, 5.0, 0.0], [80.0, 40.0, 1.0]])
    t = build_transform(size=32, mean=MEAN, std=STD, train=False)
    out, out_box, out_parts = t(image, torch.tensor(box, dtype=torch.float32), parts)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out_box.shape == (4,) and out_parts.shape == (3, 3)
    torch.testing.assert_close(out_box, torch.tensor([16 / 80, 8 / 40, 56 / 80, 30 / 40]))
    torch.testing.assert_close(out_parts[0], torch.tensor([36 / 80, 19 / 40, 1.0]))
    torch.testing.assert_close(out_parts[1], torch.zeros(3))  # invisible stays (0, 0, 0)
    torch.testing.assert_close(out_parts[2], torch.tensor([1.0, 1.0, 1.0]))  # on the far edge: inside
    _check_box_covers_bright(out, out_box)


def test_normalisation_and_defaults_without_annotations() -> None:
    image = Image.new("RGB", (20, 30), (51, 102, 153))
    out, box, parts = build_transform(size=16, mean=MEAN, std=STD, train=False)(image, None, None)
    expected = (torch.tensor([0.2, 0.4, 0.6]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(box, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert parts.shape == (0, 3)


def test_non_rgb_input_is_converted() -> None:
    out, _, _ = build_transform(size=8, mean=MEAN, std=STD, train=True)(Image.new("L", (10, 12), 9))
    assert out.shape == (3, 8, 8)


def test_train_flip_moves_box_and_parts_together() -> None:
    """Square image + crop_scale_min=1: the crop is the whole image, so only the flip is random."""
    box = (8, 16, 40, 48)
    image = _bright_rect_image(64, 64, box)
    parts = torch.tensor([[24.0, 32.0, 1.0], [8.0, 16.0, 1.0]])  # box centre, box top-left corner
    t = build_transform(size=32, mean=MEAN, std=STD, train=True, crop_scale_min=1.0)
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out, out_box, out_parts = t(image, torch.tensor(box, dtype=torch.float32), parts)
        flipped = bool(out_box[0] > 0.25)  # x1 is 8/64 unflipped, 24/64 flipped
        flips.add(flipped)
        expected = torch.tensor([24.0, 16.0, 56.0, 48.0] if flipped else [8.0, 16.0, 40.0, 48.0]) / 64
        torch.testing.assert_close(out_box, expected)
        _check_box_covers_bright(out, out_box)
        # The centre stays at the box centre and the left corner becomes the right one (x -> W - x).
        centre = torch.stack([(out_box[0] + out_box[2]) / 2, (out_box[1] + out_box[3]) / 2])
        torch.testing.assert_close(out_parts[0, :2], centre)
        corner = out_box[[2, 1]] if flipped else out_box[[0, 1]]
        torch.testing.assert_close(out_parts[1], torch.cat([corner, torch.ones(1)]))
    assert flips == {False, True}


def test_train_random_crops_keep_box_and_parts_consistent() -> None:
    box = (4, 4, 20, 24)  # near the corner: some crops cut it away entirely
    image = _bright_rect_image(96, 96, box)
    parts = torch.tensor([[12.0, 14.0, 1.0], [2.0, 2.0, 1.0], [50.0, 50.0, 0.0]])
    t = build_transform(size=48, mean=MEAN, std=STD, train=True, crop_scale_min=0.1)
    dropped_part = dropped_box = kept_box = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, out_box, out_parts = t(image, torch.tensor(box, dtype=torch.float32), parts)
        assert out.shape == (3, 48, 48)
        assert ((out_box >= 0) & (out_box <= 1)).all()
        if out_box.eq(0).all():
            dropped_box += 1
            assert _bright_mask(out).float().mean() < 0.02
        else:
            kept_box += 1
            assert out_box[2] > out_box[0] and out_box[3] > out_box[1]
            _check_box_covers_bright(out, out_box)
        for row in out_parts:  # visible inside [0, 1], or exactly (0, 0, 0)
            assert row[2] in (0.0, 1.0)
            if row[2] == 0:
                assert row.eq(0).all()
            else:
                assert ((row[:2] >= 0) & (row[:2] <= 1)).all()
        assert out_parts[2].eq(0).all()
        dropped_part += int(out_parts[1, 2] == 0)
        if out_parts[0, 2] == 1 and not out_box.eq(0).all():  # the part inside the box stays inside it
            x, y = out_parts[0, :2]
            assert out_box[0] <= x <= out_box[2] and out_box[1] <= y <= out_box[3]
    assert dropped_part > 0 and dropped_box > 0 and kept_box > 0


def test_build_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="crop_scale_min"):
        build_transform(size=8, mean=MEAN, std=STD, train=True, crop_scale_min=0.0)
    with pytest.raises(ValueError, match="parts"):
        build_transform(size=8, mean=MEAN, std=STD, train=False)(
            Image.new("RGB", (4, 4)), None, torch.zeros(3)
        )


@pytest.mark.parametrize(
    ("mode", "suffix", "colour"),
    [
        ("L", ".jpg", 128),
        ("CMYK", ".jpg", (0, 255, 255, 0)),
        ("RGBA", ".png", (255, 0, 0, 0)),
        ("LA", ".png", (0, 0)),
        ("P", ".png", 0),
        ("I;16", ".png", 1000),
        ("1", ".bmp", 1),
    ],
)
def test_load_image_converts_to_rgb(tmp_path: Path, mode: str, suffix: str, colour: object) -> None:
    path = tmp_path / f"img{suffix}"
    image = Image.new(mode, (10, 6), colour)  # type: ignore[arg-type]
    if mode == "P":
        image.putpalette([200, 10, 10] * 256)
        image.info["transparency"] = 0
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (10, 6)
    if mode in ("RGBA", "LA", "P"):  # fully transparent pixels end up white
        assert loaded.getpixel((0, 0)) == (255, 255, 255)
    if mode == "CMYK":  # no cyan, full magenta and yellow: red
        r, g, b = loaded.getpixel((0, 0))  # type: ignore[misc]
        assert r > 200 and g < 40 and b < 40


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.jpg: cannot read image"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"junk\.jpg: cannot read image"):
        load_image(tmp_path / "junk.jpg")
    noise = Image.effect_noise((64, 64), 64).convert("RGB")
    noise.save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cut\.jpg: cannot read image \(.*truncated"):
        load_image(tmp_path / "cut.jpg")
