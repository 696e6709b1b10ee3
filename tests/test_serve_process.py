"""racnn serve as a real process on a free port: requests in parallel, SIGTERM and Ctrl-C, the drain's deadline,
overload (a full queue, refused uploads, too many connections), and the page in a real headless Chromium
(Debian's, driven by Playwright)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from conftest import REAL_CUB
from racnn.checkpoint import model_record, save_checkpoint
from racnn.config import Config

pytest.importorskip("fastapi", reason="racnn serve needs the serve extra: pip install 'racnn[serve]'")

from test_serve import (
    CLASSES,
    _assert_answers_as_racnn_predict,
    _jpeg,
    _model,
    _one_line_error,
    _samples,
    _wait_for,
)


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
