"""benchmarks/speed.py runs end to end on a tiny model and writes the keys issue 4 names; ``--config`` fills
what the flags leave unset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark

speed = load_benchmark("speed")
TINY = ["--backbone", "tiny", "--input-size", "32", "--batch-size", "2", "--warmup", "0", "--iters", "2"]
TINY += ["--crop-shape", "2,48,24", "--crop-iters", "2", "--threads", "1"]


def test_speed_benchmark_writes_the_headline_keys(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    res = speed.main([*TINY, "--skip", "memory,loader", "--json", str(out)])
    written = json.loads(out.read_text())
    for key in ("train_ratio", "train_ratio_attend", "infer_ratio", "crop_speedup"):
        assert isinstance(written[key], float) and written[key] > 0, key
        assert written[key] == res[key]
    assert written["memory_ratio"] is None and written["loader_over_train"] is None  # skipped, not invented
    assert written["config"]["backbone"] == "tiny" and written["machine"]["threads"] == 1


def test_config_fills_what_the_flags_leave_unset(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    model = "model:\n  backbone: tiny\n  num_scales: 2\n  apn_hidden: 8\n  input_size: 48\n"
    cfg.write_text(model + "  checkpoint_activations: true\n  pretrained: false\n")
    args = speed.parse_args(["--config", str(cfg), "--input-size", "32"])
    assert (args.backbone, args.scales, args.input_size, args.image_size) == ("tiny", 2, 32, 32)
    assert args.ckpt is True and args.pretrained is False  # store_true flags left unset: the config's
    bench = speed.Bench(args, speed.torch.device("cpu"))
    assert bench.cfg.model.apn_hidden == 8 and bench.n == 2  # the config's own keys reach the model
    plain = speed.parse_args([])
    assert (plain.backbone, plain.scales, plain.input_size) == ("mobilenet_v2", 3, 224)
    assert plain.ckpt is False and plain.pretrained is False


def test_zoom_size_reaches_the_model_and_the_limit() -> None:
    """``--zoom-size``: the paper's 448 then 224; the limit's ready inputs take every scale's own side."""
    args = speed.parse_args([*TINY, "--input-size", "48", "--zoom-size", "32", "--scales", "3"])
    bench = speed.Bench(args, speed.torch.device("cpu"))
    assert bench.cfg.model.zoom_size == 32 and bench.model.scale_sizes == [48, 32, 32]
    assert [x.shape[-1] for x in bench.ready] == [48, 32, 32]
    assert speed.Bench(speed.parse_args(TINY), speed.torch.device("cpu")).cfg.model.zoom_size is None
    bench.racnn_step("attend")  # runs end to end
    bench.limit_step("classify")


@pytest.mark.slow
def test_compile_crop_times_the_compiled_crop_too(tmp_path: Path) -> None:
    """``--compile-crop``: ``runtime.compile_crop``, and the crop section times the crop it runs on this device
    (on a CPU the C++ kernel)."""
    args = speed.parse_args([*TINY, "--compile-crop"])
    assert speed.Bench(args, speed.torch.device("cpu")).cfg.runtime.compile_crop is True
    assert speed.parse_args(TINY).compile_crop is False
    res = speed.main([*TINY, "--compile-crop", "--skip", "train,infer,memory,loader"])
    assert isinstance(res["crop_speedup_compiled"], float) and res["crop_speedup_compiled"] > 0
    assert {"compiled_box", "compiled_img"} <= set(res["crop"]["median_s"])
    assert res["crop"]["compiled_impl"] == "C++ kernel"
    assert speed.main([*TINY, "--skip", "train,infer,memory,loader"])["crop_speedup_compiled"] is None
