"""The download-time half of the address check: every connection an img2dataset process opens is
checked against data_catalog.url_safety on the address it actually connects to.

`socket.create_connection` (urllib's path for http and https, redirects included) connects to the
addresses `socket.getaddrinfo` returns, so refusing there checks the very address the socket would use:
a host name that resolved to a public address when the manifest was built and resolves to 127.0.0.1 now
(DNS rebinding) is refused, and so is a host with one public and one private address. Redirects to a
scheme other than http(s) (urllib also follows ftp://) are refused too.

Kept light: img2dataset's pool processes install it (flows.img2dataset_worker).
"""

from __future__ import annotations

import socket
import urllib.request

from data_catalog.url_safety import blocked_message, refused_category

_state: dict[str, object] = {}


class BlockedAddressError(OSError):
    """A host resolved to an address that ingest does not fetch from."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = newurl.split(":", 1)[0].lower() if ":" in newurl else ""
        if scheme and scheme not in ("http", "https"):
            raise BlockedAddressError(f"blocked scheme: redirect from {req.full_url} to a {scheme}:// URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def install_address_guard(allow_loopback: bool = False) -> None:
    """Check every resolved address in this process from now on (idempotent; the last call's flag wins)."""
    _state["allow_loopback"] = allow_loopback
    if "original" in _state:
        return
    original = socket.getaddrinfo
    _state["original"] = original

    def guarded_getaddrinfo(host, port, *args, **kwargs):
        infos = original(host, port, *args, **kwargs)
        for info in infos:
            address = info[4][0]
            category = refused_category(address, bool(_state["allow_loopback"]))
            if category is not None:
                raise BlockedAddressError(blocked_message(str(host), address, category))
        return infos

    socket.getaddrinfo = guarded_getaddrinfo
    urllib.request.install_opener(urllib.request.build_opener(_HttpOnlyRedirects))


def remove_address_guard() -> None:
    """Undo `install_address_guard` (tests)."""
    original = _state.pop("original", None)
    if original is not None:
        socket.getaddrinfo = original
        urllib.request.install_opener(None)
