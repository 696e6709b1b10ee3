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
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checkpoint import save_checkpoint
from ..config import Config, save_config
from ..data import DatasetError
from ..evaluation import json_safe
from ..filelock import LockHeld, hold_lock
from ..model import RACNN


class RunFolderError(ValueError):
    """A run folder cannot be used or written; the message is one line naming the path."""


# what marks a folder as holding a training run, and every output a run (or the demo) writes
RUN_MARKS = ("last.pt", "best.pt", "metrics.jsonl")
RUN_OUTPUTS = (*RUN_MARKS, "config.yaml", "metrics.json", "tb", "attention.png", "curves.png", ".racnn-demo")


class RunFolder:
    """Paths and writes of one run's folder, and its safety:

    - a new run refuses a folder that holds a run (``last.pt``, ``best.pt`` or a ``metrics.jsonl`` with lines) unless
      told to replace it (``overwrite``): the old outputs are then moved to ``OUT/.replaced/`` and deleted
      once the new run's first ``last.pt`` is written (a run killed in between leaves them there, and the
      next start in that folder moves them back);
    - the folder is locked for the whole run by ``fcntl.flock`` on ``OUT/.lock``, which the kernel releases
      when the process ends, however it ends (``kill -9`` included): a second process gets one line naming
      the PID that holds it;
    - every path problem (``--out`` a file, an unwritable parent, a full disk) is one line naming the path;
      checkpoints are written atomically, so a failed write keeps the previous one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self.log_file = self.path / "metrics.jsonl"
        self.test = self.path / "metrics.json"
        self.tensorboard = self.path / "tb"
        self.aside = self.path / ".replaced"
        self.demo_mark = self.path / ".racnn-demo"
        self._lock: BinaryIO | None = None

    def holds_run(self) -> bool:
        """Whether a run is here: a checkpoint, or a log with a line in it (a run stopped before its first
        checkpoint leaves an empty log and nothing to lose)."""
        log = self.log_file
        return (
            self.last.exists()
            or self.best.exists()
            or (log.exists() and (log.is_dir() or log.stat().st_size > 0))
        )

    def is_demo(self) -> bool:
        """Whether the run here was written by ``racnn demo`` (which may replace its own earlier output)."""
        return self.demo_mark.is_file()

    def make(self) -> None:
        """Create the folder (and its parents) or say in one line why it cannot be."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path}: exists and is not a folder; pass another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"{self.path}: cannot create the run folder ({e.strerror or e})") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunFolderError(f"{self.path}: the run folder is not writable")

    def lock(self) -> None:
        """Hold ``OUT/.lock`` (an exclusive ``flock``) until :meth:`unlock`, the end of the process, or this
        object's collection (the open file's closing releases it)."""
        if self._lock is not None:
            return
        self.make()
        path = self.path / ".lock"
        try:
            self._lock = hold_lock(path)
        except LockHeld as e:
            raise RunFolderError(
                f"{self.path}: in use by {e.who} (another run writes here); wait for it or pass another --out"
            ) from None
        except OSError as e:
            raise RunFolderError(f"{path}: cannot open the run's lock ({e.strerror or e})") from None

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def start(self, cfg: Config, *, resume: bool, log_bytes: int, overwrite: bool = False) -> None:
        """Lock the folder and make it ready: clear what a killed write left; a new run refuses a folder that
        holds a run (or moves it aside with ``overwrite``) and writes its config and an empty log; a resumed
        one cuts its log back to ``log_bytes`` (the lines of epochs that ``last.pt`` holds)."""
        self.lock()
        try:
            if (
                self.aside.is_dir() and not self.holds_run()
            ):  # an overwrite killed before its first checkpoint
                self._move(self.aside, self.path)
                self.aside.rmdir()
            for tmp in self.path.glob(".*.pt.*.tmp"):  # checkpoint writes killed half-way
                tmp.unlink(missing_ok=True)
            if resume:
                trim_file(self.log_file, log_bytes)
                return
            if self.holds_run():
                if not overwrite:
                    held = ", ".join(n for n in RUN_MARKS if (self.path / n).exists())
                    raise RunFolderError(
                        f"{self.path}: holds a training run ({held}); continue it with --resume (resume=True), "
                        "or replace it with --overwrite (overwrite=True)"
                    )
                shutil.rmtree(self.aside, ignore_errors=True)
                self.aside.mkdir()
                self._move(self.path, self.aside)
            self.demo_mark.unlink(missing_ok=True)  # a run of racnn train (the demo marks its own after)
            self._write(self.config, lambda: save_config(cfg, self.config))
            self._write(self.log_file, lambda: self.log_file.write_text(""))
        except BaseException:
            self.unlock()
            raise

    @staticmethod
    def _move(src: Path, dst: Path) -> None:
        for name in RUN_OUTPUTS:
            if (src / name).exists():
                os.replace(src / name, dst / name)

    def first_checkpoint_written(self) -> None:
        """The new run has its first ``last.pt``: what ``overwrite`` moved aside can go."""
        shutil.rmtree(self.aside, ignore_errors=True)

    def _write(self, path: Path, write: Callable[[], Any]) -> Any:
        """Run ``write``; an OS error (a full disk, a lost permission) becomes one line naming ``path``."""
        try:
            return write()
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
            kept = f"; the previous {path.name} is kept" if path.suffix == ".pt" else ""
            raise RunFolderError(f"{path}: could not be written ({reason}){kept}") from None

    def log(self, record: dict[str, Any]) -> int:
        """Append one record to ``metrics.jsonl``; returns the file's new size."""

        def append() -> int:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(json_safe(record)) + "\n")
                return f.tell()

        return self._write(self.log_file, append)

    def save_state(self, state: dict[str, Any]) -> None:
        self._write(self.last, lambda: save_checkpoint(state, self.last))

    def save_model(self, record: dict[str, Any]) -> None:
        self._write(self.best, lambda: save_checkpoint(record, self.best))

    def write_test(self, metrics: dict[str, Any]) -> None:
        self._write(self.test, lambda: self.test.write_text(json.dumps(json_safe(metrics), indent=2)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


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
