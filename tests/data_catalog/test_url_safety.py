"""Refused download addresses and unsafe sample keys in the manifest builder (no network)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blip2_core.fileio import UnsafeKeyError, check_sample_key
from data_catalog.adapters import ManifestOptions, build_manifest
from data_catalog.failures import classify_error, failure_reason_case_sql
from data_catalog.url_safety import address_category, blocked_message, literal_host_refusal


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"),
        ("127.3.4.5", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("10.1.2.3", "private"),
        ("172.16.0.9", "private"),
        ("192.168.1.1", "private"),
        ("fd00::5", "private"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "reserved"),  # carrier-grade NAT: not global
        ("240.0.0.1", "private"),  # reserved by IANA; Python counts it as private
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
        ("example.com", None),  # names are checked once resolved, at download time
    ],
)
def test_address_categories(address, category):
    assert address_category(address) == category


def test_literal_hosts_and_the_loopback_opt_in():
    assert literal_host_refusal("http://169.254.169.254/latest/meta-data/") == "blocked_link_local"
    assert literal_host_refusal("http://user:pw@[::1]:8080/x.jpg") == "blocked_loopback"
    assert literal_host_refusal("http://127.0.0.1:9/x.jpg", allow_loopback=True) is None
    assert literal_host_refusal("http://10.0.0.1/x.jpg", allow_loopback=True) == "blocked_private"
    assert literal_host_refusal("https://images.example.org/a.jpg") is None


def test_a_refused_connection_has_its_own_failure_reason_in_python_and_sql():
    import duckdb

    message = f"<urlopen error {blocked_message('rebind.example', '10.0.0.7', 'private')}>"
    assert classify_error(message) == "blocked_private"
    assert classify_error("<urlopen error [Errno 111] Connection refused>") == "connection_refused"
    sql = f"SELECT {failure_reason_case_sql('m')} FROM (SELECT ? AS m)"
    assert duckdb.execute(sql, [message]).fetchone()[0] == "blocked_private"


def test_manifest_drops_refused_literals_and_unsafe_keys_by_reason(tmp_path):
    rows = [
        ("https://images.example.org/1.jpg", "ok", "a"),
        ("http://127.0.0.1:8000/2.jpg", "loopback", "b"),
        ("http://[::1]/3.jpg", "loopback v6", "c"),
        ("http://169.254.169.254/latest/meta-data/iam", "metadata", "d"),
        ("http://10.0.0.8/5.jpg", "private", "e"),
        ("http://224.0.0.1/6.jpg", "multicast", "f"),
        ("ftp://images.example.org/7.jpg", "scheme", "g"),
        ("gopher://127.0.0.1/8", "scheme first", "h"),
        ("https://images.example.org/9.jpg", "climbs", "../../etc/passwd"),
        ("https://images.example.org/10.jpg", "absolute", "/etc/passwd"),
        ("https://img.example.org/11.jpg", "name, resolved later", "k"),
    ]
    src = tmp_path / "urls.parquet"
    pq.write_table(
        pa.table(
            {k: list(v) for k, v in zip(("url", "caption", "key"), zip(*rows, strict=True), strict=True)}
        ),
        src,
    )

    report = build_manifest("parquet", [src], tmp_path / "m")
    assert report.dropped == {
        "bad_scheme": 2,
        "blocked_link_local": 1,
        "blocked_loopback": 2,
        "blocked_multicast": 1,
        "blocked_private": 1,
        "unsafe_key": 2,
    }
    kept = pq.read_table(report.parts[0]).column("key").to_pylist()
    assert kept == ["a", "k"]

    opted_in = build_manifest("parquet", [src], tmp_path / "m2", options=ManifestOptions(allow_loopback=True))
    assert "blocked_loopback" not in opted_in.dropped
    assert opted_in.dropped["blocked_link_local"] == 1  # the opt-in is loopback only
    assert opted_in.n_out == 4


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\\..\\x", "", "a\x00b", ".."])
def test_unsafe_sample_keys_are_refused(key):
    with pytest.raises(UnsafeKeyError):
        check_sample_key(key)


def test_safe_sample_keys_pass():
    for key in ("000010003", "part-1/000010003", "a..b", "./x"):
        assert check_sample_key(key) == key
