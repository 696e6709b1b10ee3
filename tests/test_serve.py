"""racnn serve in-process: the API, every bad input followed by a good one, deadlines, the drain, metrics and
limits. The real server on a free port and the page in a browser: test_serve_process.py; the batcher:
test_batcher.py."""

from __future__ import annotations

import io
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

import racnn
from conftest import assert_same_prediction

pytest.importorskip("fastapi", reason="racnn serve needs the serve extra: pip install 'racnn[serve]'")
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from racnn import batcher, serve

CLASSES = ["001.Red_bird", "002.Blue_bird", "003.Green_bird"]


def _model() -> racnn.RACNN:
    torch.manual_seed(0)
    return racnn.create_model(
        "tiny", num_classes=3, input_size=32, apn_grid=2, apn_hidden=8, classes=CLASSES, image_size=48
    )


def _jpeg(w: int = 80, h: int = 60, colour: tuple[int, int, int] = (150, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "JPEG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def _client(**limits: float) -> TestClient:
    return TestClient(serve.create_app(_model(), limits=serve.ServeLimits(**limits)))  # type: ignore[arg-type]


def _assert_answers_as_racnn_predict(got: list[dict], files: list[Path]) -> None:
    """The server's records are those of ``racnn.predict`` on the same files, in the same order."""
    want = racnn.predict(_model(), files)
    for g, w in zip(got, want, strict=True):
        assert g["image"] == Path(w["image"]).name and (g["width"], g["height"]) == (w["width"], w["height"])
        assert len(g["top"]["s123"]) == 3
        assert_same_prediction(g["top"], w["top"])  # the server's batches are other sizes: PROB_TOL
        assert [b["scale"] for b in g["boxes"]] == [1, 2]
        for a, b in zip(g["boxes"], w["boxes"], strict=True):
            assert a["xyxy_px"] == pytest.approx(b["xyxy_px"], abs=0.11)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a ``/metrics`` answer, read by prometheus_client's own parser: (name, labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _one_line_error(body: object, needle: str) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert needle in body["error"] and "\n" not in body["error"], body


def test_info_healthz_and_page() -> None:
    with _client() as c:
        assert c.get("/healthz").json() == {"status": "ok", "batches": 0, "images": 0, "forward_ms": {}}
        info = c.get("/info").json()
        assert info["classes"] == CLASSES and info["backbone"] == "tiny" and info["num_scales"] == 3
        assert info["scale_sizes"] == [32, 32, 32] and info["image_size"] == 48
        assert info["outputs"] == ["s1", "s2", "s3", "s12", "s123"] and info["max_upload_bytes"] == 20 * 2**20
        limits = {k: info[k] for k in ("max_pixels", "max_images", "topk", "max_queue", "timeout_seconds")}
        assert limits == {
            "max_pixels": 40_000_000,
            "max_images": 32,
            "topk": 5,
            "max_queue": 64,
            "timeout_seconds": 30.0,
        }
        assert info["max_connections"] == 64 + 16 + 16  # the default: the queue, a batch and 16 more
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<script>" in page.text and "http" not in page.text.replace("http://www.w3.org/2000/svg", "")


def test_predict_answers_what_racnn_predict_answers(tmp_path: Path) -> None:
    files = []
    for i, colour in enumerate([(150, 40, 40), (40, 40, 150)]):
        path = tmp_path / f"bird{i}.jpg"
        path.write_bytes(_jpeg(colour=colour))
        files.append(path)
    with _client() as c:
        r = c.post("/predict", files=[("image", (p.name, p.read_bytes(), "image/jpeg")) for p in files])
        assert r.status_code == 200
        got = r.json()
        health = c.get("/healthz").json()
    assert [g["image"] for g in got] == ["bird0.jpg", "bird1.jpg"]
    assert [(g["width"], g["height"]) for g in got] == [(80, 60)] * 2
    _assert_answers_as_racnn_predict(got, files)
    assert {k: health[k] for k in ("batches", "images")} == {
        "batches": 1,
        "images": 2,
    }  # one request, one batch
    assert list(health["forward_ms"]) == ["2"] and health["forward_ms"]["2"] > 0


def test_every_bad_input_is_a_4xx_and_the_server_goes_on() -> None:
    good = ("image", ("ok.jpg", _jpeg(), "image/jpeg"))
    with _client(max_upload_bytes=50_000, max_pixels=10_000_000) as c:
        cases = [
            ({"files": [("image", ("notes.txt", b"not an image at all", "text/plain"))]}, 415, "notes.txt:"),
            (
                {"files": [("image", ("cut.jpg", _jpeg()[:300], "image/jpeg"))]},
                400,
                "cut.jpg: cannot read image",
            ),
            (
                {"files": [("image", ("bomb.png", _png_claiming(40_000, 40_000), "image/png"))]},
                413,
                "bomb.png:",
            ),
            ({"files": [("image", ("big.jpg", b"\xff" * 60_000, "image/jpeg"))]}, 413, "over the limit of"),
            ({"files": [("image", ("empty.jpg", b"", "image/jpeg"))]}, 400, "empty.jpg: empty file"),
            ({"files": [("photo", ("ok.jpg", _jpeg(), "image/jpeg"))]}, 400, "no image"),
            ({"files": [good] * 33}, 413, "more than 32 images in one request"),
            ({}, 400, "multipart/form-data"),
            ({"data": {"image": "a string, not a file"}}, 400, "multipart/form-data"),
        ]
        for kwargs, status, needle in cases:
            r = c.post("/predict", **kwargs)
            assert r.status_code == status, (needle, r.text)
            body = r.json()
            assert set(body) == {"error"} and needle in body["error"] and "\n" not in body["error"]

        # a chunked upload (no Content-Length) is counted as it arrives and stopped at the limit
        def chunks():
            yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="huge.jpg"\r\n\r\n'
            for _ in range(100):
                yield b"\xff" * 1000

        r = c.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "over the limit of" in r.json()["error"]
        assert c.post("/predict", files=[good]).status_code == 200  # still serving
        assert c.get("/healthz").json()["images"] == 1


def test_photos_are_turned_upright_by_their_exif_orientation() -> None:
    """A phone photo stored sideways with an EXIF orientation tag: the server answers (sizes and boxes) in the
    orientation a browser shows, so the page's boxes fall where the model looked."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (80, 60), (120, 60, 30)).save(buf, "JPEG", exif=exif)
    with _client() as c:
        rec = c.post("/predict", files=[("image", ("phone.jpg", buf.getvalue(), "image/jpeg"))]).json()[0]
    assert (rec["width"], rec["height"]) == (60, 80)


def test_unknown_paths_and_methods_are_one_line_json_errors() -> None:
    with _client() as c:
        r = c.get("/nowhere")
        assert r.status_code == 404
        _one_line_error(r.json(), "not found: GET /nowhere")
        r = c.get("/predict")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        _one_line_error(r.json(), "method not allowed: GET /predict (allowed: POST)")


def test_metrics_parse_and_count_what_was_sent() -> None:
    jpeg = ("image", ("a.jpg", _jpeg(), "image/jpeg"))
    with _client() as c:
        for n in (1, 2, 1):
            assert c.post("/predict", files=[jpeg] * n).status_code == 200
        assert c.post("/predict", files=[("image", ("a.txt", b"text", "text/plain"))]).status_code == 415
        assert c.get("/nowhere").status_code == 404 and c.get("/healthz").status_code == 200
        health = c.get("/healthz").json()
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    got = _samples(r.text)

    def requests(path: str, status: int) -> float:
        return got[("racnn_requests_total", (("path", path), ("status", str(status))))]

    assert requests("/predict", 200) == 3 and requests("/predict", 415) == 1
    assert requests("other", 404) == 1 and requests("/healthz", 200) == 2
    assert ("racnn_requests_total", (("path", "/nowhere"), ("status", "404"))) not in got
    assert got[("racnn_request_seconds_count", (("path", "/predict"),))] == 4
    assert got[("racnn_images_total", ())] == 4 == health["images"]
    assert got[("racnn_batch_size_count", ())] == health["batches"] and got[("racnn_batch_size_sum", ())] == 4
    assert got[("racnn_forward_seconds_count", ())] == health["batches"]
    assert got[("racnn_forward_seconds_sum", ())] > 0 and got[("racnn_queue_depth", ())] == 0
    assert got[("process_resident_memory_bytes", ())] > 10 * 2**20  # the server process's own RSS


def test_a_request_past_its_deadline_gets_a_504_and_leaves_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Request A's forward pass is held; B waits in the queue behind it. Both get a 504 at the deadline, and B's
    images are not run once the model is free: they left the queue with B."""
    release, calls = threading.Event(), []
    real = batcher.forward_probs

    def held(model, batch, **options):  # every forward pass waits until released (at most 30 s)
        calls.append(len(batch))
        release.wait(30)
        return real(model, batch, **options)

    monkeypatch.setattr(batcher, "forward_probs", held)
    jpeg = ("image", ("a.jpg", _jpeg(), "image/jpeg"))
    with _client(timeout_s=0.5) as c, ThreadPoolExecutor(2) as pool:
        a = pool.submit(c.post, "/predict", files=[jpeg])
        _wait_for(lambda: calls == [1], "request A never reached the model")
        b = pool.submit(c.post, "/predict", files=[jpeg, jpeg])
        for r in (a.result(timeout=30), b.result(timeout=30)):
            assert r.status_code == 504
            _one_line_error(r.json(), "no answer within 0.5 s")
        assert _samples(c.get("/metrics").text)[("racnn_queue_depth", ())] == 0
        release.set()
        assert c.post("/predict", files=[jpeg]).status_code == 200
    assert calls == [1, 1]  # A, then the last request; B's two images never ran


def test_a_drain_answers_what_was_received_and_refuses_new_predictions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request is in the model when the drain starts: /readyz turns 503, /healthz stays 200, a new prediction
    gets a 503 with Retry-After; the request received before is answered 200, and only then is the drain done.
    Every answer during the drain closes its connection."""
    release, calls = threading.Event(), []
    real = batcher.forward_probs

    def held(model, batch, **options):
        calls.append(len(batch))
        release.wait(30)
        return real(model, batch, **options)

    monkeypatch.setattr(batcher, "forward_probs", held)
    jpeg = ("image", ("a.jpg", _jpeg(), "image/jpeg"))
    app = serve.create_app(_model())
    drain = app.state.drain
    with TestClient(app) as c, ThreadPoolExecutor(1) as pool:
        r = c.get("/readyz")
        assert r.json() == {"status": "ready"} and r.headers.get("connection") != "close"
        first = pool.submit(c.post, "/predict", files=[jpeg])
        _wait_for(lambda: calls == [1], "the first request never reached the model")
        c.portal.call(drain.start, 60.0)  # what SIGTERM does, in the app's event loop
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["connection"] == "close"
        _one_line_error(r.json(), "shutting down")
        r = c.get("/healthz")
        assert r.status_code == 200 and r.headers["connection"] == "close"  # liveness is not readiness
        r = c.post("/predict", files=[jpeg])
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
        _one_line_error(r.json(), "shutting down")
        assert drain.active == 1 and not drain.answered.done()  # the first request still runs
        release.set()
        got = first.result(timeout=30)
        assert got.status_code == 200 and got.json()[0]["image"] == "a.jpg"
        assert got.headers["connection"] == "close"
        _wait_for(drain.answered.done, "the drain did not end once the first request was answered")
        assert calls == [1]  # the refused request never reached the model


def test_a_drain_with_nothing_in_flight_is_done_at_once() -> None:
    app = serve.create_app(_model())
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        c.portal.call(app.state.drain.start, 60.0)
        assert app.state.drain.answered.done()


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--drain-seconds", "inf", "--drain-seconds must be a finite number, 0 or more, not inf"),
        ("--drain-seconds", "nan", "--drain-seconds must be a finite number, 0 or more, not nan"),
        ("--drain-seconds", "-1", "--drain-seconds must be a finite number, 0 or more, not -1.0"),
        ("--timeout-seconds", "inf", "--timeout-seconds must be a finite number, more than 0, not inf"),
        ("--timeout-seconds", "nan", "--timeout-seconds must be a finite number, more than 0, not nan"),
        ("--timeout-seconds", "0", "--timeout-seconds must be a finite number, more than 0, not 0.0"),
        ("--max-upload-mb", "inf", "--max-upload-mb must be a finite number, more than 0, not inf"),
        ("--max-queue", "0", "--max-queue must be at least 1, not 0"),
        ("--max-connections", "0", "--max-connections must be at least 1, not 0"),
    ],
)
def test_serve_flags_out_of_range_fail_at_once_in_one_line(
    flag: str, value: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before the model loads (the checkpoint does not even exist): one line, exit code 1."""
    from racnn.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), flag, value]) == 1
    err = capsys.readouterr().err
    assert err == f"racnn serve: error: {needle}\n"


def test_serve_and_its_limits_refuse_non_finite_seconds() -> None:
    for seconds in (math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="drain_seconds must be a finite number of seconds"):
            serve.serve(_model(), host="127.0.0.1", port=1, device="cpu", limits=serve.ServeLimits(),
                        drain_seconds=seconds)  # fmt: skip
    for seconds in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match="timeout_s must be a finite number of seconds, more than 0"):
            serve.ServeLimits(timeout_s=seconds)
    with pytest.raises(ValueError, match="max_connections must be at least 1"):
        serve.ServeLimits(max_connections=0)
    assert serve.ServeLimits(max_queue=8, max_batch=4).connections == 28
    assert serve.ServeLimits(max_connections=5).connections == 5


def _wait_for(condition: Callable[[], bool], failure: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(failure)
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ real server
