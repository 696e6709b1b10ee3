"""Predictions on image files: top-k per scale and fused, attention boxes in the image's pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .attention import box_to_xyxy
from .config import Config
from .data import build_transform, load_image
from .model import RACNN


@torch.no_grad()
def predict_images(
    model: RACNN,
    cfg: Config,
    classes: list[str],
    paths: list[str | Path],
    *,
    topk: int = 5,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """One record per image: ``{"image", "width", "height", "top": {key: [(class, prob), ...]},
    "boxes": [{"scale", "cx", "cy", "side", "xyxy_px"}]}``; boxes of scale s are where scale s looked."""
    device = torch.device(device)
    model.eval().to(device)
    prep = model.preprocessing
    transform = build_transform(size=cfg.data.image_size, mean=prep.mean, std=prep.std, train=False)
    records: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images, sizes = [], []
        for p in chunk:
            img = load_image(p)
            sizes.append(img.size)
            images.append(transform(img, None, None)[0])
        out = model(torch.stack(images).to(device))
        probs = {k: v.float().softmax(1).cpu() for k, v in out.logits.items()}
        boxes = [b.float().cpu() for b in out.views]
        k = min(topk, len(classes))
        for i, (p, (w, h)) in enumerate(zip(chunk, sizes, strict=True)):
            top = {}
            for key, pr in probs.items():
                val, idx = pr[i].topk(k)
                top[key] = [
                    {"class": classes[j], "index": int(j), "prob": float(v)}
                    for v, j in zip(val, idx, strict=True)
                ]
            rec_boxes = []
            for s, b in enumerate(boxes):
                x0, y0, x1, y1 = box_to_xyxy(b[i]).tolist()
                rec_boxes.append(
                    {
                        "scale": s + 1,
                        "cx": float(b[i, 0]),
                        "cy": float(b[i, 1]),
                        "side": float(2 * b[i, 2]),
                        "xyxy_px": [round(x0 * w, 1), round(y0 * h, 1), round(x1 * w, 1), round(y1 * h, 1)],
                    }
                )
            records.append({"image": str(p), "width": w, "height": h, "top": top, "boxes": rec_boxes})
    return records


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
