"""An exported RA-CNN run by onnxruntime, with the surface that predict, eval and serve read from a
:class:`racnn.model.RACNN`: called on a preprocessed batch it returns a :class:`racnn.model.RACNNOutput`
(logits by output key, boxes, views; no crops), and it carries the classes, the preprocessing
(``transforms()``), the model config and, when the export recorded it, the training config.

Why a second engine: the exported graph runs the whole model in 0.45 to 0.54 of eager PyTorch's time on a
2-core CPU, at the same decisions (docs/performance.md, "Deployment"), and it needs neither autograd nor the
model's Python code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attention import compose_boxes
from .backbones import Preprocessing
from .checkpoint import CheckpointError
from .config import Config, ConfigError, ModelConfig
from .data.transforms import ImageTransform, eval_transform
from .fusion import FUSIONS, fuse
from .model import RACNNOutput, fusion_keys, scale_keys, scale_sizes

ONNX_FORMAT = "racnn-onnx-v1"
STAGE_FORMAT = "racnn-onnx-stage-v1"  # a stage graph of early exit: not a model on its own
MODEL_FILE = "model.onnx"
BACKENDS = ("torch", "onnxruntime")  # what runs a trained model (racnn.load_model's backend)


def onnx_file(path: str | Path) -> Path | None:
    """The ONNX graph ``path`` names (a ``.onnx`` file, or a folder holding ``model.onnx``), or None."""
    path = Path(path)
    if path.suffix == ".onnx":
        return path
    if path.is_dir() and (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    return None


def import_onnxruntime() -> Any:
    """onnxruntime, or a one-line error naming the pip extra that installs it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeError("the onnxruntime backend needs onnxruntime: pip install 'racnn[onnx]'") from e
    return onnxruntime


class OnnxRACNN:
    """``path``'s graph (``racnn export --format onnx``) in an onnxruntime session on the CPU. ``threads``:
    onnxruntime's intra-op threads (default: its own choice, one per physical core)."""

    backend = "onnxruntime"
    training = False
    device = torch.device("cpu")

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import_onnxruntime()
        self.path = self.graph = Path(
            path
        )  # path: what messages name; graph: the file (its folder: the stages)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: not found")
        self.threads = default_threads() if threads is None else threads
        self._stages: list[_Stage] | None = None
        self.session = self._session(self.path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("racnn.format") == STAGE_FORMAT:
            raise CheckpointError(
                f"{self.path}: one stage of early exit; pass the folder or the model.onnx beside it"
            )
        if meta.get("racnn.format") != ONNX_FORMAT:
            raise CheckpointError(
                f"{self.path}: an ONNX graph that racnn did not export (no racnn.format={ONNX_FORMAT} "
                "metadata); export it with racnn export --format onnx"
            )
        self.metadata = dict(meta)
        self.keys: list[str] = json.loads(meta["racnn.keys"])
        n = sum(1 for k in self.keys if len(k) == 2)  # "s1".."s9": the scales; "s12"..: the fusions
        self.scale_keys, self.fusion_keys = scale_keys(n), fusion_keys(n)
        if self.keys != self.scale_keys + self.fusion_keys:
            raise CheckpointError(f"{self.path}: unexpected output keys {self.keys}")
        self.classes: list[str] | None = (
            json.loads(meta["racnn.classes"]) if "racnn.classes" in meta else None
        )
        self.image_size = int(meta["racnn.image_size"])
        self.training_config = self._training_config(meta)
        self.cfg: ModelConfig = (
            self.training_config.model if self.training_config else ModelConfig(num_scales=n)
        )
        self.preprocessing = Preprocessing(
            tuple(json.loads(meta["racnn.mean"])), tuple(json.loads(meta["racnn.std"]))
        )
        self.quantized: str | None = meta.get("racnn.quantized")
        outputs = [o.name for o in self.session.get_outputs()]
        self.num_classes = int(self.session.get_outputs()[0].shape[1])
        self._outputs = outputs
        weights = meta.get("racnn.fusion_weights")
        self.fusion_weights = torch.tensor(json.loads(weights)) if weights else None

    def _session(self, path: Path, *, spin: bool = True) -> Any:
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own classes, one per failure
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{path}: not a readable ONNX graph ({first[:200]})") from e

    def _training_config(self, meta: dict[str, str]) -> Config | None:
        if "racnn.config" not in meta:  # an export from before the config was recorded: predict only
            return None
        try:
            return Config.from_dict(json.loads(meta["racnn.config"]), source=str(self.path))
        except (ConfigError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{self.path}: its racnn.config metadata is not a racnn config ({e})"
            ) from e

    # the nn.Module surface the consumers call on a model: this one is always in eval mode, on the CPU
    def eval(self) -> OnnxRACNN:
        return self

    def train(self, mode: bool = True) -> OnnxRACNN:
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxRACNN:
        return self

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    @property
    def scale_sizes(self) -> list[int]:
        return scale_sizes(self.cfg)

    def transforms(self) -> ImageTransform:
        """The evaluation preprocessing of one PIL image, as the exported model's (3 x S x S)."""
        prep = self.preprocessing
        return eval_transform(self.image_size, mean=prep.mean, std=prep.std)

    def __call__(self, images: torch.Tensor) -> RACNNOutput:
        """The graph on a preprocessed batch (B x 3 x S x S; S the export's image side): every output's logits
        (B x K), the APN boxes and the views of scales 2..N relative to the image (B x 3 each)."""
        if images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"{self.path}: takes images of 3 x {self.image_size} x {self.image_size}, got "
                f"{tuple(images.shape[1:])}"
            )
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        got = dict(zip(self._outputs, self.session.run(None, {"images": x}), strict=True))
        logits = {k: torch.from_numpy(got[f"logits_{k}"]) for k in self.keys}
        boxes = [torch.from_numpy(got[f"box_{k}"]) for k in self.scale_keys[:-1]]
        concat = {k: torch.from_numpy(got[f"concat_{k}"]) for k in self.fusion_keys if f"concat_{k}" in got}
        views: list[torch.Tensor] = []
        for box in boxes:  # each scale's box composed into the image's coordinates (RACNNFeatures.views)
            views.append(box if not views else compose_boxes(views[-1], box))
        return RACNNOutput(logits, boxes, [], views=views, concat=concat)

    def stages(self) -> list[Callable[..., tuple[torch.Tensor, ...]]]:
        """The export's stage graphs (``stage_s1.onnx`` .. beside ``model.onnx``, of the same export) as
        callables on torch tensors, what early exit runs (:mod:`racnn.early_exit`); opened on first use."""
        if self._stages is None:
            from .onnx_export import stage_files

            stages = []
            for f in stage_files(self.graph.parent, len(self.scale_keys)):
                if not f.is_file():
                    raise CheckpointError(
                        f"{f}: not found; early exit in onnxruntime runs the stage graphs that racnn export "
                        "--format onnx writes beside model.onnx: export the model again"
                    )
                session = self._session(f, spin=False)  # the stages run in turn: idle pools must not spin
                meta = session.get_modelmeta().custom_metadata_map
                if meta.get("racnn.export_id") != self.metadata.get("racnn.export_id"):
                    raise CheckpointError(
                        f"{f}: a stage graph of another export than {self.graph.name} beside it; export the "
                        "model again"
                    )
                stages.append(_Stage(session))
            self._stages = stages
        return self._stages

    def fusion_variants(self, out: RACNNOutput) -> dict[str, torch.Tensor]:
        """Every fusion kind of ``out``'s fused outputs that the graph lets one compute (as
        :meth:`racnn.model.RACNN.fusion_variants`): ``concat`` needs the graph's concat heads, ``weighted`` the
        recorded weights; an export from before they were recorded lacks them."""
        scales = [out.logits[k] for k in self.scale_keys]
        variants = {}
        for kind in FUSIONS:
            for n, key in enumerate(self.fusion_keys, start=2):
                if kind == "concat" and key not in out.concat:
                    continue
                if kind == "weighted" and self.fusion_weights is None:
                    continue
                weights = self.fusion_weights[n - 2, :n] if self.fusion_weights is not None else None
                variants[f"{key}_{kind}"] = fuse(
                    kind, scales[:n], concat=out.concat.get(key), weights=weights
                )
        return variants


class _Stage:
    """A stage graph as a callable on torch tensors (:mod:`racnn.early_exit`'s signature)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {
            n: np.ascontiguousarray(a.detach().float().cpu().numpy())
            for n, a in zip(self.inputs, args, strict=True)
        }
        return tuple(torch.from_numpy(o) for o in self.session.run(None, feed))


def load_onnx_model(path: str | Path, *, threads: int | None = None) -> OnnxRACNN:
    """``path``'s model in onnxruntime: an ONNX export as it is; a checkpoint (``.pt``) or a safetensors
    folder exported first (the model and early exit's stage graphs) into a temporary folder that lives as long
    as the returned model."""
    graph = onnx_file(path)
    if graph is not None:
        return OnnxRACNN(graph, threads=threads)
    import tempfile

    from .checkpoint import load_model
    from .onnx_export import export_onnx, export_stages

    import_onnxruntime()  # before the export's minute: a missing onnxruntime is said at once
    model = load_model(path, backend="torch")
    tmp = tempfile.TemporaryDirectory(prefix="racnn-onnx-")
    exported = export_onnx(
        model, Path(tmp.name) / MODEL_FILE, image_size=model.image_size, classes=model.classes
    )
    export_stages(model, tmp.name, image_size=model.image_size)
    runner = OnnxRACNN(exported, threads=threads)
    runner.path, runner._folder = Path(path), tmp  # messages name the user's file; the folder goes with it
    return runner


def default_threads() -> int | None:
    """onnxruntime's intra-op threads: ``OMP_NUM_THREADS`` when set (as torch reads it), else its own choice."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None
