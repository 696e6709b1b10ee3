"""``racnn demo``: train and evaluate a small RA-CNN on the embedded synthetic birds, then draw what it does.

Nothing is downloaded: the data is drawn by :mod:`racnn.data.synthetic` and the backbone starts from random
init. Writes into the output folder everything ``racnn train`` writes, plus ``attention.png`` (boxes and
zoomed crops on test images) and ``curves.png`` (training curves).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .config import Config, load_config
from .training import loaders
from .training.trainer import Trainer
from .visualization import attention_figure, plot_curves


def demo_config_path() -> Path:
    return Path(str(resources.files("racnn") / "resources" / "demo_synthetic.yaml"))


def demo_config(overrides: list[str] | None = None, *, quick: bool = False) -> Config:
    """The demo's config; ``quick`` shortens it for tests and smoke runs (fewer epochs and images)."""
    quick_keys = (
        [
            "train.epochs=8",
            "schedule.warmup_epochs=2",
            "schedule.classify_epochs=2",
            "apn.init_steps=30",
            "data.max_images=800",
        ]
        if quick
        else []
    )
    return load_config(demo_config_path(), quick_keys + list(overrides or []))


def run_demo(
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    quick: bool = False,
    progress: bool = True,
    pictures: int = 8,
) -> dict[str, float]:
    """Train, evaluate on the test split (``out/metrics.json``) and write ``attention.png`` and ``curves.png``."""
    cfg = demo_config(overrides, quick=quick)
    trainer = Trainer(cfg, out, progress=progress)
    metrics = trainer.fit()
    model = trainer.model.eval().cpu()
    best = Path(out) / "best.pt"
    if best.is_file():
        from .checkpoint import load_model

        model = load_model(best)
    test = loaders.make_dataset(cfg, "test", model.preprocessing, train=False)
    idx = torch.linspace(0, len(test) - 1, steps=min(pictures, len(test))).long().tolist()
    items = [test[i] for i in idx]
    attention_figure(
        model,
        torch.stack([it["image"] for it in items]),
        list(test.classes),
        Path(out) / "attention.png",
        labels=[int(it["label"]) for it in items],
    )
    plot_curves(out, Path(out) / "curves.png")
    return metrics
