"""Static int8 quantization of an exported RA-CNN graph, calibrated on training images.

Uses onnxruntime's own tools (``onnxruntime.quantization``; ``pip install racnn[onnx]``): the fp32 graph of
:func:`racnn.onnx_export.export_onnx` goes through ``quant_pre_process`` (ONNX shape inference and
onnxruntime's portable graph optimisations) and ``quantize_static`` in the QDQ format: int8 weights, one scale
per output channel (7 bits used: see :func:`quantize_onnx`), and 8-bit activations whose ranges (min/max) are
measured on calibration images.

Only the trunks and the FC layers are quantized (:func:`quantized_nodes`: the convolutions, the activations
that follow them and the trunks' residual additions, which onnxruntime folds into ``QLinearConv`` and runs
as ``QLinearAdd``; the APNs' pooling, a ``MatMul``; the FC layers of the heads, fusions and APNs); the resize,
the crop-and-zoom (``GatherElements``) and the box arithmetic stay float and read float tensors
(:func:`_float_ops_read_float`), and the FC layers return float (logits, the APN's box before its sigmoid), so a box the quantized APN
proposes is cut out of the image as accurately as in the fp32 graph. Activations are uint8 and weights int8
(U8S8, onnxruntime's x86 format): with int8 activations onnxruntime converts them to uint8 when it loads the
graph, and around a residual branch that left a convolution between a uint8 and an int8 pair, which no int8
kernel takes: 30 of MobileNetV2 x 3's 156 convolutions ran in float between quantize/dequantize pairs, and
the pairs around every float activation and addition took a third of the time (docs/performance.md).
Inputs, outputs and their names are those of the fp32 graph (``images`` B x 3 x S x S with a dynamic batch;
``logits_<key>`` B x K; ``box_<key>`` B x 3). The file's metadata holds the fp32 graph's ``racnn.*``
properties plus ``racnn.quantized`` (``"int8"``), ``racnn.calibrated_on`` (JSON ``{"data": folder, "split":
split}``) and ``racnn.calibration_images`` (how many images calibrated it).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import atomic_write
from .model import RACNN

if TYPE_CHECKING:
    import onnx

__all__ = [
    "CALIBRATION_BATCH",
    "DEFAULT_CALIBRATION_IMAGES",
    "QUANTIZED_OPS",
    "calibration_batches",
    "quantize_onnx",
    "quantized_nodes",
    "stage_calibration",
]

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # always quantized; see quantized_nodes for the rest
# quantized where they read trunk tensors alone (quantized_nodes)
TRUNK_OPS = ("Relu", "Clip", "Add", "MaxPool")
# enough images for stable activation ranges, few enough for a few minutes on a CPU at 448 px
DEFAULT_CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 8  # images per calibration run of onnxruntime


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[np.ndarray],
    *,
    calibrated_on: str,
    num_images: int,
    split: str = "train",
) -> Path:
    """Write the int8 (QDQ) version of the fp32 graph ``fp32_path`` to ``out_path``, atomically.

    ``calibration``: batches of images as the graph takes them (B x 3 x S x S float32, normalised with the
    model's preprocessing), read once, lazily, as onnxruntime calibrates; they must hold ``num_images``
    images in all (recorded as ``racnn.calibration_images``: a count that differs raises ``ValueError``).
    ``calibrated_on`` (the data folder, as given) and ``split`` are recorded as ``racnn.calibrated_on``.
    The fp32 graph's ``racnn.*`` properties are copied and ``racnn.quantized`` = ``"int8"`` added.
    Returns ``out_path``.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise RuntimeError(
            "int8 quantization needs the onnx and onnxruntime packages: pip install 'racnn[onnx]'"
        ) from e
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    source = onnx.load(str(fp32_path), load_external_data=False)  # the header: metadata, input, initialisers
    racnn_meta = {p.key: p.value for p in source.metadata_props if p.key.startswith("racnn.")}
    external = any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in source.graph.initializer
    )  # weights > 1.5 GiB sit in a .data file: the intermediate graphs keep them outside too
    reader = _Reader(source.graph.input[0].name, calibration)
    with tempfile.TemporaryDirectory(prefix="racnn-quantize.") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # symbolic shape inference is for graphs whose shapes ONNX cannot infer (not this one) and is slow
        quant_pre_process(
            str(fp32_path), str(prepared), skip_symbolic_shape=True, save_as_external_data=external
        )
        chosen = quantized_nodes(onnx.load(str(prepared), load_external_data=False).graph)
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=[*QUANTIZED_OPS, *TRUNK_OPS],
            nodes_to_quantize=sorted(chosen),
            per_channel=True,
            # 7-bit weights: the int8 kernels of CPUs without VNNI (AVX2, AVX-512F) add two u8 x s8 products in
            # 16 bits, which saturates with 8-bit weights (measured on 120 CUB test images, MobileNetV2: fused
            # top-1 0.83 instead of 0.87); with 7 bits no CPU saturates, and the file runs alike on all of them
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=external,
            # logits and the APN's box coordinates leave their FC layers in float (int8 products, float sums)
            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
        )
        if reader.images != num_images:
            raise ValueError(
                f"the calibration batches held {reader.images} images, not the {num_images} stated"
            )
        model = onnx.load(str(quantized))  # external data, if any, read into memory before tmp goes
    _float_ops_read_float(model.graph, chosen)
    props = {p.key: p.value for p in model.metadata_props} | racnn_meta
    props |= {
        "racnn.quantized": "int8",
        "racnn.calibrated_on": json.dumps({"data": str(calibrated_on), "split": split}),
        "racnn.calibration_images": str(num_images),
    }
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    atomic_write(out_path, lambda tmp: onnx.save(model, tmp))
    return out_path


def quantized_nodes(graph: onnx.GraphProto) -> set[str]:
    """The names of the nodes to quantize in the fp32 ``graph``: every ``Conv``, ``MatMul`` and ``Gemm``
    (:data:`QUANTIZED_OPS`), and every ``Relu``, ``Clip``, ``Add`` and ``MaxPool`` (:data:`TRUNK_OPS`) whose
    data inputs are all trunk tensors (a convolution's output, or such a node's): a convolution's
    activation, which onnxruntime folds into the int8 convolution, a residual addition (``QLinearAdd``) and
    a ResNet stem's max-pool (whose output is its first block's identity). The box arithmetic's additions
    and clamps read the APN's float outputs or constants and stay float."""
    trunk: set[str] = set()  # tensors computed by the trunks' quantized nodes
    chosen: set[str] = set()
    for node in graph.node:  # an ONNX graph lists its nodes in topological order
        data = node.input[:1] if node.op_type == "Clip" else node.input  # (Clip's bounds are constants)
        if node.op_type in QUANTIZED_OPS or (node.op_type in TRUNK_OPS and all(i in trunk for i in data)):
            if not node.name:
                raise ValueError(f"an unnamed {node.op_type} node: its quantization cannot be chosen")
            chosen.add(node.name)
            if node.op_type not in ("MatMul", "Gemm"):  # FC layers return float (logits, boxes)
                trunk.update(node.output)
    return chosen


def _float_ops_read_float(graph: onnx.GraphProto, quantized: set[str]) -> None:
    """Give the float ops back the float tensors they read: onnxruntime rounds an activation through a
    ``QuantizeLinear -> DequantizeLinear`` pair for the int8 op that takes it and hands the rounded copy to
    every reader, so the crops (``GatherElements``) would sample an int8-rounded image and the fusion's concat
    rounded features. Each float op (not in ``quantized``, the names of :func:`quantized_nodes`) is rewired
    to the pair's float input, unless that input is an int8 op's output (a conv's int8 result is what its
    readers get). Also lets onnxruntime fuse each pair into the int8 op it feeds (``QLinearConv``), which it
    does only for a pair read by that op alone."""
    made_by = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for j, name in enumerate(node.input):
            dq = made_by.get(name)
            q = made_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":  # not an activation's pair (a weight's has no Q)
                continue
            source = made_by.get(q.input[0])  # None: a graph input
            if source is None or source.name not in quantized:
                node.input[j] = q.input[0]


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol (``get_next() -> {input name: batch} | None``) over an
    iterable of batches; counts the images it hands out and refuses an empty iterable or a batch of the
    wrong shape with a one-line ``ValueError`` (onnxruntime's own errors would come from deep inside)."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self.input_name, self.images = input_name, 0
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise ValueError("no calibration images: the calibration batches are empty")
        self._batches: Iterator[np.ndarray] = itertools.chain([first], it)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        # a graph of several inputs (a stage of early exit) is fed a dict of them, its images among them
        feed = dict(batch) if isinstance(batch, dict) else {self.input_name: batch}
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feed.items()}
        images = feed[self.input_name]
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            raise ValueError(f"a calibration batch must be B x 3 x S x S images, got shape {images.shape}")
        self.images += images.shape[0]
        return feed


def calibration_batches(
    model: RACNN, data: str | Path, num_images: int, *, batch_size: int = CALIBRATION_BATCH
) -> tuple[int, Iterator[np.ndarray]]:
    """``(n, batches)``: the calibration images of ``model`` from the dataset folder ``data``: the first
    ``num_images`` of its train split (read as the model's training config reads its dataset: same dataset
    kind and validation carve-out), in a fixed order (spread over the classes as ``data.max_images`` picks
    them, seeded by ``train.seed``: the same images every time), with the evaluation preprocessing of the
    model (``model.transforms()``: no augmentation). ``n`` is how many (``num_images``, or all of the split
    when it holds fewer); ``batches`` yields them lazily, ``batch_size`` at a time, as n_b x 3 x S x S
    float32 arrays. An unreadable image stops the iteration with a ``DatasetError`` naming it.

    A folder that does not exist or holds no image (for a dataset read from files) raises a one-line
    ``DatasetError`` naming it, before anything is read."""
    from .config import apply_overrides
    from .data import GENERATED, DatasetError
    from .data.imagefolder import IMAGE_EXTENSIONS
    from .training import loaders

    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if model.training_config is None:
        raise ValueError("the model carries no training config (load it with racnn.load_model)")
    cfg = copy.deepcopy(model.training_config)
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"{data}: calibration folder not found")
    if cfg.data.name not in GENERATED and not _holds_a_file(root, IMAGE_EXTENSIONS):
        raise DatasetError(f"{data}: no images in the calibration folder")
    overrides = [f"data.root={data}", f"data.max_images={num_images}", "data.skip_bad_images=false"]
    apply_overrides(cfg, overrides)
    dataset = loaders.make_dataset(cfg, "train", model.preprocessing, train=False)
    n = len(dataset)
    if n == 0:
        raise DatasetError(f"{data}: no images in its train split to calibrate on")

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, n, batch_size):
            items = [dataset[i]["image"].numpy() for i in range(start, min(start + batch_size, n))]
            yield np.stack(items).astype(np.float32, copy=False)

    return n, batches()


def _holds_a_file(root: Path, extensions: tuple[str, ...]) -> bool:
    """Whether a file ending in one of ``extensions`` (any case) lies under ``root``; stops at the first."""
    for _, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        if any(not f.startswith(".") and f.lower().endswith(extensions) for f in files):
            return True
    return False


def stage_calibration(model: RACNN, s: int, batches: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """The calibration feeds of early exit's stage ``s`` (:mod:`racnn.early_exit`; its inputs by the names of
    :func:`racnn.onnx_export.export_stages`): each batch of images run through the float stages before it,
    so that the int8 stage is calibrated on what it will be given."""
    import torch

    from .early_exit import ScaleStage, stage_outputs

    stages = [ScaleStage(model, j).eval() for j in range(s)]
    names = ["images"] + (["x", "view_in", "logits_in", "pooled_in"] if s else [])
    for batch in batches:
        images = torch.from_numpy(np.asarray(batch, dtype=np.float32))
        state: tuple[torch.Tensor, ...] = ()
        with torch.no_grad():
            for j, stage in enumerate(stages):
                got = dict(zip(stage_outputs(j, model.cfg.num_scales), stage(images, *state), strict=True))
                state = (got["next_input"], got.get("view", got["box"]), got["logits"], got["pooled"])
        yield {n: t.numpy() for n, t in zip(names, (images, *state), strict=True)}
