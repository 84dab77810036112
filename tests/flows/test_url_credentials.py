"""URL parameters carrying credentials are refused before Prefect could store them as flow-run parameters."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from data_catalog.url_safety import url_credentials
from flows.capfilt import CapFiltParams, RankerParams
from flows.cli import main
from flows.ingest import IngestParams

SECRET = "s3cr3t-value-9f1c"
REFUSED = {
    "user and password": f"https://alice:{SECRET}@images.example.org/coco/",
    "user only (a token)": f"https://{SECRET}@images.example.org/coco/",
    "S3 presigned (SigV4)": "https://b.s3.amazonaws.com/coco/?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential=AKIA%2F20260101&X-Amz-Signature={SECRET}",
    "S3 presigned (SigV2)": f"https://b.s3.amazonaws.com/coco/?AWSAccessKeyId=AKIA&Signature={SECRET}",
    "S3 session token": f"https://b.s3.amazonaws.com/coco/?X-Amz-Security-Token={SECRET}",
    "GCS signed URL": f"https://storage.googleapis.com/b/coco/?X-Goog-Signature={SECRET}",
    "Azure SAS": f"https://acct.blob.core.windows.net/coco/?sv=2022-11-02&sp=r&sig={SECRET}",
    "API token": f"https://images.example.org/coco/?access_token={SECRET}",
}


@pytest.mark.parametrize("url", REFUSED.values(), ids=REFUSED.keys())
def test_ingest_base_url_with_credentials_is_refused_naming_the_field(url):
    with pytest.raises(ValidationError) as err:
        IngestParams(source="coco", format="karpathy", base_url=url)
    text = str(err.value)
    assert "base_url\n  the URL carries credentials" in text  # pydantic: the field, then the problem
    assert "Prefect block or the environment" in text
    assert SECRET not in text  # the error itself would end up in logs


def test_urls_without_credentials_pass():
    for url in (
        "https://images.example.org/coco/",
        "http://127.0.0.1:8000/val2014/",
        "https://images.example.org/coco/?v=2&size=large&keyword=cat",
    ):
        assert IngestParams(source="coco", base_url=url).base_url == url
    assert url_credentials("https://images.example.org/a@b.jpg") == []  # an @ in the path is not userinfo


def test_credentials_are_named_without_their_values():
    found = url_credentials(REFUSED["S3 presigned (SigV4)"].replace("https://", f"https://k:{SECRET}@"))
    assert found == [
        "user:password@",
        "query parameter 'x-amz-credential'",
        "query parameter 'x-amz-signature'",
    ]


def test_capfilt_ray_address_with_credentials_is_refused(tmp_path):
    common = dict(sources=("web",), captioner=tmp_path, ranker=RankerParams(weights=tmp_path / "w"))
    with pytest.raises(ValidationError, match="ray_address\n  the URL carries credentials") as err:
        CapFiltParams(**common, engine="ray", ray_address=f"ray://admin:{SECRET}@head:10001")
    assert SECRET not in str(err.value)
    assert CapFiltParams(**common, engine="ray", ray_address="ray://head:10001").ray_address


def test_cli_refuses_without_echoing_the_credential(capsys, tmp_path):
    home = tmp_path / "var"
    code = main(["ingest", "--source", "coco", "--base-url", REFUSED["Azure SAS"], "--home", str(home)])
    err = capsys.readouterr().err
    assert code == 2 and "base_url: the URL carries credentials (query parameter 'sig')" in err
    assert SECRET not in err
    assert not home.exists()


def _server_check(flow, parameters: dict) -> None:
    """What the Prefect server does before it creates (and stores) a deployment's flow run."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    schema = parameter_schema(flow).model_dump_for_openapi()
    validate(parameters, schema, raise_on_error=True)


@pytest.mark.parametrize("url", REFUSED.values(), ids=REFUSED.keys())
def test_the_prefect_server_refuses_a_deployment_run_with_credentials_in_a_url(url):
    from prefect.utilities.schema_tools.validation import ValidationError as SchemaError

    from flows.capfilt import capfilt_flow
    from flows.ingest import ingest_flow

    with pytest.raises(SchemaError, match=r"params\.base_url"):
        _server_check(ingest_flow, {"params": {"source": "coco", "base_url": url}})
    ray_url = url.replace("https://", "ray://")
    capfilt = {"sources": ["web"], "captioner": "c", "ranker": {"weights": "w"}, "ray_address": ray_url}
    with pytest.raises(SchemaError, match=r"params\.ray_address"):
        _server_check(capfilt_flow, {"params": capfilt})
    clean = "https://images.example.org/coco/?v=2&keyword=cat"
    _server_check(ingest_flow, {"params": {"source": "coco", "base_url": clean}})
    _server_check(ingest_flow, {"params": {"source": "coco", "base_url": None}})
    _server_check(capfilt_flow, {"params": {**capfilt, "ray_address": "ray://head:10001"}})
