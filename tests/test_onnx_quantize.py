"""int8 ONNX export: ``racnn export --format onnx --quantize int8 --calibrate DATA`` writes one model.onnx
that onnxruntime runs like the fp32 graph (same input, outputs and names, dynamic batch) and that says how it was
quantized; its predictions stay close to the fp32 ones; bad flags and calibration folders fail in one line.

One real export (a few seconds) is shared by the module: the tiny model of test_onnx.py (data.image_size 40,
input size 32: the graph resizes), calibrated on 12 noise images of an ImageFolder tree. Its fp32 reference is
the PyTorch model, which the fp32 graph reproduces within 1e-4 (test_onnx.py).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from racnn.checkpoint import load_model, model_record, save_checkpoint  # noqa: E402
from racnn.cli import main  # noqa: E402
from racnn.config import load_config  # noqa: E402
from racnn.data import DatasetError  # noqa: E402
from racnn.model import build_model  # noqa: E402
from racnn.onnx_export import RACNNOnnxWrapper, output_names  # noqa: E402
from racnn.onnx_quantize import (  # noqa: E402
    DEFAULT_CALIBRATION_IMAGES,
    calibration_batches,
    quantize_onnx,
    quantized_nodes,
)

NAMES = ["logits_s1", "logits_s2", "logits_s3", "logits_s12", "logits_s123", "box_s1", "box_s2", "concat_s12"]
NAMES += ["concat_s123"]
CLASSES = ["a", "b", "c", "d"]
OVERRIDES = ["model.backbone=tiny", "model.pretrained=false", "model.input_size=32", "model.apn_grid=3"]
OVERRIDES += ["model.apn_hidden=8", "data.image_size=40", "model.zoom_size=24"]  # as test_onnx.py: APNs pool
OVERRIDES += ["data.name=imagefolder", "data.num_workers=0"]
PER_CLASS = 5  # 4 train + 1 carved into val (data.val_fraction 0.1) per class: 16 train images
N_CALIBRATION = 12
# int8 against fp32 on this model, 200 such images: logits (spread 0.06 to 0.2) within 0.017, boxes within 1e-3
LOGIT_TOL, BOX_TOL = 0.04, 0.01


def _noise_image(rng: np.random.Generator) -> Image.Image:
    """A 48 x 40 picture: a random colour with noise on it (the images of every calibration and test here)."""
    base = rng.integers(0, 256, (1, 1, 3))
    noise = rng.integers(-60, 60, (40, 48, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(checkpoint, data)``: a tiny model whose training config reads an ImageFolder tree, and that tree."""
    tmp = tmp_path_factory.mktemp("int8")
    rng = np.random.default_rng(0)
    data = tmp / "data"
    for c in CLASSES:
        (data / "train" / c).mkdir(parents=True)
        for i in range(PER_CLASS):
            _noise_image(rng).save(data / "train" / c / f"{i}.png")
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    ckpt = tmp / "best.pt"
    save_checkpoint(model_record(build_model(cfg.model, num_classes=4), cfg, CLASSES), ckpt)
    return ckpt, data


@pytest.fixture(scope="module")
def quantized(setup: tuple[Path, Path]) -> tuple[Path, str]:
    """``(the exported model.onnx, stdout of racnn export --format onnx --quantize int8)``."""
    ckpt, data = setup
    out = ckpt.parent / "release"
    args = ["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--quantize", "int8"]
    args += ["--calibrate", str(data), "--calibration-images", str(N_CALIBRATION)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    return out / "model.onnx", stdout.getvalue().strip()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_cli_writes_one_int8_model_onnx_that_records_its_calibration(
    setup: tuple[Path, Path], quantized: tuple[Path, str]
) -> None:
    ckpt, data = setup
    path, stdout = quantized
    stages = ["stage_s1.onnx", "stage_s2.onnx", "stage_s3.onnx"]  # early exit's, int8 too
    names = ", ".join(stages)
    assert stdout == f"wrote {path} and {names} (int8, calibrated on {N_CALIBRATION} images of {data} train)"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", *stages]  # no fp32 graph, no temp
    for stage in stages:
        assert _session(path.parent / stage).get_modelmeta().custom_metadata_map["racnn.quantized"] == "int8"
    meta = _session(path).get_modelmeta().custom_metadata_map
    assert meta["racnn.quantized"] == "int8"
    assert json.loads(meta["racnn.calibrated_on"]) == {"data": str(data), "split": "train"}
    assert meta["racnn.calibration_images"] == str(N_CALIBRATION)
    # the fp32 graph's record, unchanged
    model = load_model(ckpt)
    assert meta["racnn.format"] == "racnn-onnx-v1"
    assert json.loads(meta["racnn.classes"]) == CLASSES
    assert json.loads(meta["racnn.keys"]) == list(model.keys)
    assert (meta["racnn.image_size"], meta["racnn.input_size"]) == ("40", "32")
    assert json.loads(meta["racnn.std"]) == pytest.approx(list(model.preprocessing.std))


def test_graph_is_qdq_with_the_crop_resize_and_boxes_in_float(quantized: tuple[Path, str]) -> None:
    graph = onnx.load(str(quantized[0])).graph
    ops = [n.op_type for n in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # each crop: two gathers of rows, two of columns (racnn.attention.crop_zoom_gather), no GridSample;
    # each APN's pooling of its 2 x 2 map to 3 x 3: one MatMul (racnn.attention.adaptive_pool)
    counts = [ops.count(op) for op in ("Conv", "Gemm", "MatMul", "GatherElements", "GridSample", "Resize")]
    assert counts == [12, 9, 2, 8, 0, 1]
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    made_by = {out: n for n in graph.node for out in n.output}

    def dequantized(name: str) -> bool:
        return name in made_by and made_by[name].op_type == "DequantizeLinear"

    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):  # int8 weights (dequantized), an int8-rounded input
            weight = made_by[node.input[1]]
            assert weight.op_type == "DequantizeLinear" and weight.input[0] in int8
            assert dequantized(node.input[0])
        if node.op_type in ("Resize", "GatherElements"):  # the resize, the crops: float ops on float tensors
            assert not any(dequantized(i) for i in node.input)
    outputs = [o.name for o in graph.output]  # logits out of float sums, boxes out of float arithmetic
    assert not any(dequantized(o) for o in outputs) and not any(o in int8 for o in outputs)


def test_the_trunks_activations_and_residual_additions_are_quantized_the_box_arithmetic_is_not() -> None:
    """A MobileNetV2-like block (conv, clip, conv, conv, residual add) then an APN-like FC and box arithmetic
    (sigmoid, add of a constant, clamp, relu): the convs, the FC, the conv's clip and the residual add are
    chosen; what reads the FC's float output or a constant is not."""
    h = onnx.helper
    nodes = [
        h.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
        h.make_node("Clip", ["c0", "lo", "hi"], ["a0"], name="clip0"),
        h.make_node("Conv", ["a0", "w1"], ["c1"], name="conv1"),
        h.make_node("Conv", ["c1", "w2"], ["c2"], name="conv2"),
        h.make_node("Add", ["c2", "a0"], ["r"], name="residual"),
        h.make_node("Relu", ["r"], ["ar"], name="relu_trunk"),
        h.make_node("Gemm", ["ar", "wf"], ["f"], name="fc"),
        h.make_node("Sigmoid", ["f"], ["s"], name="sigmoid"),
        h.make_node("Add", ["s", "half"], ["b"], name="box_add"),
        h.make_node("Clip", ["b", "lo", "hi"], ["bc"], name="box_clip"),
        h.make_node("Relu", ["bc"], ["out"], name="box_relu"),
        h.make_node("Add", ["ar", "x"], ["mixed"], name="reads_the_input"),
        # a ResNet-18 stem and first block: the max-pool's output is the block's identity
        h.make_node("Conv", ["x", "w3"], ["c3"], name="stem"),
        h.make_node("Relu", ["c3"], ["a3"], name="stem_relu"),
        h.make_node("MaxPool", ["a3"], ["p3"], name="pool"),
        h.make_node("Conv", ["p3", "w4"], ["c4"], name="block_conv"),
        h.make_node("Add", ["c4", "p3"], ["r4"], name="block_add"),
        h.make_node("Relu", ["r4"], ["a4"], name="block_relu"),
    ]
    graph = h.make_graph(nodes, "g", [], [])
    trunk = {"conv0", "clip0", "conv1", "conv2", "residual", "relu_trunk", "fc"}
    resnet = {"stem", "stem_relu", "pool", "block_conv", "block_add", "block_relu"}
    assert quantized_nodes(graph) == trunk | resnet


def test_onnxruntime_runs_every_conv_of_the_int8_graph_in_int8(
    quantized: tuple[Path, str], tmp_path: Path
) -> None:
    """In the graph onnxruntime builds from the file, every convolution is a ``QLinearConv`` with its
    activation folded in: no conv or ReLU left in float between quantize/dequantize pairs (with int8
    activations onnxruntime's uint8 conversion left convs of MobileNetV2 in float)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(quantized[0]), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 12 and "Conv" not in ops and "FusedConv" not in ops
    assert "Relu" not in ops


def test_onnxruntime_runs_it_with_a_dynamic_batch_and_the_fp32_output_names(
    setup: tuple[Path, Path], quantized: tuple[Path, str]
) -> None:
    model = load_model(setup[0])
    session = _session(quantized[0])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape[1:] == [3, 40, 40] and isinstance(inp.shape[0], str)
    assert [o.name for o in session.get_outputs()] == NAMES == output_names(model)
    for batch in (3, 1):
        got = session.run(None, {"images": np.zeros((batch, 3, 40, 40), np.float32)})
        assert [g.shape for g in got] == [(batch, 4)] * 5 + [(batch, 3)] * 2 + [(batch, 4)] * 2  # + concat


def test_int8_predictions_stay_close_to_fp32(setup: tuple[Path, Path], quantized: tuple[Path, str]) -> None:
    """Fresh images like the calibration ones (other seeds): the fused top-1 agrees on most, logits and boxes
    within a loose tolerance of the fp32 model's (int8 rounding of every conv and FC)."""
    model = load_model(setup[0])
    session = _session(quantized[0])
    transform = model.transforms()
    rng = np.random.default_rng(1)
    images = torch.stack([transform(_noise_image(rng)) for _ in range(24)])
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = [w.numpy() for w in RACNNOnnxWrapper(model)(images)]
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert np.abs(g - w).max() < (BOX_TOL if name.startswith("box") else LOGIT_TOL), name
    agree = (got[4].argmax(1) == want[4].argmax(1)).mean()  # logits_s123: the fused output
    assert agree >= 0.75


def test_calibration_images_are_the_first_n_of_the_train_split_always_the_same(
    setup: tuple[Path, Path],
) -> None:
    ckpt, data = setup
    model = load_model(ckpt)
    n, batches = calibration_batches(model, data, 5, batch_size=2)
    first = list(batches)
    assert n == 5 and [b.shape for b in first] == [(2, 3, 40, 40), (2, 3, 40, 40), (1, 3, 40, 40)]
    _, again = calibration_batches(model, data, 5, batch_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    n, batches = calibration_batches(model, data, DEFAULT_CALIBRATION_IMAGES)  # more than the split holds
    assert (n, sum(len(b) for b in batches)) == (4 * (PER_CLASS - 1), 4 * (PER_CLASS - 1))
    assert model.training_config.data.root is None  # the model's own config is left as it was


def test_quantize_onnx_refuses_empty_misshapen_or_miscounted_calibration(
    quantized: tuple[Path, str], tmp_path: Path
) -> None:
    graph = quantized[0]  # any racnn graph will do: the calibration is what fails
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="no calibration images"):
        quantize_onnx(graph, out, [], calibrated_on="x", num_images=1)
    with pytest.raises(ValueError, match="B x 3 x S x S"):
        quantize_onnx(graph, out, [np.zeros((3, 40, 40))], calibrated_on="x", num_images=1)
    batch = np.zeros((1, 3, 40, 40), np.float32)
    with pytest.raises(ValueError, match="held 1 images, not the 2 stated"):  # the record would be wrong
        quantize_onnx(graph, out, [batch], calibrated_on="x", num_images=2)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--quantize", "int8", "--calibrate", "{data}"],
            "--quantize int8 quantizes an ONNX graph: pass --format onnx",
        ),
        (["--format", "onnx", "--quantize", "int8"], "--quantize int8 needs --calibrate DATA"),
        (["--format", "onnx", "--calibrate", "{data}"], "--calibrate calibrates a quantized export"),
        (["--calibration-images", "8"], "--calibration-images calibrates a quantized export"),
        (
            ["--format", "onnx", "--quantize", "int8", "--calibrate", "{data}", "--calibration-images", "0"],
            "--calibration-images must be at least 1, not 0",
        ),
        (
            ["--format", "onnx", "--quantize", "int8", "--calibrate", "{missing}"],
            "{missing}: calibration folder not found",
        ),
        (
            ["--format", "onnx", "--quantize", "int8", "--calibrate", "{empty}"],
            "{empty}: no images in the calibration folder",
        ),
    ],
)
def test_bad_flags_and_calibration_folders_fail_in_one_line(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    ckpt, data = setup
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)  # folders and a text file, no image
    (empty / "train" / "a" / "notes.txt").write_text("no images here\n")
    paths = {"data": str(data), "missing": str(tmp_path / "missing"), "empty": str(empty)}
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), *(x.format(**paths) for x in args)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (1, 2) and err.count("\n") == 1
    assert err.startswith("racnn export: error: ") and message.format(**paths) in err
    assert not out.exists()


def test_an_empty_train_split_is_a_dataset_error_naming_the_folder(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    """Images exist, but none in the train split's class folders (only in test): nothing to calibrate on."""
    ckpt, _ = setup
    data = tmp_path / "d"
    (data / "train" / "a").mkdir(parents=True)
    (data / "test" / "a").mkdir(parents=True)
    _noise_image(np.random.default_rng(0)).save(data / "test" / "a" / "0.png")
    with pytest.raises(DatasetError, match=f"{data}: no images in its train split"):
        calibration_batches(load_model(ckpt), data, 4)


def test_help_states_the_default_number_of_calibration_images(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert f"(default: {DEFAULT_CALIBRATION_IMAGES})" in " ".join(capsys.readouterr().out.split())


def test_the_int8_export_runs_early_exit_like_the_float_model(
    setup: tuple[Path, Path], quantized: tuple[Path, str]
) -> None:
    """The int8 stages (each calibrated on what the float stages before it give) reproduce the int8 model at a
    threshold of 1, and stop every image at scale 1 at a threshold of 0."""
    import racnn

    runner = load_model(quantized[0].parent)
    assert runner.quantized == "int8"
    rng = np.random.default_rng(5)
    images = [_noise_image(rng) for _ in range(6)]
    full = racnn.predict(runner, images)
    staged = racnn.predict(runner, images, exit_confidence=1.0)
    for g, w in zip(staged, full, strict=True):
        assert g["scales_run"] == 3 and list(g["top"]) == list(w["top"])
        for key in w["top"]:  # the same network in other graphs: int8 rounding may differ, a little
            assert abs(g["top"][key][0]["prob"] - w["top"][key][0]["prob"]) < 0.05, key
    assert {r["scales_run"] for r in racnn.predict(runner, images, exit_confidence=0.0)} == {1}
