"""Which download addresses ingest refuses: the pipeline fetches URLs from manifests found on the open web.

A URL that names (or resolves to) a loopback, link-local (169.254.169.254 is the cloud metadata service),
private, multicast, reserved or unspecified address would let a manifest make our workers fetch from
inside the network they run in (server-side request forgery). Two checks use the rules here:
- the manifest builder drops URLs whose host is an IP literal in such a range (counted per reason);
- the img2dataset worker checks every address a host name resolves to, at connection time, so a name
  that resolves to a public address today and to 127.0.0.1 tomorrow (DNS rebinding) is refused too.
Standard library only: img2dataset's pool processes import this module.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote_plus, urlsplit

# Reason names, as the manifest report and the catalog's failure reasons spell them.
BLOCKED_PREFIX = "blocked_"
CATEGORIES = ("unspecified", "loopback", "link_local", "multicast", "private", "reserved")


def address_category(address: str) -> str | None:
    """The refused range `address` (an IP literal) falls in, or None for a public address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id (fe80::1%eth0)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def refused_category(address: str, allow_loopback: bool = False) -> str | None:
    """Like `address_category`, but None for loopback when the caller opted in (demo, tests)."""
    category = address_category(address)
    return None if category == "loopback" and allow_loopback else category


def literal_host_refusal(url: str, allow_loopback: bool = False) -> str | None:
    """`blocked_<category>` when the URL's host is an IP literal in a refused range, else None.

    Host names are not resolved here: what they resolve to is checked when the download connects.
    """
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    if host is None:
        return None
    category = refused_category(host, allow_loopback)
    return None if category is None else BLOCKED_PREFIX + category


def blocked_message(host: str, address: str, category: str) -> str:
    """The error text a refused connection records; data_catalog.failures maps it to `blocked_<category>`."""
    return f"blocked address ({category}): {host} resolves to {address}, which ingest does not fetch from"


# --- credentials in URLs -----------------------------------------------------------------------------
# Flow parameters are stored by Prefect as the flow run's parameters and shown in its UI, so a URL given
# as a parameter must not carry a secret: neither a user:password@ nor a signed or keyed query string.
# Query parameters (lower-cased) that hold a secret: S3 (SigV4 and SigV2 presigned URLs), GCS signed
# URLs, Azure SAS tokens, and the generic token / key names of HTTP APIs.
CREDENTIAL_QUERY_PARAMETERS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "awsaccesskeyid",
        "signature",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
        "sig",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "api_key",
        "apikey",
        "key",
        "secret",
        "client_secret",
        "password",
        "passwd",
    }
)


def url_credentials(url: str) -> list[str]:
    """What in `url` is a credential, named without its value: `user:password@`, `query parameter 'sig'`."""
    parts = urlsplit(url.strip())
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found.append("user:password@" if ":" in userinfo else "user@ (a user name or token)")
    for pair in parts.query.split("&"):
        name = unquote_plus(pair.split("=", 1)[0]).strip().lower()
        if name in CREDENTIAL_QUERY_PARAMETERS:
            found.append(f"query parameter {name!r}")
    return found


def no_credentials_pattern() -> str:
    """A JSON-schema `pattern` matching the URLs `url_credentials` finds nothing in (case-insensitive by
    letter classes: no inline flags, so JavaScript reads it too). In a flow's parameter schema it lets
    the Prefect server refuse a deployment run with such a URL before storing its parameters."""
    names = "|".join(
        "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in name)
        for name in sorted(CREDENTIAL_QUERY_PARAMETERS)
    )
    return rf"^(?![^?#]*://[^/?#]*@)(?![^#]*[?&](?:{names})(?:[=&#]|$))"


def credentials_message(url: str) -> str | None:
    """Why a URL given as a flow parameter is refused (it carries credentials), or None; never quotes
    them. The caller names the parameter (pydantic's error location)."""
    found = url_credentials(url)
    if not found:
        return None
    return (
        f"the URL carries credentials ({', '.join(found)}). Flow parameters are stored and shown "
        "by Prefect: pass the URL without them and put the credentials in a Prefect block or the "
        "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, "
        "AZURE_STORAGE_SAS_TOKEN, ...)"
    )
