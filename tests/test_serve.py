"""racnn serve: the API in-process, the batcher, every bad input followed by a good one, the real server on a
free port, and the page in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import racnn
from conftest import REAL_CUB
from racnn.checkpoint import model_record, save_checkpoint
from racnn.config import Config

pytest.importorskip("fastapi", reason="racnn serve needs the serve extra: pip install 'racnn[serve]'")
from fastapi.testclient import TestClient

from racnn import serve

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


def _client(**limits: int) -> TestClient:
    return TestClient(serve.create_app(_model(), limits=serve.ServeLimits(**limits)))


def test_info_healthz_and_page() -> None:
    with _client() as c:
        assert c.get("/healthz").json() == {"status": "ok", "batches": 0, "images": 0, "forward_ms": {}}
        info = c.get("/info").json()
        assert info["classes"] == CLASSES and info["backbone"] == "tiny" and info["num_scales"] == 3
        assert info["scale_sizes"] == [32, 32, 32] and info["image_size"] == 48
        assert info["outputs"] == ["s1", "s2", "s3", "s12", "s123"] and info["max_upload_bytes"] == 20 * 2**20
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
    want = racnn.predict(_model(), files)
    assert [g["image"] for g in got] == ["bird0.jpg", "bird1.jpg"]
    for g, w in zip(got, want, strict=True):
        assert (g["width"], g["height"]) == (w["width"], w["height"]) == (80, 60)
        assert list(g["top"]) == list(w["top"]) and len(g["top"]["s123"]) == 3
        for key in g["top"]:
            assert [e["class"] for e in g["top"][key]] == [e["class"] for e in w["top"][key]]
            for a, b in zip(g["top"][key], w["top"][key], strict=True):
                assert a["prob"] == pytest.approx(b["prob"], abs=1e-5)
        assert [b["scale"] for b in g["boxes"]] == [1, 2]
        for a, b in zip(g["boxes"], w["boxes"], strict=True):
            assert a["xyxy_px"] == pytest.approx(b["xyxy_px"], abs=0.11)
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


def test_the_batcher_runs_what_waits_as_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a batch runs, the requests that arrive queue up; the next batch takes them all (one forward
    pass), and each request gets its own rows back."""
    release, calls = threading.Event(), []
    real = serve.forward_probs

    def slow(model, batch):  # the first batch waits until released
        calls.append(len(batch))
        if len(calls) == 1:
            release.wait(10)
        return real(model, batch)

    monkeypatch.setattr(serve, "forward_probs", slow)
    model = _model().eval()
    xs = [torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(n)) for n in (1, 2, 1, 3)]

    async def scenario() -> list:
        batcher = serve.Batcher(model, torch.device("cpu"), max_batch=16)
        batcher.start()
        first = asyncio.create_task(batcher.run(xs[0]))
        await asyncio.sleep(0.2)  # the first batch is running (and blocked)
        rest = [asyncio.create_task(batcher.run(x)) for x in xs[1:]]
        await asyncio.sleep(0.2)
        release.set()
        out = await asyncio.gather(first, *rest)
        await batcher.stop()
        return out

    out = asyncio.run(scenario())
    assert calls == [1, 6]  # the three waiting requests ran as one batch of 2 + 1 + 3 images
    for x, (probs, views) in zip(xs, out, strict=True):
        want, want_views = real(model, x)
        assert all(torch.allclose(probs[k], want[k], atol=1e-5) for k in want)
        assert len(views) == 2 and torch.allclose(views[0], want_views[0], atol=1e-5)


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    model = _model().eval()

    async def scenario() -> tuple[list, object]:
        batcher = serve.Batcher(model, torch.device("cpu"), max_batch=16)
        batcher.start()
        # two requests of different sides cannot be stacked into one batch: both fail, nothing hangs
        bad = await asyncio.gather(
            batcher.run(torch.zeros(1, 3, 48, 48)),
            batcher.run(torch.zeros(1, 3, 40, 40)),
            return_exceptions=True,
        )
        good = await asyncio.wait_for(batcher.run(torch.zeros(2, 3, 48, 48)), 30)
        await batcher.stop()
        return bad, good

    bad, (probs, views) = asyncio.run(scenario())
    assert any(isinstance(b, Exception) for b in bad)
    assert probs["s123"].shape == (2, 3) and len(views) == 2


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


def _post(url: str, files: list[tuple[str, bytes]]) -> tuple[int, object]:
    body, ctype = _multipart(files)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(tmp_path: Path):
    """``racnn serve`` of a tiny checkpoint, as a user starts it, on a free port: yields its URL."""
    cfg = Config()
    cfg.model = _model().cfg
    cfg.data.image_size = 48
    ckpt = tmp_path / "best.pt"
    save_checkpoint(model_record(_model(), cfg, CLASSES), ckpt)
    port = _free_port()
    cmd = [sys.executable, "-m", "racnn", "serve", "--checkpoint", str(ckpt), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"racnn serve exited: {proc.stderr.read()}")  # type: ignore[union-attr]
            time.sleep(0.2)
    else:
        pytest.fail("racnn serve did not answer in time")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_the_real_server_answers_good_and_bad_requests_in_parallel(server: str) -> None:
    status, body = _post(f"{server}/predict", [("a.txt", b"hello")])
    assert status == 415 and "a.txt" in body["error"]  # type: ignore[index]
    results: list[tuple[int, object]] = [None] * 8  # type: ignore[list-item]

    def client(i: int) -> None:
        results[i] = _post(f"{server}/predict", [(f"{i}.jpg", _jpeg(60 + i, 50))])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(status == 200 for status, _ in results)
    assert [body[0]["width"] for _, body in results] == [60 + i for i in range(8)]  # type: ignore[index]
    with urllib.request.urlopen(f"{server}/healthz") as r:
        health = json.loads(r.read())
    assert health["images"] == 8 and 1 <= health["batches"] <= 8


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
def test_the_page_in_a_real_browser(server: str, tmp_path: Path) -> None:
    sync_api = _browser()
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    args += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        choosers: list = []
        page.on("filechooser", lambda chooser: choosers.append(chooser))  # set up before anything happens
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
        # a file that is not an image: one clear line, no result
        notes = tmp_path / "notes.txt"
        notes.write_text("not a bird")
        page.set_input_files("#file", str(notes))
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "not an image" in page.inner_text("#status")
        assert page.locator("#result").is_hidden()
        browser.close()


def test_main_thread_executor_fails_a_call_and_goes_on_but_stops_on_ctrl_c() -> None:
    """An error in one call fails that request only; Ctrl-C during a call fails it and stops the loop
    (``racnn serve`` then shuts the web server down), instead of being swallowed as a request error."""
    ex = serve.MainThreadExecutor()

    def interrupted() -> None:
        raise KeyboardInterrupt

    bad, ok, stop = ex.submit(lambda: 1 / 0), ex.submit(lambda: 42), ex.submit(interrupted)
    later = ex.submit(lambda: 7)
    checks = iter(range(10))  # a bound, so a swallowed Ctrl-C fails the test instead of hanging it
    with pytest.raises(KeyboardInterrupt):
        ex.run_while(lambda: next(checks, None) is not None)
    assert isinstance(bad.exception(), ZeroDivisionError) and ok.result() == 42
    assert isinstance(stop.exception(), RuntimeError) and not later.done()
