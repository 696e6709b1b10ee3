"""benchmarks/ort_profile.py: onnxruntime's profile of a graph, summed by operator type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_benchmark

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
bench = load_benchmark("ort_profile")


def test_a_conv_relu_graph_is_profiled_by_operator_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = onnx.helper
    weight = onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = h.make_graph(
        [h.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["out"])],
        "g",
        [h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [h.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", 4, 16, 16])],
        [weight],
    )
    path = tmp_path / "g.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    got = bench.profile(path, threads=1, runs=2)
    ops = got["ops"]
    # onnxruntime fuses the ReLU into the convolution (FusedConv) or keeps both: one conv node either way
    assert sum(v["nodes"] for op, v in ops.items() if "Conv" in op) == 1
    assert all(v["ms"] >= 0 for v in ops.values()) and got["ms_per_run"] > 0
    assert bench.main([str(path), "--runs", "1"]) == 0
    assert "ms a run, batch 1, 1 thread(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such file"):
        bench.main([str(tmp_path / "missing.onnx")])
