"""The failure classifier: each message kind, and the SQL macro agreeing with the Python function."""

import duckdb
import pytest

from data_catalog.failures import (
    FAILURE_PATTERNS,
    OTHER,
    REASONS,
    classify_error,
    failure_reason_case_sql,
    failure_reason_macro_sql,
)

# Messages as urllib, socket, ssl, OpenCV and PIL phrase them (img2dataset stores str(exception)).
MESSAGES = {
    "HTTP Error 404: Not Found": "http_404",
    "HTTP Error 403: Forbidden": "http_4xx",
    "HTTP Error 429: Too Many Requests": "http_4xx",
    "HTTP Error 500: Internal Server Error": "http_5xx",
    "HTTP Error 503: Service Unavailable": "http_5xx",
    "The read operation timed out": "timeout",
    "timed out": "timeout",
    "<urlopen error timed out>": "timeout",
    "<urlopen error [Errno 110] Connection timed out>": "timeout",
    "<urlopen error _ssl.c:990: The handshake operation timed out>": "timeout",
    "<urlopen error [Errno 111] Connection refused>": "connection_refused",
    "[Errno 104] Connection reset by peer": "connection_reset",
    "Remote end closed connection without response": "connection_reset",
    "<urlopen error [Errno -2] Name or service not known>": "unreachable_host",
    "<urlopen error [Errno -3] Temporary failure in name resolution>": "unreachable_host",
    "<urlopen error [Errno 113] No route to host>": "unreachable_host",
    "<urlopen error [Errno 101] Network is unreachable>": "unreachable_host",
    "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
    "certificate (_ssl.c:1006)>": "ssl_error",
    "unknown url type: 'ftp'": "invalid_url",
    "Use of image disallowed by X-Robots-Tag directive": "disallowed_by_robots",
    "hash mismatch": "hash_mismatch",
    "cannot identify image file <_io.BytesIO object at 0x7f00deadbeef>": "not_an_image",
    "Image decoding error": "not_an_image",
    "image file is truncated (12 bytes not processed)": "truncated_image",
    "broken data stream when reading image file": "truncated_image",
    "Truncated File Read": "truncated_image",
    "Image size (200000000 pixels) exceeds limit of 178956970 pixels, "
    "could be decompression bomb DOS attack.": "image_too_large",
    "image area too large": "image_too_large",
    "image too small": "image_too_small",
    "aspect ratio too large": "bad_aspect_ratio",
    "duplicate url": "duplicate_url",
    "<urlopen error blocked address (unspecified): a.test resolves to 0.0.0.0, ...>": "blocked_unspecified",
    "<urlopen error blocked address (loopback): a.test resolves to 127.0.0.1, ...>": "blocked_loopback",
    "<urlopen error blocked address (link_local): a.test resolves to 169.254.169.254>": "blocked_link_local",
    "<urlopen error blocked address (multicast): a.test resolves to 224.0.0.1, ...>": "blocked_multicast",
    "<urlopen error blocked address (private): a.test resolves to 10.0.0.1, ...>": "blocked_private",
    "<urlopen error blocked address (reserved): a.test resolves to 100.64.0.1, ...>": "blocked_reserved",
    "blocked scheme: redirect from http://a.test/x.jpg to a ftp:// URL": "blocked_scheme",
    "[Errno 28] No space left on device": "disk_full",
    "something nobody has seen before": OTHER,
    "": OTHER,
}


@pytest.mark.parametrize(("message", "reason"), MESSAGES.items())
def test_classify_error_names_each_message_kind(message, reason):
    assert classify_error(message) == reason


def test_classify_error_is_case_insensitive_and_handles_none():
    assert classify_error("http error 404: not found") == "http_404"
    assert classify_error(None) == OTHER


def test_every_reason_is_exercised_by_a_message():
    assert set(MESSAGES.values()) == set(REASONS)


def test_sql_macro_agrees_with_python_on_every_message():
    messages = [*MESSAGES, None, "it's got a quote", "HTTP Error 4044"]
    con = duckdb.connect()
    con.execute(failure_reason_macro_sql())
    rows = con.execute("SELECT m, failure_reason(m) FROM unnest($m) AS t(m)", {"m": messages}).fetchall()
    assert {m: reason for m, reason in rows} == {m: classify_error(m) for m in messages}


def test_case_expression_agrees_on_a_column():
    con = duckdb.connect()
    con.execute("CREATE TABLE t (msg VARCHAR)")
    con.execute("INSERT INTO t SELECT unnest($m)", {"m": list(MESSAGES)})
    rows = con.execute(f"SELECT msg, {failure_reason_case_sql('msg')} FROM t").fetchall()
    assert all(reason == classify_error(msg) for msg, reason in rows)
    assert len(rows) == len(MESSAGES)


def test_a_pattern_with_a_quote_survives_sql_quoting(monkeypatch):
    import data_catalog.failures as failures

    extended = (("quoted", r"can't decode"), *FAILURE_PATTERNS)
    monkeypatch.setattr(failures, "FAILURE_PATTERNS", extended)
    con = duckdb.connect()
    con.execute(failures.failure_reason_macro_sql())
    assert con.execute("SELECT failure_reason($m)", {"m": "we can't decode this"}).fetchone()[0] == "quoted"
