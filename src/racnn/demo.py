"""``racnn demo``: train and evaluate a small RA-CNN on the embedded synthetic birds, then draw what it does.

Nothing is downloaded: the data is drawn by :mod:`racnn.data.synthetic` and the backbone starts from random
init. Writes into the output folder everything ``racnn train`` writes, plus ``attention.png`` (boxes and
zoomed crops on test images) and ``curves.png`` (training curves).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import load_model
from .config import Config, load_config
from .training import loaders
from .training.outputs import RunFolder, RunFolderError
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
    run = RunFolder(out)
    replace = run.holds_run()
    if replace and not run.is_demo():
        raise RunFolderError(
            f"{out}: holds a training run of racnn train, which racnn demo never replaces; pass another --out"
        )
    if replace:
        print(f"racnn demo: replacing the earlier demo output in {out}", file=sys.stderr)
    trainer = Trainer(cfg, out, progress=progress, overwrite=replace)
    try:  # the folder stays locked until the pictures are written too
        trainer.start()
        run.demo_mark.write_text("written by racnn demo, which may replace this folder's run\n")
        metrics = trainer.fit()
        model = load_model(run.best) if run.best.is_file() else trainer.model.eval().cpu()
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
    finally:
        trainer.close()
    return metrics
