"""Why a sample failed to download: one table of reasons, used by Python and by SQL alike.

img2dataset stores `str(exception)` as each failed sample's `error_message` (urllib, socket, ssl and
OpenCV/PIL messages). `FAILURE_PATTERNS` maps those messages to a small set of reasons. The Python
classifier and the SQL macro are both generated from it, so a query over a shard's Parquet and a
record built in Python can never disagree.

To add a reason, add one `(reason, pattern)` row. Patterns are case-insensitive regular expressions in
the subset that Python's `re` and DuckDB's RE2 read the same way (no look-around, no back-references).
The first matching row wins, so put specific rows above general ones.
"""

from __future__ import annotations

import re

from data_catalog.url_safety import BLOCKED_PREFIX, CATEGORIES

OTHER = "other"

FAILURE_PATTERNS: tuple[tuple[str, str], ...] = (
    # The worker refused the address a host resolved to (url_safety.blocked_message): first, so that no
    # connection row below claims it.
    *((BLOCKED_PREFIX + c, rf"blocked address \({c}\)") for c in CATEGORIES),
    ("blocked_scheme", r"blocked scheme"),
    # Not the URL's fault: the shard was written on a full disk (img2dataset records it per sample).
    ("disk_full", r"no space left on device|errno 28\b|disk quota exceeded"),
    ("duplicate_url", r"duplicate"),
    ("http_404", r"http error 404\b"),
    ("http_4xx", r"http error 4\d\d\b"),
    ("http_5xx", r"http error 5\d\d\b"),
    # Above the connection rows: "[Errno 110] Connection timed out" is a timeout.
    ("timeout", r"timed out|timeout"),
    ("connection_refused", r"connection refused|errno 111\b"),
    ("connection_reset", r"connection reset|remote end closed connection|connection aborted"),
    (
        "unreachable_host",
        r"name or service not known|nodename nor servname|temporary failure in name resolution"
        r"|no address associated with hostname|getaddrinfo failed|no route to host"
        r"|network is unreachable|host is unreachable",
    ),
    ("ssl_error", r"\[ssl|_ssl\.c|certificate verify failed"),
    ("invalid_url", r"unknown url type|url can't contain control characters|no host given"),
    ("disallowed_by_robots", r"x-robots-tag"),
    ("hash_mismatch", r"hash mismatch"),
    # img2dataset decodes with OpenCV ("Image decoding error"); PIL says "cannot identify image file".
    ("not_an_image", r"cannot identify image file|image decoding error"),
    ("truncated_image", r"image file is truncated|broken data stream|truncated file read"),
    ("image_too_large", r"decompression ?bomb|exceeds limit|image area too large"),
    ("image_too_small", r"image too small"),
    ("bad_aspect_ratio", r"aspect ratio too large"),
)

REASONS: tuple[str, ...] = tuple(reason for reason, _ in FAILURE_PATTERNS) + (OTHER,)
# Reasons that say the shard is damaged, not the sample: such a shard is refused and downloaded again.
LOCAL_FAILURES: frozenset[str] = frozenset({"disk_full"})

_COMPILED = tuple((reason, re.compile(pattern, re.IGNORECASE)) for reason, pattern in FAILURE_PATTERNS)


def classify_error(message: str | None) -> str:
    """The failure reason of one img2dataset `error_message` (`"other"` when no pattern matches)."""
    if not message:
        return OTHER
    for reason, pattern in _COMPILED:
        if pattern.search(message):
            return reason
    return OTHER


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def failure_reason_case_sql(column: str) -> str:
    """A SQL CASE expression giving the failure reason of the message in `column`."""
    branches = " ".join(
        f"WHEN regexp_matches({column}, {_sql_literal(pattern)}, 'i') THEN {_sql_literal(reason)}"
        for reason, pattern in FAILURE_PATTERNS
    )
    # An empty message matches nothing above, and NULL makes every branch NULL: both fall to ELSE.
    return f"(CASE {branches} ELSE {_sql_literal(OTHER)} END)"


def failure_reason_macro_sql(name: str = "failure_reason") -> str:
    """`CREATE TEMP MACRO name(message)`: the same classifier, callable by name in any query."""
    return f"CREATE OR REPLACE TEMP MACRO {name}(message) AS {failure_reason_case_sql('message')}"
