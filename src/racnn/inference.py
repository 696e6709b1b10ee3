"""Predictions: top-k per scale and fused, and where each scale looked, in the image's pixels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .attention import box_to_xyxy
from .data import load_image
from .early_exit import (
    EXIT_KEY,
    answer_key,
    check_exit_confidence,
    model_stages,
    outputs_run,
    staged_forward,
)
from .evaluation import check_tta, flip_tta_logits
from .model import RACNN
from .runtime import place_batch, place_model

ImageLike = str | Path | Image.Image | torch.Tensor


def _as_inputs(
    model: RACNN, images: Sequence[ImageLike]
) -> tuple[torch.Tensor, list[str], list[tuple[int, int]]]:
    """The model's input batch for ``images``, their names and their sizes (width, height) in pixels. Paths
    are read, PIL images converted, both by ``model.transforms()``; a tensor is taken as already preprocessed
    (3 x S x S, normalised)."""
    transform = model.transforms()
    batch, names, sizes = [], [], []
    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"image {i}: a tensor must be 3 x H x W (preprocessed), got {tuple(image.shape)}"
                )
            batch.append(image.float())
            names.append(f"tensor {i}")
            sizes.append((int(image.shape[2]), int(image.shape[1])))
            continue
        if isinstance(image, Image.Image):
            names.append(getattr(image, "filename", "") or f"image {i}")
        else:
            names.append(str(image))
            image = load_image(image, upright=True)  # a photo as a viewer shows it (EXIF orientation)
        sizes.append(image.size)
        batch.append(transform(image))
    return torch.stack(batch), names, sizes


@torch.no_grad()
def predict(
    model: RACNN,
    images: ImageLike | Iterable[ImageLike],
    *,
    topk: int = 5,
    device: torch.device | str | None = None,
    batch_size: int = 16,
    tta: str | None = None,
    exit_confidence: float | None = None,
) -> list[dict[str, Any]]:
    """Classify ``images`` (file paths, PIL images, or preprocessed 3 x S x S tensors; one or a list). Files
    are turned upright by their EXIF orientation, as a viewer shows them. ``tta="flip"``: probabilities are
    the mean of the image's and its mirror image's (:func:`forward_probs`).

    One record per image (:func:`records`): ``{"image", "width", "height", "tta", "top": {key: [{"class",
    "index", "prob"}, ...]}, "boxes": [{"scale", "cx", "cy", "side", "xyxy_px"}]}``. ``top`` has every scale
    (``s1``..) and the fused outputs (``s12``, ``s123``, by the model's fusion); box ``s`` is where scale ``s``
    looked, i.e. the input of scale ``s + 1``, relative to the image (``cx``, ``cy``, ``side`` in 0..1) and in
    its pixels. ``tta`` is the test-time augmentation the record's probabilities had (None or ``"flip"``).
    ``scales_run`` is how many scales ran and ``answered_by`` the output that answered (the fusion of the
    scales run: ``s123`` for 3). ``exit_confidence``: early exit (:mod:`racnn.early_exit`): an image stops
    after the first scale whose fused prediction's top probability reaches it, and its record holds the
    outputs and boxes it ran. ``model``: a :class:`RACNN` or an onnxruntime model
    (``racnn.load_model(path, backend="onnxruntime")``). Class names come from ``model.classes`` (indices
    when the model has none)."""
    check_topk(topk)
    check_tta(tta)
    check_exit_confidence(exit_confidence, tta)
    if isinstance(images, (str, Path, Image.Image)) or (
        isinstance(images, torch.Tensor) and images.ndim == 3
    ):
        images = [images]
    items = list(images)
    out: list[dict[str, Any]] = []
    with evaluating(model, device) as device:
        for start in range(0, len(items), batch_size):
            x, names, sizes = _as_inputs(model, items[start : start + batch_size])
            probs, views = forward_probs(
                model, place_batch(x, device), tta=tta, exit_confidence=exit_confidence
            )
            out += records(model, probs, views, names, sizes, topk=topk, tta=tta)
    return out


def check_topk(topk: int) -> None:
    """At least one class per output (ValueError otherwise): a record without a class has no prediction."""
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")


@contextlib.contextmanager
def evaluating(model: RACNN, device: torch.device | str | None) -> Iterator[torch.device]:
    """``model`` in eval mode on ``device`` (default: where its parameters are) inside; its training mode as
    it was after (a model in training stays in training mode). Yields the device."""
    if device is None:  # where the model is: its parameters', or an onnxruntime model's own (the CPU)
        device = model.device if hasattr(model, "device") else next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    place_model(model.eval(), device)
    try:
        yield device
    finally:
        model.train(was_training)


@torch.no_grad()
def forward_probs(
    model: RACNN, x: torch.Tensor, *, tta: str | None = None, exit_confidence: float | None = None
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The model on a preprocessed batch (B x 3 x S x S): every output's probabilities (B x K, on the CPU)
    and the views of scales 2..N relative to the image (B x 3 each). ``tta="flip"``: each output's
    probabilities are the mean of the batch's and of its mirror image's, each view zoomed into by its own
    boxes; the views returned are the original image's. ``exit_confidence``: early exit
    (:mod:`racnn.early_exit`): the outputs and views an image did not run are NaN rows, and the probabilities
    gain ``scales_run`` (B, the scales that answered each image)."""
    if exit_confidence is not None:
        ran = staged_forward(model_stages(model), x, keys=model.keys, exit_confidence=exit_confidence)
        probs = {k: v.softmax(1) for k, v in ran.out.logits.items()} | {EXIT_KEY: ran.scales_run}
        return probs, ran.out.views
    out = model(x)
    logits = out.logits
    if tta == "flip":
        logits = flip_tta_logits(logits, model(x.flip(3)).logits)
    return {k: v.float().softmax(1).cpu() for k, v in logits.items()}, [b.float().cpu() for b in out.views]


def records(
    model: RACNN,
    probs: dict[str, torch.Tensor],
    views: list[torch.Tensor],
    names: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    *,
    topk: int = 5,
    tta: str | None = None,
) -> list[dict[str, Any]]:
    """The prediction records (schema of :func:`predict`) of a batch's probabilities and views; ``tta``: the
    test-time augmentation that made ``probs`` (:func:`forward_probs`), recorded in each. After an early exit
    (``probs`` holds ``scales_run``) a record has the outputs and boxes its image ran."""
    classes = model.classes or [str(i) for i in range(model.num_classes)]
    k = min(topk, model.num_classes)
    result = []
    for i, (name, (w, h)) in enumerate(zip(names, sizes, strict=True)):
        ran = int(probs[EXIT_KEY][i]) if EXIT_KEY in probs else len(model.scale_keys)
        top = {}
        for key in outputs_run(model.keys, ran):  # (early exit: what this image ran)
            val, idx = probs[key][i].topk(k)
            top[key] = [
                {"class": classes[j], "index": int(j), "prob": float(v)}
                for v, j in zip(val, idx, strict=True)
            ]
        boxes = []
        for s, b in enumerate(views[: ran - 1]):  # the boxes this image's scales gave
            x0, y0, x1, y1 = box_to_xyxy(b[i]).tolist()
            boxes.append(
                {
                    "scale": s + 1,
                    "cx": float(b[i, 0]),
                    "cy": float(b[i, 1]),
                    "side": float(2 * b[i, 2]),
                    "xyxy_px": [round(x0 * w, 1), round(y0 * h, 1), round(x1 * w, 1), round(y1 * h, 1)],
                }
            )
        result.append(
            {
                "image": name,
                "width": w,
                "height": h,
                "tta": tta,
                "top": top,
                "boxes": boxes,
                "scales_run": ran,
                "answered_by": answer_key(model.keys, ran),
            }
        )
    return result


def format_predictions(records: list[dict[str, Any]], topk: int = 5) -> str:
    """A readable table per image."""
    lines: list[str] = []
    for r in records:
        lines.append(f"{r['image']}  ({r['width']}x{r['height']} px)")
        keys = list(r["top"])
        width = max(len(e["class"]) for k in keys for e in r["top"][k][:topk])
        lines.append("  rank  " + "  ".join(f"{k:<{width + 8}}" for k in keys))
        for rank in range(min(topk, len(r["top"][keys[0]]))):
            cells = [
                f"{r['top'][k][rank]['class']:<{width}} {100 * r['top'][k][rank]['prob']:5.1f}%" for k in keys
            ]
            lines.append(f"  {rank + 1:>4}  " + "  ".join(f"{c:<{width + 8}}" for c in cells))
        for b in r["boxes"]:
            x0, y0, x1, y1 = b["xyxy_px"]
            lines.append(
                f"  attention of scale {b['scale']} (input of scale {b['scale'] + 1}): "
                f"x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} px"
            )
        lines.append("")
    return "\n".join(lines)
