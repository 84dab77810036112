"""Servers the project starts bind to loopback; credentials never reach the catalog, logs, artifacts or
Prefect's flow-run parameters."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError

from data_catalog.corpus_server import CorpusServer
from data_catalog.layout import Layout
from data_catalog.synth import SynthConfig, load_corpus, synthesize
from flows.download import DownloadOptions
from flows.ingest import IngestParams, ingest_flow

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000042",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-access-key-7f3a9c21b4",
    "AWS_SESSION_TOKEN": "fake-session-token-51de0c",
    "HF_TOKEN": "hf_fakeTokenValue9d8c7b6a",
}
URL_PASSWORD = "url-pass-3e8d2f"


def listeners(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def test_corpus_server_binds_loopback_by_default(tmp_path):
    with CorpusServer(tmp_path) as srv:
        host, port = urlsplit(srv.base_url).hostname, urlsplit(srv.base_url).port
        assert host == "127.0.0.1" and listeners(port) <= LOOPBACK_HEX and listeners(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_catalog.corpus_server", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert urlsplit(url).hostname == "127.0.0.1"
        assert listeners(urlsplit(url).port) == {"0100007F"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prefect_api_of_the_test_harness_binds_loopback(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    url = urlsplit(PREFECT_API_URL.value())
    assert url.hostname in ("127.0.0.1", "localhost", "::1")
    bound = listeners(url.port)
    assert bound and bound <= LOOPBACK_HEX, bound
    # Not reachable on the machine's other addresses.
    for address in {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}:
        if not address.startswith("127."):
            with pytest.raises(OSError), socket.create_connection((address, url.port), timeout=2):
                pass


def _flow_run_texts(flow_run_ids: list[str]) -> list[str]:
    """Artifacts and log lines the Prefect API holds for these flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))
    assert artifacts, "the flow published no artifact: nothing was checked"
    return [f"{a.key} {a.description} {a.data}" for a in artifacts] + [log.message for log in logs]


def _flow_run_parameters(flow_run_id: str) -> str:
    """The parameters Prefect stored for the flow run (shown in its UI), as JSON."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(flow_run_id).parameters
    assert parameters["params"]["base_url"], parameters  # the stored parameters were read
    return json.dumps(parameters, default=str)


def test_credentials_stay_out_of_catalog_logs_and_artifacts(tmp_path, monkeypatch, prefect_harness, caplog):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    corpus = tmp_path / "corpus"
    synthesize(corpus, SynthConfig(seed=2, n_pretrain=10, n_coco=12, n_vqa_images=10, n_retrieval=10))
    karpathy = corpus / load_corpus(corpus).files["coco_karpathy"]
    home = tmp_path / "var"
    caplog.set_level(logging.INFO)
    with CorpusServer(corpus) as srv:
        # A URL parameter with credentials is refused before Prefect could store it; those in the
        # environment are the way in.
        with pytest.raises(ValidationError, match="base_url") as refused:
            IngestParams(
                source="coco", base_url=srv.base_url.replace("http://", f"http://blip2:{URL_PASSWORD}@")
            )
        assert URL_PASSWORD not in str(refused.value)
        params = IngestParams(
            source="coco",
            format="karpathy",
            inputs=(karpathy,),
            base_url=(base_url := srv.base_url),
            download=DownloadOptions(
                image_size=32, samples_per_shard=50, processes=1, threads=4, timeout_s=3
            ),
            allow_loopback=True,
            home=home,
        )
        ingest_flow(params)

    from data_catalog import Catalog

    with Catalog.open(Layout(home).catalog, read_only=True) as cat:
        (run,) = cat.runs("ingest")
        assert run.params["base_url"] == base_url
    needles = [*SECRETS.values(), URL_PASSWORD]
    # Everything the pipeline wrote: catalog, manifest, shards, logs (no URL holds a credential now).
    written = [p for p in home.rglob("*") if p.is_file()]
    assert Layout(home).catalog in written and any("_logs" in p.parts for p in written)
    for path in written:
        data = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in data, f"{needle!r} found in {path}"
    texts = _flow_run_texts([run.flow_run_id]) + [_flow_run_parameters(run.flow_run_id), caplog.text]
    for text in texts:
        for needle in needles:
            assert needle not in text, f"{needle!r} found in {text[:300]!r}"
