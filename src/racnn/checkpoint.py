"""Checkpoints: atomic writes, ``weights_only``-safe contents, and models rebuilt from the file alone.

Two forms hold a model:
- a ``.pt`` file from training (``last.pt``: full resumable state; ``best.pt``: config, classes and weights);
- a release folder from ``racnn export``: ``model.safetensors`` + ``config.json``.
Both carry the resolved config and the class names, so nothing else is needed to rebuild the model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError
from .model import RACNN, build_model

TRAIN_FORMAT = "racnn-train-v1"
MODEL_FORMAT = "racnn-model-v1"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit; one line naming the file."""


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it keeps the new file); not possible everywhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a ``.pt`` checkpoint with ``weights_only=True`` (tensors and primitives only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable racnn checkpoint ({first[:200]})") from e
    if not isinstance(obj, dict) or obj.get("format") not in (TRAIN_FORMAT, MODEL_FORMAT):
        raise CheckpointError(
            f"{path}: not a racnn checkpoint (no 'format' key of {TRAIN_FORMAT}/{MODEL_FORMAT})"
        )
    return obj


def model_record(model: RACNN, cfg: Config, classes: list[str]) -> dict[str, Any]:
    """The minimal model checkpoint (``best.pt``): format, config (without the ``runtime`` section: how one
    machine ran the training is no part of the model), class names, weights."""
    return {
        "format": MODEL_FORMAT,
        "config": model_config_dict(cfg),
        "classes": list(classes),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def model_config_dict(cfg: Config) -> dict[str, Any]:
    """``cfg`` as stored with a model: every section but ``runtime``."""
    d = cfg.to_dict()
    d.pop("runtime")
    return d


def rebuild_model(
    cfg_dict: dict[str, Any], classes: list[str], state: dict[str, torch.Tensor], source: str | Path
) -> RACNN:
    """The model a record describes, its weights loaded, in eval mode on the CPU, carrying its classes, its
    input image side and the run's config (``training_config``)."""
    try:
        cfg = Config.from_dict(cfg_dict, source=str(source))
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    model = build_model(
        cfg.model, num_classes=len(classes), pretrained=False, classes=classes, image_size=cfg.data.image_size
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{source}: weights do not fit a {cfg.model.backbone} RA-CNN with "
            f"{len(classes)} classes ({first[:200]})"
        ) from e
    model.training_config = cfg
    return model.eval()


def load_model(path: str | Path, *, backend: str | None = None, threads: int | None = None) -> RACNN:
    """Rebuild a model (in eval mode, on the CPU) from a ``.pt`` checkpoint or an exported folder. It carries
    its class names (``model.classes``), its preprocessing (``model.transforms()``) and the config of the run
    that trained it (``model.training_config``).

    ``backend``: what runs it. ``"torch"``: eager PyTorch, a :class:`racnn.model.RACNN`. ``"onnxruntime"``: an
    :class:`racnn.onnx_model.OnnxRACNN` on the graph of an ONNX export (``racnn export --format onnx``; a
    ``.pt`` checkpoint or a safetensors folder is exported first, into memory), ``threads`` its intra-op
    threads. Default: onnxruntime for an ONNX export, torch for the others. Both are called alike by
    :func:`racnn.predict`, ``racnn eval`` and ``racnn serve``."""
    from .onnx_model import BACKENDS, load_onnx_model, onnx_file

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    graph = onnx_file(path)
    weights = Path(path).is_dir() and (Path(path) / "model.safetensors").is_file()
    if backend == "onnxruntime" or (backend is None and graph is not None):
        return load_onnx_model(graph or path, threads=threads)  # type: ignore[return-value]
    if graph is not None and not weights:
        raise CheckpointError(
            f"{path}: an ONNX export holds no PyTorch model; run it with the onnxruntime backend, or pass "
            "the .pt checkpoint or safetensors folder it was exported from"
        )
    return _load_torch_model(path)


def _load_torch_model(path: str | Path) -> RACNN:
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        folder = path if path.is_dir() else path.parent
        weights = path if path.suffix == ".safetensors" else folder / "model.safetensors"
        meta_path = folder / "config.json"
        for p in (weights, meta_path):
            if not p.is_file():
                raise CheckpointError(
                    f"{p}: not found (an exported model is model.safetensors + config.json)"
                )
        from safetensors.torch import load_file

        try:
            meta = json.loads(meta_path.read_text())
            return rebuild_model(meta["config"], meta["classes"], load_file(str(weights)), folder)
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{meta_path}: not a racnn config.json ({e})") from e
    ckpt = load_checkpoint(path)
    return rebuild_model(ckpt["config"], ckpt["classes"], ckpt["model"], path)


def export_model(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write release weights: ``out_dir/model.safetensors`` and ``out_dir/config.json``."""
    from safetensors.torch import save_file

    model = load_model(checkpoint, backend="torch")
    cfg, classes = model.training_config, model.classes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    prep = model.preprocessing
    meta = {
        "format": MODEL_FORMAT,
        "config": model_config_dict(cfg),
        "classes": classes,
        "preprocessing": {
            "mean": list(prep.mean),
            "std": list(prep.std),
            "input_size": cfg.model.input_size,
            "image_size": cfg.data.image_size,
        },
    }
    atomic_write(
        out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": MODEL_FORMAT})
    )
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return out
