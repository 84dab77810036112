"""Download-time address checks: the guard the img2dataset processes install, and ingest end to end."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_catalog import Catalog
from data_catalog.corpus_server import CorpusServer
from data_catalog.layout import Layout
from data_catalog.synth import SynthConfig, synthesize, url_manifest
from flows.address_guard import install_address_guard, remove_address_guard
from flows.download import DownloadOptions
from flows.ingest import IngestParams, ingest_flow


@pytest.fixture()
def guard():
    yield install_address_guard
    remove_address_guard()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard-corpus")
    synthesize(root, SynthConfig(seed=11, n_pretrain=24, n_coco=0, n_vqa_images=0, n_retrieval=0))
    return root


def test_guard_refuses_resolved_loopback_unless_opted_in(corpus, guard):
    with CorpusServer(corpus) as srv:
        url = srv.base_url.replace("127.0.0.1", "localhost") + "corpus.json"  # a name, resolved on connect
        assert urllib.request.urlopen(url, timeout=5).status == 200  # no guard yet
        guard(allow_loopback=False)
        with pytest.raises(urllib.error.URLError, match=r"blocked address \(loopback\): localhost"):
            urllib.request.urlopen(url, timeout=5)
        guard(allow_loopback=True)
        assert urllib.request.urlopen(url, timeout=5).status == 200
        guard(allow_loopback=False)
        with pytest.raises(urllib.error.URLError, match="blocked address"):
            urllib.request.urlopen(srv.base_url + "corpus.json", timeout=5)


class _RedirectToFtp(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", "ftp://example.org/x.jpg")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_guard_refuses_redirects_to_other_schemes(guard):
    server = http.server.HTTPServer(("127.0.0.1", 0), _RedirectToFtp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        guard(allow_loopback=True)
        with pytest.raises(OSError, match="blocked scheme"):
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/x.jpg", timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def _options() -> DownloadOptions:
    return DownloadOptions(image_size=32, samples_per_shard=100, processes=1, threads=8, timeout_s=3.0)


def test_ingest_refuses_internal_addresses_by_reason(corpus, tmp_path, prefect_harness):
    home = tmp_path / "var"
    with CorpusServer(corpus) as srv:
        manifest = url_manifest(corpus, srv.base_url, "pretrain", out=tmp_path / "urls.parquet")
        rows = pq.read_table(manifest.path).to_pylist()[:6]
        by_name = [{**r, "url": r["url"].replace("127.0.0.1", "localhost")} for r in rows[:4]]
        literals = [
            {**rows[4], "url": rows[4]["url"]},  # 127.0.0.1: refused while the manifest is built
            {**rows[5], "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"},
        ]
        src = tmp_path / "mixed.parquet"
        pq.write_table(pa.Table.from_pylist(by_name + literals), src)
        refused = ingest_flow(IngestParams(source="web", inputs=(src,), download=_options(), home=home))

        # Opted in: loopback is fetched, link-local still refused, and a decompression bomb is refused
        # from its header (image_too_large), not decoded.
        huge = {**rows[0], "url": srv.base_url + "fault/huge/" + rows[0]["path"]}
        src2 = tmp_path / "local.parquet"
        pq.write_table(pa.Table.from_pylist(by_name + literals + [huge]), src2)
        params = IngestParams(
            source="local", inputs=(src2,), download=_options(), allow_loopback=True, home=home
        )
        local = ingest_flow(params)

    assert refused.dropped == {"blocked_link_local": 1, "blocked_loopback": 1}
    assert (refused.samples_ok, refused.failures) == (0, {"blocked_loopback": 4})
    assert local.dropped == {"blocked_link_local": 1}
    assert local.samples_ok == 5 and local.failures == {"image_too_large": 1}
    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        failed = cat.failed_samples("web")
    assert {f.reason for f in failed} == {"blocked_loopback"}
    assert all("localhost resolves to 127.0.0.1" in f.message for f in failed)
