"""The attention pictures of ``benchmarks/accuracy.py``: boxes on test images a run's fused output gets
right and wrong, and derivative maps, as PNGs small enough for the repository (docs/figures/)."""

from __future__ import annotations

from pathlib import Path

import torch


def shrink_png(path: Path, max_bytes: int = 300_000) -> Path:
    """Re-save a PNG with a 256-colour palette, downscaled until it is under ``max_bytes``."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    while True:
        img.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= max_bytes or img.width < 300:
            return path
        img = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.Resampling.LANCZOS)


@torch.no_grad()
def write_pictures(run_dir: Path, fig_dir: Path, stem: str, *, rows: int = 6, pool: int = 64) -> list[Path]:
    """Attention boxes on ``rows`` test images the fused output gets right and ``rows`` it gets wrong (a seeded
    sample of ``pool`` test images; titles give the scale-1 box IoU and the scale-2 head hit), and derivative
    maps (:mod:`racnn.analysis`) of two of them."""
    from racnn.analysis import derivative_map_figure
    from racnn.attention import box_to_xyxy
    from racnn.checkpoint import load_model
    from racnn.evaluation import box_iou, head_hits
    from racnn.training import loaders
    from racnn.visualization import attention_figure

    model = load_model(run_dir / "best.pt")
    cfg, classes = model.training_config, model.classes
    test = loaders.make_dataset(cfg, "test", model.preprocessing, train=False)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:pool].tolist()
    items = [test[i] for i in idx]
    x, y = torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])
    outs = [model(x[i : i + 16]) for i in range(0, len(x), 16)]
    pred = torch.cat([o.logits[model.keys[-1]] for o in outs]).argmax(1)
    v2, v3 = (torch.cat([o.views[s] for o in outs]) for s in (0, 1))  # what scales 2 and 3 see
    iou = box_iou(box_to_xyxy(v2), torch.stack([it["box"] for it in items]))
    parts = torch.stack([it["parts"] for it in items])
    hit, has = head_hits(box_to_xyxy(v3), parts, getattr(test, "head_parts", []))
    titles = [
        f"IoU {iou[i]:.2f} head {'n/a' if not has[i] else 'in' if hit[i] else 'OUT'}" for i in range(len(x))
    ]
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, want in (("successes", True), ("failures", False)):
        sel = [i for i in range(len(x)) if bool(pred[i] == y[i]) == want][:rows]
        if not sel:
            continue
        path = fig_dir / f"{stem}_{kind}.png"
        attention_figure(
            model, x[sel], classes, path, labels=y[sel].tolist(), titles=[titles[i] for i in sel], topk=2
        )
        paths.append(shrink_png(path))
    sel = [0, int((pred != y).nonzero()[0]) if (pred != y).any() else 1]
    path = fig_dir / f"{stem}_derivative_map.png"
    derivative_map_figure(model, x[sel], y[sel].tolist(), path, classes=classes)
    paths.append(shrink_png(path))
    return paths
