"""racnn serve: the API in-process, every bad input followed by a good one, the real server on a free port,
and the page in a real headless Chromium (Debian's, driven by Playwright). The batcher: test_batcher.py."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest
import torch
from PIL import Image

import racnn
from conftest import REAL_CUB, assert_same_prediction
from racnn.checkpoint import model_record, save_checkpoint
from racnn.config import Config

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "racnnboundary"
    parts = []
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass
class Answer:
    status: int
    body: object
    headers: Message  # looked up whatever the case


def _post(url: str, files: list[tuple[str, bytes]]) -> Answer:
    """One ``POST``; an empty reply or a refused connection raises (an ``OSError``)."""
    body, ctype = _multipart(files)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return Answer(r.status, json.loads(r.read()), r.headers)
    except urllib.error.HTTPError as e:
        return Answer(e.code, json.loads(e.read()), e.headers)


# ``racnn serve`` whose forward passes wait for a file: a request is in the model for as long as a test needs,
# whatever the machine's speed. The forward is replaced in the server's own process, which then runs the CLI
# as a user does; it writes ``forward-<n>`` when a batch of n images reaches the model.
GATED_SERVE = """
import os, sys, time
from pathlib import Path
from racnn import batcher
from racnn.cli import main

gate, real = Path(os.environ["RACNN_TEST_GATE"]), batcher.forward_probs

def gated(model, batch, **options):
    (gate / f"forward-{len(batch)}").touch()
    deadline = time.monotonic() + 120  # never a hung server
    while not (gate / "open").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return real(model, batch, **options)

batcher.forward_probs = gated
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    gate: Path  # create gate / "open" to let a gated server's model go on
    log: Path  # the server's stderr


@contextmanager
def _served(tmp_path: Path, *flags: str, gated: bool = False) -> Iterator[Served]:
    """``racnn serve`` of a tiny checkpoint, as a user starts it, on a free port, once it answers; killed at the
    end if still running. Its log goes to a file (a pipe nobody reads would block it once full)."""
    cfg = Config()
    cfg.model = _model().cfg
    cfg.data.image_size = 48
    ckpt = tmp_path / "best.pt"
    save_checkpoint(model_record(_model(), cfg, CLASSES), ckpt)
    port, gate, log = _free_port(), tmp_path / "gate", tmp_path / "serve.log"
    gate.mkdir()
    args = ["serve", "--checkpoint", str(ckpt), "--port", str(port), *flags]
    cmd = [sys.executable, "-c", GATED_SERVE, *args] if gated else [sys.executable, "-m", "racnn", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RACNN_TEST_GATE": str(gate)}
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        started = lambda: _answers(f"{url}/healthz") or proc.poll() is not None  # noqa: E731
        _wait_for(started, "racnn serve did not answer", timeout=120)  # (onnxruntime: an export first)
        if proc.poll() is not None:
            pytest.fail(f"racnn serve exited: {log.read_text()}")
        yield Served(proc, url, gate, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _status(url: str) -> int:
    """The HTTP status of ``GET url``; a refused connection or an empty reply fails the test (an ``OSError``)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _not_ready(url: str) -> bool:
    """``/readyz`` answers 503 (draining): an answer over HTTP, never a refused connection."""
    return _status(f"{url}/readyz") == 503


def _connect(url: str) -> http.client.HTTPConnection:
    """A keep-alive connection to ``url``'s server."""
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)


def _post_on(conn: http.client.HTTPConnection, files: list[tuple[str, bytes]]) -> Answer:
    """``POST /predict`` on an open connection; an empty reply raises (``http.client.RemoteDisconnected``)."""
    body, ctype = _multipart(files)
    conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    return Answer(r.status, json.loads(r.read()), r.msg)


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of ``racnn serve`` of a tiny checkpoint (:func:`_served`); stopped with SIGTERM at the end. An
    indirect parameter names the backend (default: torch; onnxruntime exports the checkpoint as it starts)."""
    backend = getattr(request, "param", "torch")
    with _served(tmp_path, "--backend", backend) as s:
        yield s.url
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_the_real_server_answers_good_and_bad_requests_in_parallel(server: str) -> None:
    bad = _post(f"{server}/predict", [("a.txt", b"hello")])
    assert bad.status == 415 and "a.txt" in bad.body["error"]  # type: ignore[index]
    results: list[Answer] = [None] * 8  # type: ignore[list-item]

    def client(i: int) -> None:
        results[i] = _post(f"{server}/predict", [(f"{i}.jpg", _jpeg(60 + i, 50))])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.status == 200 for r in results)
    assert [r.body[0]["width"] for r in results] == [60 + i for i in range(8)]  # type: ignore[index]
    with urllib.request.urlopen(f"{server}/healthz") as r:
        health = json.loads(r.read())
    assert health["images"] == 8 and 1 <= health["batches"] <= 8


@pytest.mark.slow
def test_sigterm_answers_the_request_in_flight_refuses_new_ones_and_exits_0(tmp_path: Path) -> None:
    """What a process manager does to restart the service: SIGTERM while a 16-image request is in the model.
    While it drains the server still takes connections: /readyz answers 503 and /healthz 200 over HTTP, a new
    prediction and one on a keep-alive connection opened before the signal get a 503 with Retry-After (never
    a refused connection or an empty reply); the 16 images are answered 200, then the socket closes, exit 0."""
    photos = [(f"{i}.jpg", _jpeg(40 + i, 30)) for i in range(16)]
    with _served(tmp_path, gated=True) as s, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_post, f"{s.url}/predict", photos)
        _wait_for((s.gate / "forward-16").exists, "the 16 images never reached the model")
        kept = _connect(s.url)  # a keep-alive connection with a request already answered on it
        kept.request("GET", "/healthz")
        r = kept.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        s.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: _not_ready(s.url), "/readyz did not turn 503 on SIGTERM")
        again = _post_on(kept, [("kept.jpg", _jpeg())])  # the next request on the kept connection
        assert again.status == 503 and again.headers["Retry-After"] == "1"
        assert again.headers["Connection"] == "close"
        _one_line_error(again.body, "shutting down")
        kept.close()
        assert _status(f"{s.url}/healthz") == 200  # alive while draining: the liveness probe passes
        late = _post(f"{s.url}/predict", [("late.jpg", _jpeg())])
        assert late.status == 503 and late.headers["Retry-After"] == "1"
        assert late.headers["Connection"] == "close"
        _one_line_error(late.body, "shutting down")
        assert s.proc.poll() is None  # still running: the 16 images are in the model
        (s.gate / "open").touch()
        got = answer.result(timeout=60)
        assert got.status == 200 and [r["width"] for r in got.body] == [40 + i for i in range(16)]  # type: ignore[attr-defined]
        assert s.proc.wait(timeout=60) == 0
        with pytest.raises(urllib.error.URLError) as refused:  # exited: the listening socket is closed
            _status(f"{s.url}/healthz")
        assert isinstance(refused.value.reason, ConnectionRefusedError)
    assert "drained: every request received before the signal is answered" in s.log.read_text()


@pytest.mark.slow
def test_a_request_still_running_at_the_drain_deadline_gets_a_503(tmp_path: Path) -> None:
    with _served(tmp_path, "--drain-seconds", "1", gated=True) as s, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_post, f"{s.url}/predict", [("a.jpg", _jpeg())])
        _wait_for((s.gate / "forward-1").exists, "the image never reached the model")
        s.proc.send_signal(signal.SIGTERM)
        got = answer.result(timeout=60)  # the model is still held: the deadline answers
        assert got.status == 503 and got.headers["Retry-After"] == "1"
        _one_line_error(got.body, "drain deadline")
        time.sleep(0.5)
        assert s.proc.poll() is None  # the forward pass in progress cannot be interrupted: the process waits
        (s.gate / "open").touch()  # the forward pass in progress ends, then the process
        assert s.proc.wait(timeout=60) == 0


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    with _served(tmp_path, gated=True) as s, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_post, f"{s.url}/predict", [("a.jpg", _jpeg())])
        _wait_for((s.gate / "forward-1").exists, "the image never reached the model")
        s.proc.send_signal(signal.SIGINT)
        _wait_for(lambda: _not_ready(s.url), "/readyz did not turn 503 on Ctrl-C")
        assert s.proc.poll() is None  # draining: it waits for the request in the model
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=30) == 130  # the model is still held: nothing waited for it
        try:  # the request in the model fails: a 503 if it got out before the process ended, else nothing
            dropped = answer.result(timeout=60)
            assert dropped.status == 503
            _one_line_error(dropped.body, "the server is stopping")
        except (OSError, http.client.HTTPException):  # nothing, or the 503 cut short as the process ended
            pass


@pytest.mark.slow
def test_64_clients_against_a_queue_of_32(tmp_path: Path) -> None:
    """The model holds a first image; 64 clients send one image each at once: 32 fit in the queue and are
    answered once the model goes on, 32 get a 503 with Retry-After at once. /healthz answers throughout and
    /metrics counts it all."""
    paths = []
    for i in range(64):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(_jpeg(40 + i, 30 + i % 9, (4 * i, 120, 250 - 3 * i)))
    # 66 connections at once (and the probes): more than the default --max-connections of 32 + 16 + 16
    flags = ("--max-queue", "32", "--max-connections", "100")
    with _served(tmp_path, *flags, gated=True) as s, ThreadPoolExecutor(66) as pool:
        first = pool.submit(_post, f"{s.url}/predict", [("first.jpg", _jpeg())])
        _wait_for((s.gate / "forward-1").exists, "the first image never reached the model")
        live, health = threading.Event(), []

        def probe() -> None:  # /healthz, every 50 ms, while the clients run
            while not live.wait(0.05):
                health.append(_answers(f"{s.url}/healthz"))

        prober = pool.submit(probe)
        answers = [pool.submit(_post, f"{s.url}/predict", [(p.name, p.read_bytes())]) for p in paths]
        _wait_for(lambda: sum(a.done() for a in answers) >= 32, "32 clients were not refused at once")
        refused = [a.result() for a in answers if a.done()]
        assert len(refused) == 32 and all(a.status == 503 for a in refused)
        metrics = _samples(urllib.request.urlopen(f"{s.url}/metrics", timeout=10).read().decode())
        assert metrics[("racnn_queue_depth", ())] == 32
        # probed while the model is held and the queue full (a count of probes over a time would depend on
        # the machine's speed: on an idle one the answers came before the third probe)
        _wait_for(lambda: len(health) >= 3, "/healthz was not probed 3 times while the model was held")
        (s.gate / "open").touch()
        got = [a.result(timeout=120) for a in answers]
        live.set()
        prober.result(timeout=30)
        assert first.result(timeout=60).status == 200
        text = urllib.request.urlopen(f"{s.url}/metrics", timeout=10).read().decode()
    ok = [(p, a.body[0]) for p, a in zip(paths, got, strict=True) if a.status == 200]  # type: ignore[index]
    busy = [a for a in got if a.status != 200]
    assert len(ok) == 32 and len(busy) == 32 and all(a.status == 503 for a in busy)
    for a in busy:
        assert int(a.headers["Retry-After"]) >= 1
        _one_line_error(a.body, "the server is busy")
    _assert_answers_as_racnn_predict([record for _, record in ok], [p for p, _ in ok])  # each its own rows
    assert len(health) >= 3 and all(health), health
    metrics = _samples(text)
    assert metrics[("racnn_requests_total", (("path", "/predict"), ("status", "200")))] == 33
    assert metrics[("racnn_requests_total", (("path", "/predict"), ("status", "503")))] == 32
    assert metrics[("racnn_images_total", ())] == 33 == metrics[("racnn_batch_size_sum", ())]
    assert metrics[("racnn_queue_depth", ())] == 0


@pytest.mark.slow
def test_refused_uploads_get_their_503_not_a_reset(tmp_path: Path) -> None:
    """An 8 MB upload refused by a full queue, then by the drain, gets its 503 with Retry-After: the server
    reads the upload before it answers (closing on an upload still arriving would make the client's system
    reset the connection, and the client would see no answer). A client that waits for 100 Continue gets the
    503 without sending its upload. The requests received before the signal are answered 200."""
    big = [("big.jpg", _jpeg() + b"\0" * 8_000_000)]
    with _served(tmp_path, "--max-queue", "1", gated=True) as s, ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, f"{s.url}/predict", [("first.jpg", _jpeg())])
        _wait_for((s.gate / "forward-1").exists, "the first image never reached the model")
        second = pool.submit(_post, f"{s.url}/predict", [("second.jpg", _jpeg())])

        def queued() -> float:
            text = urllib.request.urlopen(f"{s.url}/metrics", timeout=10).read().decode()
            return _samples(text)[("racnn_queue_depth", ())]

        _wait_for(lambda: queued() == 1, "the second image never reached the queue")
        busy = _post(f"{s.url}/predict", big)
        assert busy.status == 503 and busy.headers["Retry-After"]
        _one_line_error(busy.body, "the server is busy")
        s.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: _not_ready(s.url), "/readyz did not turn 503 on SIGTERM")
        late = _post(f"{s.url}/predict", big)
        assert late.status == 503 and late.headers["Retry-After"] == "1"
        _one_line_error(late.body, "shutting down")
        port = urllib.parse.urlsplit(s.url).port
        with socket.create_connection(("127.0.0.1", port), timeout=30) as waiting:
            head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            waiting.sendall(f"{head}Content-Length: 8000000\r\nExpect: 100-continue\r\n\r\n".encode())
            answer = b""
            while chunk := waiting.recv(65536):  # the server closes the connection after its answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ") and b"shutting down" in answer
        (s.gate / "open").touch()
        assert first.result(timeout=60).status == 200 and second.result(timeout=60).status == 200
        assert s.proc.wait(timeout=60) == 0


@pytest.mark.slow
def test_past_max_connections_a_request_gets_a_503_at_once(tmp_path: Path) -> None:
    """--max-connections 1: a client uploading slowly holds the one connection (and up to --max-upload-mb of
    memory); a second client gets uvicorn's 503 at once, not a wait; the first is then answered 200, and once
    its connection is closed the server takes requests again."""
    with _served(tmp_path, "--max-connections", "1") as s:
        body, ctype = _multipart([("slow.jpg", _jpeg())])
        port = urllib.parse.urlsplit(s.url).port
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        )
        slow.sendall(f"{head}Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        # "100 Continue": the app reads this upload (its request took the connection, no 503)
        assert slow.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        slow.sendall(body[:200])  # the upload stalls
        other = _connect(s.url)
        other.timeout = 10  # a hang fails the test
        t0 = time.monotonic()
        other.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
        r = other.getresponse()
        assert r.status == 503 and r.read() == b"Service Unavailable" and r.getheader("Connection") == "close"
        assert time.monotonic() - t0 < 5
        other.close()
        slow.sendall(body[200:])  # the upload ends: its request is answered
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        slow.close()
        status, _, payload = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200 ") and json.loads(payload)[0]["image"] == "slow.jpg"
        _wait_for(lambda: _status(f"{s.url}/healthz") == 200, "the server did not take requests again")
        s.proc.terminate()
        assert s.proc.wait(timeout=30) == 0


# ---------------------------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser():
    """Playwright's sync API, or a skip that says why (a failure where RACNN_REQUIRE_BROWSER is set: CI)."""
    problem = None
    if CHROMIUM is None:
        problem = "no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)"
    try:
        from playwright import sync_api
    except ImportError:
        problem = problem or "playwright is not installed (pip install -e '.[dev]')"
    if problem:
        if os.environ.get("RACNN_REQUIRE_BROWSER"):
            pytest.fail(problem)
        pytest.skip(problem)
    return sync_api


def _a_bird(tmp_path: Path) -> Path:
    """A CUB photo from ../shared when there is one, else a drawn bird."""
    photos = sorted(REAL_CUB.glob("images/*/*.jpg"))
    if photos:
        return photos[0]
    from racnn.data.synthetic import render

    path = tmp_path / "bird.jpg"
    render(0, 0, "test", 0, 320)[0].save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "server", ["torch", "onnxruntime"], indirect=True
)  # the page works unchanged on either
def test_the_page_in_a_real_browser(server: str, tmp_path: Path) -> None:
    sync_api = _browser()
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    args += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        choosers: list = []
        page.on("filechooser", lambda chooser: choosers.append(chooser))  # set up before anything happens
        failed: list[str] = []  # every answer of 400 or more (the browser's own favicon.ico request too)
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(server)
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        # the keyboard opens the file chooser: Tab to the button, press Enter
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "choose"
        page.keyboard.press("Enter")
        for _ in range(100):
            if choosers:
                break
            page.wait_for_timeout(100)
        assert choosers, "Enter on the focused button opened no file chooser"
        choosers[0].set_files(str(_a_bird(tmp_path)))
        page.wait_for_selector("table[data-output='s123'] td", timeout=30_000)
        assert page.locator("svg rect.box").count() == 2  # the boxes of scales 1 and 2
        assert page.locator("canvas.crop").count() == 2  # the zoomed views of scales 2 and 3
        assert page.locator("table").count() == 5  # s1, s2, s3, s12, s123
        assert page.locator("table[data-output='s1'] tr").count() == 1 + 3  # header + top-3 of 3 classes
        assert "%" in page.inner_text("#status")
        # several photos at once, a text file among them: one card each, in the order given
        photos = []
        for i, (w, h) in enumerate([(90, 60), (50, 70), (64, 64)]):
            photos.append(tmp_path / f"photo{i}.jpg")
            photos[-1].write_bytes(_jpeg(w, h, (40 * i, 120, 200 - 50 * i)))
        (tmp_path / "readme.txt").write_text("not a bird")
        chosen = [photos[0], tmp_path / "readme.txt", photos[1], photos[2]]
        page.set_input_files("#file", [str(f) for f in chosen])
        page.wait_for_function(
            "document.querySelectorAll('.card.done, .card.failed').length === 4", timeout=30_000
        )
        cards = page.locator(".card")
        assert [cards.nth(i).get_attribute("data-image") for i in range(4)] == [
            "photo0.jpg",
            None,
            "photo1.jpg",
            "photo2.jpg",
        ]
        assert "not an image" in cards.nth(1).inner_text() and "%" in cards.nth(3).inner_text()
        assert (
            page.locator(".card.done table").count() == 3 * 5
            and page.locator(".card.done rect.box").count() == 6
        )
        assert "3 of 4 files classified" in page.inner_text("#status")
        # dropped: two photos, in the order of the drop
        drop = page.evaluate_handle(
            """async (urls) => { const dt = new DataTransfer();
                 for (const [name, url] of urls) {
                   const blob = await (await fetch(url)).blob();
                   dt.items.add(new File([blob], name, { type: "image/jpeg" }));
                 }
                 return dt; }""",
            [["b.jpg", "data:image/jpeg;base64," + base64.b64encode(_jpeg(30, 40)).decode()],
             ["a.jpg", "data:image/jpeg;base64," + base64.b64encode(_jpeg(40, 30)).decode()]],
        )  # fmt: skip
        page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
        page.wait_for_function("document.querySelectorAll('.card.done').length === 2", timeout=30_000)
        assert [cards.nth(i).get_attribute("data-image") for i in range(2)] == ["b.jpg", "a.jpg"]
        # a file that is not an image: one clear line, no result
        notes = tmp_path / "notes.txt"
        notes.write_text("not a bird")
        page.set_input_files("#file", str(notes))
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "not an image" in page.inner_text("#status")
        assert page.locator("#result").is_hidden()
        assert page.evaluate(
            "fetch('favicon.ico').then(r => r.status + ' ' + r.headers.get('content-type'))"
        ) == ("200 image/png")
        assert not failed, failed  # no 404 in the console: the favicon is served
        browser.close()
