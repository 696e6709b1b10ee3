"""One model, two engines: ``racnn predict``, ``racnn eval``, ``racnn serve`` and ``racnn.predict`` give the same
records and metrics whether eager PyTorch or onnxruntime runs the model (``--backend``; an ONNX export as
``--checkpoint``). Decisions are compared exactly, probabilities within a stated tolerance (the two engines'
kernels sum in other orders).

One real export (``racnn export --format onnx`` of a 7-class tiny model) is shared by the module.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import racnn
from conftest import assert_same_prediction
from racnn.checkpoint import CheckpointError, load_model
from racnn.cli import main
from racnn.onnx_model import OnnxRACNN
from test_cli import SEVEN, _seven_class_checkpoint, _seven_class_folder

# onnxruntime against eager PyTorch: float32 through the same network, other kernels
ENGINE_TOL = 1e-4


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(checkpoint, ONNX folder, image folder)`` of a 7-class tiny model that crops its zoomed scales from the
    40 px image (the recipe's crop_from=source)."""
    tmp = tmp_path_factory.mktemp("backend")
    _seven_class_folder(tmp / "trees")
    ckpt = _seven_class_checkpoint(tmp / "best.pt", "model.crop_from=source", "data.image_size=40")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp / "onnx")]) == 0
    return ckpt, tmp / "onnx", tmp / "trees"


def test_an_onnx_export_loads_into_onnxruntime_with_its_classes_and_config(
    release: tuple[Path, Path, Path],
) -> None:
    ckpt, folder, _ = release
    runner, model = load_model(folder), load_model(ckpt)
    assert isinstance(runner, OnnxRACNN) and runner.backend == "onnxruntime"
    assert runner.classes == model.classes == SEVEN and runner.keys == model.keys
    assert runner.image_size == model.image_size and runner.preprocessing == model.preprocessing
    assert runner.training_config.to_dict() == model.training_config.to_dict()
    x = torch.randn(3, 3, model.image_size, model.image_size)
    got, want = runner(x), model(x)
    for k in model.keys:
        torch.testing.assert_close(got.logits[k], want.logits[k], atol=ENGINE_TOL, rtol=0)
    for g, w in zip(got.views, want.views, strict=True):
        torch.testing.assert_close(g, w, atol=ENGINE_TOL, rtol=0)
    variants, expected = runner.fusion_variants(got), model.fusion_variants(want)
    assert variants.keys() == expected.keys()  # every kind, concat and weighted included
    for k in expected:
        torch.testing.assert_close(variants[k], expected[k], atol=ENGINE_TOL, rtol=0)


def test_predict_gives_the_same_records_with_either_backend(
    release: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, folder, trees = release
    records = {}
    for name, args in {
        "torch": ["--checkpoint", str(ckpt)],
        "onnx folder": ["--checkpoint", str(folder)],  # onnxruntime by default
        "checkpoint in onnxruntime": ["--checkpoint", str(ckpt), "--backend", "onnxruntime"],
    }.items():
        assert main(["predict", *args, str(trees / "test"), "--json", "--workers", "0", "--no-progress"]) == 0
        records[name] = json.loads(capsys.readouterr().out)
    want = records.pop("torch")
    assert len(want) == 2 * len(SEVEN)
    for got in records.values():
        assert [r["image"] for r in got] == [r["image"] for r in want]
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            assert_same_prediction(g["top"], w["top"], tol=ENGINE_TOL)
            for a, b in zip(g["boxes"], w["boxes"], strict=True):
                assert a["xyxy_px"] == pytest.approx(b["xyxy_px"], abs=0.05)
    runner = load_model(folder)  # the Python API takes the runner as it takes a model
    for g, w in zip(racnn.predict(runner, sorted((trees / "test").rglob("*.png"))), want, strict=True):
        assert_same_prediction(g["top"], w["top"], tol=ENGINE_TOL)


def test_eval_gives_the_same_metrics_with_either_backend(
    release: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, folder, trees = release
    base = ["eval", "--data", str(trees), "--batch-size", "4", "--tta", "flip"]
    assert main([*base, "--checkpoint", str(ckpt), "--json", str(tmp_path / "torch.json")]) == 0
    assert main([*base, "--checkpoint", str(folder), "--json", str(tmp_path / "ort.json")]) == 0
    capsys.readouterr()
    want, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("torch", "ort"))
    assert got.keys() == want.keys()  # the same schema, every fusion kind included
    for k, w in want.items():
        if k.startswith(("acc_", "top5_")) or k in ("per_class_acc", "most_confused", "num_images"):
            assert got[k] == w, k  # decisions: exactly
        elif isinstance(w, float):
            assert got[k] == pytest.approx(w, abs=ENGINE_TOL, nan_ok=True), k


def test_serve_runs_an_onnx_export(release: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer is eager torch's; with onnxruntime the decoders also preprocess (the batcher is handed
    tensors), with torch the batcher's thread does (it is handed the decoded images)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from racnn import serve

    handed: list[object] = []
    run = serve.Batcher.run

    async def recording_run(self: serve.Batcher, x: object, slot: object = None) -> object:
        handed.append(x)
        return await run(self, x, slot)  # type: ignore[arg-type]

    monkeypatch.setattr(serve.Batcher, "run", recording_run)
    ckpt, folder, trees = release
    image = sorted((trees / "test").rglob("*.png"))[0]
    upload = [("image", (image.name, image.read_bytes(), "image/png"))]
    with TestClient(serve.create_app(load_model(folder))) as client:  # type: ignore[arg-type]
        assert client.get("/info").json()["backend"] == "onnxruntime"
        got = client.post("/predict", files=upload)
    assert got.status_code == 200, got.text
    want = racnn.predict(load_model(ckpt), [image])[0]
    assert_same_prediction(got.json()[0]["top"], want["top"], tol=ENGINE_TOL)
    size = load_model(folder).image_size
    assert isinstance(handed[0], torch.Tensor) and handed[0].shape == (1, 3, size, size)
    with TestClient(serve.create_app(load_model(ckpt))) as client:  # type: ignore[arg-type]
        assert client.post("/predict", files=upload).status_code == 200
    assert isinstance(handed[1], list) and len(handed[1]) == 1


def test_backend_errors_are_one_line(
    release: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, folder, trees = release
    with pytest.raises(CheckpointError, match="an ONNX export holds no PyTorch model"):
        load_model(folder, backend="torch")
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        load_model(ckpt, backend="tvm")
    assert main(["predict", "--checkpoint", str(folder), "--device", "cuda", str(trees / "test")]) == 1
    assert "the onnxruntime backend runs on the CPU" in capsys.readouterr().err
    # an ONNX graph racnn did not export
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    assert main(["predict", "--checkpoint", str(tmp_path / "other.onnx"), str(trees / "test")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other.onnx: an ONNX graph that racnn did not export" in err, err
    # one stage of early exit is not a model
    assert main(["predict", "--checkpoint", str(folder / "stage_s2.onnx"), str(trees / "test")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage_s2.onnx: one stage of early exit" in err, err
    # a folder holding both exports: torch reads the safetensors weights
    both = tmp_path / "both"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(both)]) == 0
    (both / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    assert isinstance(load_model(both, backend="torch"), racnn.RACNN)
    assert isinstance(load_model(both), OnnxRACNN)  # the default for an ONNX export: onnxruntime


def test_a_missing_onnxruntime_names_the_pip_extra(
    release: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = builtins.__import__

    def no_onnxruntime(name: str, *args: object, **kwargs: object) -> object:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(RuntimeError, match=r"pip install 'racnn\[onnx\]'"):
        load_model(release[1])
    assert main(["predict", "--checkpoint", str(release[1]), str(release[2] / "test")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "racnn predict: error: the onnxruntime backend needs onnxruntime: pip install 'racnn[onnx]'"


def test_early_exit_runs_the_stage_graphs_as_the_eager_stages(
    release: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The export's stage graphs (stage_s1.onnx ..) give the eager stages' records: the same scales run, the
    same decisions; a folder without them is refused in one line when early exit asks for them."""
    from test_early_exit import _between

    ckpt, folder, trees = release
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.onnx",
        "stage_s1.onnx",
        "stage_s2.onnx",
        "stage_s3.onnx",
    ]
    images = sorted((trees / "test").rglob("*.png"))
    model, runner = load_model(ckpt), load_model(folder)
    p = _between(torch.tensor([r["top"]["s1"][0]["prob"] for r in racnn.predict(model, images)]))
    want = racnn.predict(model, images, exit_confidence=p)
    got = racnn.predict(runner, images, exit_confidence=p)
    assert [r["scales_run"] for r in got] == [r["scales_run"] for r in want]
    assert len({r["scales_run"] for r in want}) > 1
    for g, w in zip(got, want, strict=True):
        assert g["answered_by"] == w["answered_by"]
        assert_same_prediction(g["top"], w["top"], tol=ENGINE_TOL)
    # a checkpoint run by onnxruntime exports the stages too
    for g, w in zip(
        racnn.predict(load_model(ckpt, backend="onnxruntime"), images, exit_confidence=p), want, strict=True
    ):
        assert g["scales_run"] == w["scales_run"]
        assert_same_prediction(g["top"], w["top"], tol=ENGINE_TOL)
    (tmp_path / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())  # no stage graphs beside it
    with pytest.raises(CheckpointError, match=r"stage_s1\.onnx: not found; early exit in onnxruntime"):
        racnn.predict(load_model(tmp_path), images[:1], exit_confidence=p)
    # stages of another export beside it are refused, not run
    other = _seven_class_checkpoint(tmp_path / "other.pt", "model.crop_from=source", "data.image_size=40")
    state = torch.load(other, weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other)
    assert main(["export", "--checkpoint", str(other), "--format", "onnx", "--out", str(tmp_path / "o")]) == 0
    for f in ("stage_s1.onnx", "stage_s2.onnx", "stage_s3.onnx"):
        (tmp_path / f).write_bytes((tmp_path / "o" / f).read_bytes())
    with pytest.raises(CheckpointError, match=r"stage_s1\.onnx: a stage graph of another export"):
        racnn.predict(load_model(tmp_path), images[:1], exit_confidence=p)
