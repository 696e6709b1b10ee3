"""ONNX export: onnxruntime reproduces every PyTorch output, with a batch size other than the export's.

One real export (about 5 s) is shared by the module: ``racnn export --format onnx`` on a tiny model whose
data.image_size (40) differs from its input size (32), so the graph includes the antialiased resize.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from racnn.checkpoint import load_model, model_record, save_checkpoint  # noqa: E402
from racnn.cli import main  # noqa: E402
from racnn.config import load_config  # noqa: E402
from racnn.model import RACNN, build_model  # noqa: E402
from racnn.onnx_export import RACNNOnnxWrapper, export_onnx, output_names  # noqa: E402

NAMES = ["logits_s1", "logits_s2", "logits_s3", "logits_s12", "logits_s123", "box_s1", "box_s2"]
NAMES += ["concat_s12", "concat_s123"]
CLASSES = ["a", "b", "c", "d"]
# ModelConfig(backbone="tiny", pretrained=False, input_size=32, zoom_size=24, apn_grid=3, apn_hidden=8), 4 classes;
# the APNs pool their 2 x 2 maps to 3 x 3 (racnn.attention.adaptive_pool runs in the graphs)
OVERRIDES = ["model.backbone=tiny", "model.pretrained=false", "model.input_size=32", "model.apn_grid=3"]
OVERRIDES += ["model.apn_hidden=8", "data.image_size=40", "model.zoom_size=24"]  # scales 2, 3 at 24 px


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """``(checkpoint, release folder, stdout of racnn export --format onnx)``."""
    tmp = tmp_path_factory.mktemp("onnx")
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    ckpt = tmp / "best.pt"
    save_checkpoint(model_record(build_model(cfg.model, num_classes=4), cfg, CLASSES), ckpt)
    out = tmp / "release"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)])
    assert code == 0
    return ckpt, out, stdout.getvalue().strip()


def _check_outputs(session: ort.InferenceSession, model: RACNN, images: torch.Tensor) -> None:
    got = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want = RACNNOnnxWrapper(model)(images)
    assert len(got) == len(want) == len(NAMES)
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert g.shape == tuple(w.shape), name
        assert np.abs(g - w.numpy()).max() < 1e-4, name


def test_cli_writes_model_onnx(exported: tuple[Path, Path, str]) -> None:
    _, out, stdout = exported
    stages = ["stage_s1.onnx", "stage_s2.onnx", "stage_s3.onnx"]  # early exit's graphs (test_backend.py)
    assert stdout == f"wrote {out / 'model.onnx'} and the stage graphs of early exit: {', '.join(stages)}"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", *stages]  # weights inside, no .data file


def test_onnxruntime_matches_pytorch_with_dynamic_batch(exported: tuple[Path, Path, str]) -> None:
    ckpt, out, _ = exported
    model = load_model(ckpt)
    classes = model.classes
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape[1:] == [3, 40, 40] and isinstance(inp.shape[0], str)
    assert [o.name for o in session.get_outputs()] == NAMES == output_names(model)
    torch.manual_seed(3)
    _check_outputs(session, model, torch.randn(3, 3, 40, 40))  # exported with batch 2
    _check_outputs(session, model, torch.randn(1, 3, 40, 40))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["racnn.classes"]) == classes == CLASSES
    assert json.loads(meta["racnn.keys"]) == ["s1", "s2", "s3", "s12", "s123"]
    assert (meta["racnn.image_size"], meta["racnn.input_size"]) == ("40", "32")
    assert json.loads(meta["racnn.mean"]) == pytest.approx(list(model.preprocessing.mean))


def test_export_restores_mode_and_reports_missing_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, OVERRIDES)
    model = build_model(cfg.model, num_classes=4).train()
    seen: list[bool] = []

    def fake_export(wrapper: torch.nn.Module, *args: object, **kwargs: object) -> None:
        seen.append(wrapper.training)
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(model, tmp_path / "m.onnx")
    assert seen == [False] and model.training  # traced in eval mode, mode restored
    with pytest.raises(ValueError, match="image_size"):
        export_onnx(model, tmp_path / "m.onnx", image_size=0)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(RuntimeError, match=r"racnn\[onnx\]"):
        export_onnx(model, tmp_path / "m.onnx")


def test_cli_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path / "x.pt"), "--format", "tflite", "--out", str(tmp_path)])


def test_export_traces_the_gather_crop_of_a_compile_crop_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``runtime.compile_crop`` is an execution option: the exported forward runs the gather crop
    (``crop_zoom_gather``), whose graph the exporter can read."""
    import racnn.crop_cpp as crop_cpp_module

    def never(*args: object) -> torch.Tensor:
        raise AssertionError("the compiled crop or the C++ kernel ran inside the export")

    monkeypatch.setattr(crop_cpp_module, "crop_zoom_compiled", never)  # CUDA
    monkeypatch.setattr(crop_cpp_module, "crop_zoom_cpp", never)  # CPU
    model = build_model(load_config(None, OVERRIDES).model, num_classes=4)
    model.compile_crop = True
    path = export_onnx(model, tmp_path / "m.onnx", image_size=40)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert (ops.count("GatherElements"), ops.count("GridSample")) == (
        8,
        0,
    )  # 2 crops: 2 row + 2 column gathers
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 40, 40)
    got = session.run(None, {"images": images.numpy()})
    monkeypatch.setattr(crop_cpp_module, "crop_zoom_cpp", crop_cpp_module.crop_zoom)  # eager, same values
    with torch.no_grad():
        want = RACNNOnnxWrapper(model.eval())(images)
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w.numpy()).max() < 1e-4


@pytest.mark.parametrize("fusion", ["mean_logprob", "weighted"])
def test_the_configured_fusion_is_what_the_graph_fuses(tmp_path: Path, fusion: str) -> None:
    """The fused outputs of the graph are the model's fusion (model.fusion), fitted weights included."""
    cfg = load_config(None, [*OVERRIDES, f"model.fusion={fusion}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=4).eval()
    with torch.no_grad():
        model.fusion_weights.copy_(torch.tensor([[0.9, 0.1, 0.0], [0.2, 1.5, 0.3]]))  # as if fitted
    path = export_onnx(model, tmp_path / "m.onnx", image_size=40)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert (ops.count("GatherElements"), ops.count("GridSample")) == (
        8,
        0,
    )  # 2 crops: 2 row + 2 column gathers
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    _check_outputs(session, model, images)
    with torch.no_grad():
        out = model(images)
    want = model.fusion_variants(out)[f"s123_{fusion}"]
    got = session.run(["logits_s123"], {"images": images.numpy()})[0]
    assert np.abs(got - want.numpy()).max() < 1e-4


def test_a_map_apn_model_exports(tmp_path: Path) -> None:
    """``model.apn_kind=map``: the box rule (soft-argmax and spread over the map's cells) runs in the graph."""
    cfg = load_config(None, [*OVERRIDES, "model.apn_kind=map"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=4).eval()
    with torch.no_grad():
        for apn in model.apns:  # off their initial values, so a wrong parameter would show
            apn.gain.uniform_(0.5, 1.5)
            apn.side.copy_(torch.tensor([0.3, 1.5]))
    path = export_onnx(model, tmp_path / "m.onnx", image_size=40)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == 0  # the int8 export quantizes MatMuls: the rule, in float, has none
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _check_outputs(session, model, torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(2)))
