"""An embedded fine-grained dataset, drawn by code and deterministic from a seed ("synthetic birds").

Every image shows cluttered, natural-looking background and one object (an ellipse "body" with a round
"head") at a random position and size. Classes combine a coarse attribute that is visible at any resolution
(the body's colour family) with a *fine* one that is not: the pattern inside the small head (stripes of two
orientations, a checkerboard or rings). At the scale-1 resolution the head is a few pixels wide and its
pattern averages out; zoomed in, it is plain. So a model that only looks at the whole image tops out near
``1 / len(PATTERNS)`` of the fine decision, and one that looks closer can solve it: the RA-CNN story.

Ground truth: the object box (``box``) and the head centre as the single part ``head`` (``parts``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from racnn.data.base import AnnotatedImageDataset, Sample
from racnn.data.transforms import PairedTransformFn

COLOURS = {"red": (200, 50, 40), "blue": (40, 80, 210)}
PATTERNS = ("hstripes", "vstripes", "checker", "rings")
SPLIT_SIZES = {"trainval": 1600, "test": 480}


def class_names() -> list[str]:
    return [f"{c}_{p}" for c in COLOURS for p in PATTERNS]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour field plus soft clutter shapes (muted, so the object's colour stays informative)."""
    low = rng.uniform(0.25, 0.75, (4, 4, 3)) * 255
    img = Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(rng.integers(8, 14)):
        x, y = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.05, 0.3, 2) * size
        grey = rng.uniform(0.3, 0.8)
        tint = rng.uniform(0.85, 1.15, 3)
        fill = (*(int(min(255, 255 * grey * t)) for t in tint), int(rng.integers(80, 170)))
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + w, y + h], fill=fill)
        else:
            draw.line([x, y, x + w, y + h], fill=fill, width=int(rng.integers(1, 4)))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def _head_pattern(pattern: str, diameter: int, colour: tuple[int, int, int]) -> Image.Image:
    """The fine detail: a ``diameter``-pixel disc with a 2-3 px period pattern in black and light colour."""
    d = diameter
    yy, xx = np.mgrid[0:d, 0:d].astype(np.float32)
    period = max(2, d // 5)
    if pattern == "hstripes":
        on = (yy // period) % 2 == 0
    elif pattern == "vstripes":
        on = (xx // period) % 2 == 0
    elif pattern == "checker":
        on = ((yy // period) + (xx // period)) % 2 == 0
    else:  # rings
        r = np.hypot(yy - (d - 1) / 2, xx - (d - 1) / 2)
        on = (r // period) % 2 == 0
    light = np.array([min(255, c + 120) for c in colour], np.float32)
    rgb = np.where(on[..., None], light, np.array([15, 15, 15], np.float32))
    return Image.fromarray(rgb.astype(np.uint8))


def render(
    seed: int, index: int, split: str, label: int, size: int = 160
) -> tuple[Image.Image, list[float], list[float]]:
    """Draw one image; returns (image, object box xyxy px, head centre (x, y) px)."""
    rng = np.random.default_rng([seed, {"trainval": 1, "test": 2}[split], index])
    img = _background(rng, size)
    colour = COLOURS[list(COLOURS)[label // len(PATTERNS)]]
    colour = tuple(int(np.clip(c * rng.uniform(0.85, 1.15), 0, 255)) for c in colour)
    pattern = PATTERNS[label % len(PATTERNS)]
    bw, bh = rng.uniform(0.26, 0.40) * size, rng.uniform(0.20, 0.32) * size
    x0, y0 = rng.uniform(0.02 * size, 0.98 * size - bw), rng.uniform(0.02 * size, 0.98 * size - bh)
    draw = ImageDraw.Draw(img)
    draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=colour, outline=(20, 20, 20))
    d = max(8, round(0.075 * size))  # the head: ~12 px at 160, ~5 px at scale 1's 64
    hx = x0 + bw * rng.uniform(0.35, 0.65)
    hy = y0 + bh * rng.uniform(0.35, 0.65)
    head = _head_pattern(pattern, d, colour)
    mask = Image.new("L", (d, d), 0)
    ImageDraw.Draw(mask).ellipse([0, 0, d - 1, d - 1], fill=255)
    img.paste(head, (round(hx - d / 2), round(hy - d / 2)), mask)
    return img, [x0, y0, x0 + bw, y0 + bh], [hx, hy]


class SyntheticBirds(AnnotatedImageDataset):
    """The embedded dataset: ``(root, split, transform)`` like the others; ``root`` is unused (may be None).

    Images are rendered on the fly at ``image_size`` pixels; ``SPLIT_SIZES`` images per official split,
    with "val" carved out of "trainval" as for CUB.
    """

    def __init__(
        self,
        root: object = None,
        split: str = "train",
        transform: PairedTransformFn | None = None,
        *,
        val_fraction: float = 0.1,
        seed: int = 0,
        max_images: int | None = None,
        image_size: int = 160,
    ) -> None:
        super().__init__(None, split, transform, val_fraction=val_fraction, seed=seed, max_images=max_images)
        self.size = image_size
        self.classes = class_names()
        self.part_names = ["head"]
        self.head_parts = [0]
        official = "test" if split == "test" else "trainval"
        n = SPLIT_SIZES[official]
        labels = [i % len(self.classes) for i in range(n)]
        self._official = official
        self._index = self._pick(labels)
        self.samples = [Sample(path=f"synthetic://{official}/{p}", label=labels[p]) for p in self._index]  # type: ignore[arg-type]

    def raw(self, index: int) -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
        """Image ``index`` with its object box (xyxy px) and head part ``[1, 3]`` (x, y, visible) in pixels."""
        label = self.samples[index].label
        image, box, head = render(self.seed, self._index[index], self._official, label, self.size)
        return image, torch.tensor(box), torch.tensor([[head[0], head[1], 1.0]])
