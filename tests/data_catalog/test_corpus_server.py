"""The loopback corpus server: files, fault routes, path escapes, concurrency, the PID-file process."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from data_catalog.corpus_server import HUGE_SIDE, NOT_AN_IMAGE, CorpusServer
from data_catalog.synth import FaultSpec, SynthConfig, synthesize, url_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("served")
    (base / "secret.txt").write_text("outside the root")
    root = base / "root"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "images" / "red.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def server(root):
    with CorpusServer(root) as srv:
        yield srv


def get(url: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers["Content-Type"], r.read()


def test_serves_files_on_loopback(server, root):
    assert server.base_url.startswith("http://127.0.0.1:")
    status, kind, body = get(server.base_url + "images/red.jpg")
    assert (status, kind, body) == (200, "image/jpeg", (root / "images" / "red.jpg").read_bytes())
    with pytest.raises(urllib.error.HTTPError) as err:
        get(server.base_url + "images/missing.jpg")
    assert err.value.code == 404


@pytest.mark.parametrize(("route", "code"), [("fault/404/", 404), ("fault/500/", 500)])
def test_http_error_routes(server, route, code):
    with pytest.raises(urllib.error.HTTPError) as err:
        get(server.base_url + route + "images/red.jpg")
    assert err.value.code == code


def test_slow_route_times_out_a_short_client_and_serves_a_patient_one(server, root):
    with pytest.raises((TimeoutError, urllib.error.URLError)) as err:
        get(server.base_url + "fault/slow/3/images/red.jpg", timeout=0.3)
    assert "timed out" in str(err.value)
    started = time.monotonic()
    assert (
        get(server.base_url + "fault/slow/0.2/images/red.jpg")[2]
        == (root / "images" / "red.jpg").read_bytes()
    )
    assert time.monotonic() - started >= 0.2


def test_notimage_route_sends_html_as_jpeg(server):
    status, kind, body = get(server.base_url + "fault/notimage/images/red.jpg")
    assert (status, kind, body) == (200, "image/jpeg", NOT_AN_IMAGE)
    with pytest.raises(OSError, match="cannot identify image file"):
        Image.open(io.BytesIO(body))


def test_truncated_route_cuts_the_jpeg_in_half(server, root):
    full = (root / "images" / "red.jpg").read_bytes()
    body = get(server.base_url + "fault/truncated/images/red.jpg")[2]
    assert full.startswith(body) and len(body) < len(full)
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(body)).load()


def test_huge_route_is_a_small_decompression_bomb(server):
    status, kind, body = get(server.base_url + "fault/huge/images/red.jpg")
    assert (status, kind) == (200, "image/png") and len(body) < 200_000
    assert struct.unpack(">II", body[16:24]) == (HUGE_SIDE, HUGE_SIDE)  # the IHDR width and height
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert Image.open(io.BytesIO(body)).size == (HUGE_SIDE, HUGE_SIDE)


@pytest.mark.parametrize("path", ["/../secret.txt", "/images/../../secret.txt", "/%2e%2e/secret.txt"])
def test_paths_escaping_the_root_are_refused(server, path):
    host, port = server.base_url[len("http://") :].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", path)  # sent as is: urllib would not normalise it either
    response = conn.getresponse()
    assert response.status == 403 and b"outside" not in response.read()
    conn.close()


def test_many_concurrent_requests(server, root):
    expected = (root / "images" / "red.jpg").read_bytes()
    with ThreadPoolExecutor(max_workers=48) as pool:
        bodies = list(pool.map(lambda _: get(server.base_url + "images/red.jpg")[2], range(200)))
    assert bodies == [expected] * 200


def test_runs_as_a_process_stopped_by_pid(root, tmp_path):
    pid_file = tmp_path / "server.pid"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "data_catalog.corpus_server",
        str(root),
        "--port",
        "0",
        "--pid-file",
        str(pid_file),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        base_url = proc.stdout.readline().strip()
        assert get(base_url + "images/red.jpg")[0] == 200
        pid = int(pid_file.read_text())
        assert pid == proc.pid
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_injected_fault_fails_as_recorded(tmp_path):
    cfg = SynthConfig(seed=5, n_pretrain=12, n_coco=0, n_vqa_images=0, n_retrieval=0, image_size=32)
    info = synthesize(tmp_path / "corpus", cfg)
    spec = FaultSpec(http_404=1, http_500=1, timeout=1, connection_refused=1, not_an_image=1,
                     truncated_image=1, image_too_large=1, slow_seconds=3)  # fmt: skip
    with CorpusServer(info.root) as srv:
        urls = url_manifest(info.root, srv.base_url, faults=spec)
        outcomes = {f["fault"]: outcome(f["url"]) for f in json.loads(urls.faults_path.read_text())["faults"]}
    assert outcomes == {
        "http_404": "HTTP 404",
        "http_500": "HTTP 500",
        "timeout": "timed out",
        "connection_refused": "refused",
        "not_an_image": "cannot identify image file",
        "truncated_image": "image file is truncated",
        "image_too_large": "decompression bomb",
    }


def outcome(url: str) -> str:
    """What a downloader sees: the HTTP error, the socket error, or what PIL says about the bytes."""
    try:
        body = get(url, timeout=0.5)[2]
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (TimeoutError, urllib.error.URLError) as err:
        return "refused" if "refused" in str(err) else "timed out" if "timed out" in str(err) else str(err)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            Image.open(io.BytesIO(body)).load()
        except Image.DecompressionBombWarning:
            return "decompression bomb"
        except OSError as err:
            return "image file is truncated" if "truncated" in str(err) else "cannot identify image file"
    return "ok"
