"""The files of a training run, in its folder (rank 0 writes them all):

- ``config.yaml``: the resolved config;
- ``last.pt``: the resumable state, written atomically at the start and after every epoch;
- ``best.pt``: the selected model (``train.select``), the one the test reads;
- ``metrics.jsonl``: one record per epoch; a resumed run cuts it back to what its ``last.pt`` had logged;
- ``metrics.json``: the test;
- ``tb/``: TensorBoard scalars and attention pictures, when ``tensorboard`` is installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checkpoint import save_checkpoint
from ..config import Config, save_config
from ..data import DatasetError
from ..evaluation import json_safe
from ..model import RACNN


class RunFolder:
    """Paths and writes of one run's folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self.log_file = self.path / "metrics.jsonl"
        self.test = self.path / "metrics.json"
        self.tensorboard = self.path / "tb"

    def start(self, cfg: Config, *, resume: bool, log_bytes: int) -> None:
        """Make the folder and clear what a killed write left; a new run writes its config and an empty log,
        a resumed one cuts its log back to ``log_bytes`` (the lines of epochs that ``last.pt`` holds)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for tmp in self.path.glob(".*.pt.*.tmp"):  # checkpoint writes killed half-way
            tmp.unlink(missing_ok=True)
        if resume:
            trim_file(self.log_file, log_bytes)
        else:
            save_config(cfg, self.config)
            self.log_file.write_text("")

    def log(self, record: dict[str, Any]) -> int:
        """Append one record to ``metrics.jsonl``; returns the file's new size."""
        with open(self.log_file, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
            return f.tell()

    def save_state(self, state: dict[str, Any]) -> None:
        save_checkpoint(state, self.last)

    def save_model(self, record: dict[str, Any]) -> None:
        save_checkpoint(record, self.best)

    def write_test(self, metrics: dict[str, Any]) -> None:
        self.test.write_text(json.dumps(json_safe(metrics), indent=2))


def trim_file(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes when it is longer (``size < 0``: leave it)."""
    if size >= 0 and path.is_file() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


class TensorBoard:
    """``train.tensorboard``: per-epoch scalars and an attention picture per validation in ``OUT/tb/``. Inert
    (``writer`` None) when the optional ``tensorboard`` package is not installed."""

    def __init__(self, log_dir: Path, *, purge_step: int | None = None) -> None:
        self.writer: Any = None
        self._batch: tuple[torch.Tensor, list[int]] | None = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pip install 'racnn[tensorboard]'
            return
        # purge_step: a resumed run hides the events its crashed predecessor logged after the checkpoint
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, rec: dict[str, Any], step: int, group: str = "train") -> None:
        """Numbers of an epoch record as ``train/<key>`` and ``val/<key>`` (``test/<key>`` for the test)."""
        if self.writer is None:
            return
        for k, v in rec.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or k == "epoch":
                continue
            tag = f"val/{k[4:]}" if k.startswith("val_") else f"{group}/{k.removeprefix('train_')}"
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def attention(
        self,
        model: RACNN,
        data: Callable[[], Dataset | None],
        classes: list[str],
        step: int,
        device: torch.device,
    ) -> None:
        """The picture of :func:`racnn.visualization.attention_figure` for the first (up to) 4 readable images
        of ``data()`` (called once; evaluation transform, so no random draw)."""
        if self.writer is None or model.cfg.num_scales < 2:
            return
        from PIL import Image

        from ..visualization import attention_figure

        if self._batch is None:
            dataset, items = data(), []
            if dataset is None:
                return
            for i in range(min(4, len(dataset))):  # type: ignore[arg-type]
                with contextlib.suppress(DatasetError):  # an unreadable image is not worth a failed run
                    items.append(dataset[i])
            if not items:
                return
            self._batch = (torch.stack([it["image"] for it in items]), [int(it["label"]) for it in items])
        images, labels = self._batch  # B x 3 x S x S, B
        was_training = model.training
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "attention.png"
            attention_figure(model, images.to(device), classes, out, labels=labels)
            with Image.open(out) as picture:
                pixels = np.asarray(picture.convert("RGB"))  # H x W x 3 uint8
        model.train(was_training)
        self.writer.add_image("attention", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
