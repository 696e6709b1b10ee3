"""ONNX export of a trained RA-CNN: logits of every scale and fusion plus the attention boxes.

Uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``; needs the ``onnx`` and
``onnxscript`` packages: ``pip install racnn[onnx]``). The TorchScript exporter (``dynamo=False``) cannot
export the model: it has no symbolic for antialiased bilinear resizing. The default opset is 18, the first
whose ``Resize`` has the ``antialias`` attribute used when ``image_size != input_size``. The crops are
exported as gathers of the two bilinear taps (:func:`racnn.attention.crop_zoom_gather`, chosen by
:func:`racnn.crop_cpp.crop_function` while exporting), which onnxruntime runs faster than ``GridSample``.

Graph: input ``images`` (B x 3 x S x S, float32, normalised with the model's mean/std); outputs
``logits_s1``, ..., ``logits_s123`` (B x K, in ``model.keys`` order), then ``box_s1``, ... (B x 3 boxes
``(cx, cy, half)``, each normalised to the input of its scale), then ``concat_s12``, ... (B x K, the paper's
concat fusion heads, so that an evaluation reports every fusion kind whatever ``model.fusion`` is). The
file's metadata holds the class names, the normalisation, the output keys, the ``weighted`` fusion's weights
and the run's config (see :func:`export_onnx`); :class:`racnn.onnx_model.OnnxRACNN` runs it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write, model_config_dict
from .early_exit import ScaleStage, stage_outputs
from .model import RACNN
from .onnx_model import ONNX_FORMAT, STAGE_FORMAT

__all__ = ["DEFAULT_OPSET", "RACNNOnnxWrapper", "export_onnx", "export_stages", "output_names", "stage_files"]

DEFAULT_OPSET = 18
# Weights above this size go to a separate ``<file>.data`` next to the graph (protobuf caps a file at 2 GiB).
_EXTERNAL_DATA_BYTES = 1536 * 1024**2


class RACNNOnnxWrapper(nn.Module):
    """``forward(images) -> (logits per key in model.keys order..., box of each attended scale..., concat
    head of each fusion key...)``."""

    def __init__(self, model: RACNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        concat = tuple(out.concat[k] for k in self.model.fusion_keys)
        return tuple(out.logits[k] for k in self.model.keys) + tuple(out.boxes) + concat


def output_names(model: RACNN) -> list[str]:
    """``logits_<key>`` for every key of ``model.keys``, then ``box_s1`` .. ``box_s<N-1>``, then
    ``concat_<key>`` for every fusion key."""
    boxes = [f"box_{k}" for k in model.scale_keys[:-1]]
    return [f"logits_{k}" for k in model.keys] + boxes + [f"concat_{k}" for k in model.fusion_keys]


def _metadata(model: RACNN, image_size: int, classes: Sequence[str] | None) -> dict[str, str]:
    prep = model.preprocessing
    meta = {
        "racnn.format": ONNX_FORMAT,
        "racnn.keys": json.dumps(list(model.keys)),
        "racnn.mean": json.dumps(list(prep.mean)),
        "racnn.std": json.dumps(list(prep.std)),
        "racnn.image_size": str(image_size),
        "racnn.input_size": str(model.input_size),
        "racnn.box_format": "cx,cy,half normalised to the input of each scale",
    }
    if classes is not None:
        meta["racnn.classes"] = json.dumps(list(classes))
    if model.cfg.num_scales > 1:
        meta["racnn.fusion_weights"] = json.dumps(model.fusion_weights.tolist())
    meta["racnn.export_id"] = export_identity(model)
    if model.training_config is not None:  # what racnn eval needs to read the dataset it was trained on
        meta["racnn.config"] = json.dumps(model_config_dict(model.training_config))
    return meta


def export_onnx(
    model: RACNN,
    path: str | Path,
    *,
    image_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    batch_dynamic: bool = True,
    classes: Sequence[str] | None = None,
    optimize: bool = True,
) -> Path:
    """Write ``model`` (exported in eval mode; its mode is restored afterwards) to the ONNX file ``path``.

    ``image_size``: the side S of the ``images`` input (default ``model.input_size``; the graph resizes to
    the input size when they differ). ``batch_dynamic``: the batch axis is symbolic (``"batch"``), else
    fixed at 2. ``classes`` (optional) and the normalisation are stored as ``racnn.*`` metadata
    properties. ``optimize`` runs onnxscript's graph optimiser (constant folding etc.). Weights are kept
    inside the file unless they exceed 1.5 GiB (then ``<path>.data`` holds them). Returns ``path``.
    """
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail with a clear hint instead)
    except ImportError as e:
        raise RuntimeError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'racnn[onnx]'"
        ) from e
    size = model.input_size if image_size is None else int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be >= 1, got {size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters())
    example = torch.randn(2, 3, size, size, device=param.device, dtype=param.dtype)
    _export(
        RACNNOnnxWrapper(model),
        (example,),
        path,
        input_names=["images"],
        output_names=output_names(model),
        metadata=_metadata(model, size, classes),
        batch_dynamic=batch_dynamic,
        opset=opset,
        optimize=optimize,
    )
    return path


def stage_files(folder: str | Path, num_scales: int) -> list[Path]:
    """The stage graphs of an export (early exit, :mod:`racnn.early_exit`): ``stage_s1.onnx`` .. in ``folder``."""
    return [Path(folder) / f"stage_s{s + 1}.onnx" for s in range(num_scales)]


def export_stages(
    model: RACNN, folder: str | Path, *, image_size: int | None = None, opset: int = DEFAULT_OPSET
) -> list[Path]:
    """Write each scale of ``model`` as a graph of its own (:class:`racnn.early_exit.ScaleStage`, dynamic
    batch; inputs and outputs named as its signature) into ``folder``: what early exit runs in onnxruntime,
    where one graph cannot send part of its batch on. Returns the files (:func:`stage_files`)."""
    size = model.input_size if image_size is None else int(image_size)
    param = next(model.parameters())
    images = torch.randn(2, 3, size, size, device=param.device, dtype=param.dtype)
    paths, state = stage_files(folder, model.cfg.num_scales), ()
    export_id = export_identity(model)  # ties the stages to the model.onnx of the same weights
    for s, path in enumerate(paths):
        stage = ScaleStage(model, s)
        inputs = ["images"] + (["x", "view_in", "logits_in", "pooled_in"] if s else [])  # (not output names)
        outputs = stage_outputs(s, model.cfg.num_scales)
        meta = {"racnn.format": STAGE_FORMAT, "racnn.stage": str(s), "racnn.export_id": export_id}
        _export(stage, (images, *state), path, input_names=inputs, output_names=outputs, metadata=meta)
        if not stage.last:
            with torch.no_grad():
                got = stage.eval()(images, *state)
            got = dict(zip(outputs, got, strict=True))  # the next stage's x, view, logits, pooled:
            state = (got["next_input"], got.get("view", got["box"]), got["logits"], got["pooled"])
    return paths


def export_identity(model: RACNN) -> str:
    """A digest of ``model``'s weights: the ``racnn.export_id`` that ``model.onnx`` and its stage graphs share,
    so that stages left by another export beside a new ``model.onnx`` are refused, not run."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    metadata: dict[str, str],
    batch_dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
) -> None:
    """``module`` (in eval mode for the export; its mode restored after) traced on ``args`` and written to
    ``path`` with ``metadata``; the batch axis of every input symbolic with ``batch_dynamic``."""
    modes = [(m, m.training) for m in module.modules()]  # a wrapper's own mode is no guide to its model's
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in args) if batch_dynamic else None
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module.eval(),
                args,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic,
                optimize=optimize,
                verbose=False,
            )
    finally:
        for m, mode in modes:
            m.training = mode
    if program is None:  # pragma: no cover - only the TorchScript exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    program.model.metadata_props.update(metadata)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.state_dict().values())
    if weight_bytes > _EXTERNAL_DATA_BYTES:
        program.save(str(path), external_data=True)  # the .data file is named after ``path``: no temp file
    else:
        atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
