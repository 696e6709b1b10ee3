"""Image transforms that carry the object box and part key points along with the image.

Built on :mod:`torchvision.transforms.v2` with :class:`~torchvision.tv_tensors.BoundingBoxes` and
:class:`~torchvision.tv_tensors.KeyPoints`. Coordinates are continuous pixel coordinates (pixel ``i``
spans ``[i, i + 1)``), and the outputs are normalised by the output side, so they lie in ``[0, 1]``.

Two torchvision behaviours are handled here:

* ``horizontal_flip`` maps key points to ``x -> W - 1 - x`` (pixel-index convention) but boxes to
  ``x -> W - x`` and resizes both by plain scaling; the flip below uses ``W - x`` for key points so
  that points and boxes stay consistent.
* key points are never clamped or dropped: a point cropped out of the image keeps coordinates outside
  the canvas. :meth:`PairedTransform.__call__` marks such points invisible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from racnn.data.io import to_rgb

__all__ = ["ImageTransform", "PairedTransform", "PairedTransformFn", "build_transform", "eval_transform"]

# ImageNet's normalisation: what the torchvision backbones expect (racnn.backbones.Preprocessing's default)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Anything that maps (image, box xyxy pixels | None, parts [P, 3] | None) -> (image, box, parts).
PairedTransformFn = Callable[[Image.Image, "Tensor | None", "Tensor | None"], tuple[Tensor, Tensor, Tensor]]


class _HorizontalFlip(v2.RandomHorizontalFlip):
    """``RandomHorizontalFlip`` that flips key points like boxes (``x -> W - x``)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.KeyPoints):
            flipped = inpt.as_subclass(Tensor).clone()
            flipped[..., 0] = inpt.canvas_size[1] - flipped[..., 0]
            return tv_tensors.wrap(flipped, like=inpt)
        return super().transform(inpt, params)


class PairedTransform:
    """Transform an RGB PIL image together with its box and part key points.

    ``__call__(image, box, parts)`` returns:

    * ``image``: ``[3, S, S]`` float32, normalised with ``mean``/``std``;
    * ``box``: ``[4]`` xyxy in ``[0, 1]`` of the output image, clamped to it. A box cropped away
      entirely becomes ``[0, 0, 0, 0]`` (zero area); ``box=None`` gives ``[0, 0, 1, 1]``;
    * ``parts``: ``[P, 3]`` rows ``(x, y, visible)`` with x, y in ``[0, 1]`` and visible in {0, 1}.
      Invisible parts, and parts that fall outside the output image, are ``(0, 0, 0)``;
      ``parts=None`` gives shape ``[0, 3]``.
    """

    def __init__(
        self,
        *,
        size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        train: bool,
        crop_scale_min: float = 0.6,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0.0 < crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train = bool(train)
        self.crop_scale_min = float(crop_scale_min)
        geometry: list[v2.Transform]
        if self.train:
            geometry = [
                v2.RandomResizedCrop(self.size, scale=(self.crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3)),
                _HorizontalFlip(p=0.5),
            ]
        else:
            # Squash the whole image (no centre crop): box coordinates map back by plain scaling.
            geometry = [v2.Resize((self.size, self.size))]
        self.pipeline = v2.Compose(
            [
                v2.ToImage(),  # uint8 [3, H, W]; geometric ops are fastest on uint8 tensors
                *geometry,
                v2.ClampBoundingBoxes(),
                v2.ToDtype(torch.float32, scale=True),  # images only
                v2.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )

    def __call__(
        self, image: Image.Image, box: Tensor | None = None, parts: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        image = to_rgb(image)
        width, height = image.size
        canvas = (height, width)
        inputs: list[Any] = [image]
        if box is not None:
            box = torch.as_tensor(box, dtype=torch.float32).reshape(1, 4)
            inputs.append(tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=canvas))
        if parts is not None:
            parts = torch.as_tensor(parts, dtype=torch.float32)
            if parts.ndim != 2 or parts.shape[1] != 3:
                raise ValueError(f"parts must have shape [P, 3], got {tuple(parts.shape)}")
            inputs.append(tv_tensors.KeyPoints(parts[:, :2], canvas_size=canvas))

        outputs = self.pipeline(tuple(inputs))  # a tuple in, a tuple out (even with the image alone)
        out_image: Tensor = outputs[0].as_subclass(Tensor)  # [3, S, S]
        out_h, out_w = out_image.shape[-2:]
        scale = torch.tensor([out_w, out_h], dtype=torch.float32)

        if box is None:
            out_box = torch.tensor([0.0, 0.0, 1.0, 1.0])
        else:
            xyxy = outputs[1].as_subclass(Tensor).reshape(4) / scale.repeat(2)
            out_box = xyxy.clamp(0.0, 1.0)
            if out_box[2] <= out_box[0] or out_box[3] <= out_box[1]:
                out_box = torch.zeros(4)  # cropped away entirely

        if parts is None:
            out_parts = torch.zeros(0, 3)
        else:
            xy = outputs[-1].as_subclass(Tensor).reshape(-1, 2) / scale  # [P, 2]
            inside = ((xy >= 0.0) & (xy <= 1.0)).all(dim=1)
            visible = (parts[:, 2] > 0) & inside  # [P]
            rows = torch.cat([xy, torch.ones(len(xy), 1)], dim=1)  # [P, 3]
            out_parts = torch.where(visible[:, None], rows, torch.zeros_like(rows))
        return out_image, out_box, out_parts

    def __repr__(self) -> str:
        return (
            f"PairedTransform(size={self.size}, train={self.train}, crop_scale_min={self.crop_scale_min}, "
            f"mean={self.mean}, std={self.std})"
        )


def build_transform(
    *,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    train: bool,
    crop_scale_min: float = 0.6,
) -> PairedTransform:
    """Eval: squash-resize to ``size x size``. Train: RandomResizedCrop(size, scale=(crop_scale_min, 1),
    ratio=(3/4, 4/3)) + horizontal flip. Both then convert to float32 and normalise with mean/std."""
    return PairedTransform(size=size, mean=mean, std=std, train=train, crop_scale_min=crop_scale_min)


class ImageTransform:
    """One image (PIL, any mode) -> the model's input, ``3 x S x S`` float32: the evaluation branch of
    :class:`PairedTransform` without box or parts (what ``model.transforms()`` returns)."""

    def __init__(self, paired: PairedTransform) -> None:
        self.paired = paired

    def __call__(self, image: Image.Image) -> Tensor:
        return self.paired(image)[0]

    def __repr__(self) -> str:
        return f"ImageTransform({self.paired!r})"


def eval_transform(
    size: int, *, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> ImageTransform:
    """The evaluation preprocessing of a lone image: squash-resize to ``size``, normalise with mean/std."""
    return ImageTransform(build_transform(size=size, mean=mean, std=std, train=False))
