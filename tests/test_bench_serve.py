"""benchmarks/serve.py end to end on a tiny checkpoint: the figures and the targets it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import load_benchmark

pytest.importorskip("fastapi", reason="racnn serve needs the serve extra: pip install 'racnn[serve]'")
bench = load_benchmark("serve")


@pytest.mark.slow
def test_serve_benchmark_writes_latency_throughput_and_targets(tmp_path: Path) -> None:
    import racnn
    from racnn.checkpoint import model_record, save_checkpoint
    from racnn.config import Config

    model = racnn.create_model(
        "tiny", num_classes=3, input_size=32, apn_grid=2, apn_hidden=8, classes=["a", "b", "c"]
    )
    cfg = Config()
    cfg.model, cfg.data.image_size = model.cfg, model.image_size
    ckpt = tmp_path / "m.pt"
    save_checkpoint(model_record(model, cfg, ["a", "b", "c"]), ckpt)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 120)).save(images / f"{i}.jpg")
    out = tmp_path / "serve.json"
    args = [
        "--checkpoint",
        str(ckpt),
        "--images",
        str(images),
        "--requests",
        "3",
        "--many",
        "2",
        "--iters",
        "3",
        "--memory-requests",
        "12",
        "--memory-first",
        "4",
    ]
    res = bench.main([*args, "--threads", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    assert not any(a.startswith("/") for a in written["command"].split())  # paths relative to where it ran
    assert written["one_client"]["requests"] == 3 and written["many_clients"]["requests"] == 6
    for row in ("one_client", "many_clients"):
        assert 0 < written[row]["p50_s"] <= written[row]["p95_s"] and written[row]["images_per_s"] > 0
    assert written["forward_batch1_s"] > 0 and written["batches"]["images"] == 3 + 3 + 6  # warm-up included
    assert "1" in written["server_forward_ms"] and written["model_throughput_ratio"] > 0
    assert set(written["targets"]) == {
        "p50_at_one_client",
        "throughput_at_many",
        "memory_after_many_requests",
    }
    mem = written["memory"]  # what the 2,000-request run of benchmarks/results/serve_cpu.json records
    fields = {"requests", "first", "rss_mb_after_first", "rss_mb_after_all", "ratio", "target", "met"}
    assert set(mem) == fields
    assert (mem["requests"], mem["first"]) == (12, 4) and mem["rss_mb_after_first"] > 10
    assert mem["rss_mb_after_all"] > 10 and mem["target"] == 1.1
    assert mem["ratio"] == pytest.approx(mem["rss_mb_after_all"] / mem["rss_mb_after_first"], rel=1e-9)
    assert mem["met"] is (mem["ratio"] <= 1.1)
    target = written["targets"]["memory_after_many_requests"]
    assert target["value"] == round(mem["ratio"], 3) and target["met"] is mem["met"]
    assert target["rule"] == "RSS after 12 requests in a row <= 1.1 x after the first 4"
    assert res["p50_over_forward"] == pytest.approx(
        written["one_client"]["p50_s"] / written["forward_batch1_s"]
    )
