"""A loopback HTTP server for the synthetic corpus, so that ingest runs img2dataset for real.

    with CorpusServer(corpus_dir) as srv:
        url_manifest(corpus_dir, srv.base_url, ...)

or, as a process that tests and CI stop by PID:

    python -m data_catalog.corpus_server ROOT --port 0 --pid-file server.pid   # prints its base URL

Besides the files under the root it serves the faults an ingest must survive, each in front of a
normal path (`/fault/<kind>/<path>`):

    /fault/404/...           404 Not Found
    /fault/500/...           500 Internal Server Error
    /fault/slow/<s>/...      waits <s> seconds, then serves the file (a client timeout below <s> fails)
    /fault/notimage/...      HTML bytes sent as image/jpeg
    /fault/truncated/...     the file cut short (a JPEG in the middle of its image data)
    /fault/huge/...          a small PNG that decodes to HUGE_SIDE x HUGE_SIDE pixels (a decompression bomb)
"""

from __future__ import annotations

import argparse
import functools
import logging
import mimetypes
import os
import signal
import struct
import sys
import threading
import zlib
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

from blip2_core.fileio import atomic_write_text

log = logging.getLogger(__name__)

HUGE_SIDE = 12_000
NOT_AN_IMAGE = b"<!DOCTYPE html><html><head><title>Moved</title></head><body><p>Not here.</p></body></html>\n"


@functools.cache
def huge_png(side: int = HUGE_SIDE) -> bytes:
    """A 1-bit grey PNG of side x side black pixels: ~20 KB on the wire, side**2 bytes once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncate(data: bytes) -> bytes:
    """The file cut in half; a JPEG keeps its headers and loses half of its scan data.

    Half of a small JPEG would end inside the headers, which decoders report as "not an image";
    cutting the scan data gives the truncated-download error this fault stands for.
    """
    start_of_scan = data.find(b"\xff\xda")
    if data[:2] == b"\xff\xd8" and start_of_scan > 0:
        return data[: start_of_scan + (len(data) - start_of_scan) // 2]
    return data[: len(data) // 2]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # img2dataset opens dozens of connections at once; the default backlog of 5 refuses some of them.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], root: Path) -> None:
        super().__init__(address, _Handler)
        self.root = root
        self.stopping = threading.Event()  # wakes /fault/slow/ sleepers at shutdown

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        # A client that gave up (the point of /fault/slow/) breaks the pipe: expected, not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s went away", client_address)
        else:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def _respond(self, send_body: bool) -> None:
        parts = unquote(urlsplit(self.path).path).lstrip("/").split("/")
        if parts[0] == "fault" and len(parts) > 2:
            self._fault(parts[1], parts[2:], send_body)
        else:
            self._file(parts, send_body)

    def _fault(self, kind: str, rest: list[str], send_body: bool) -> None:
        if kind == "404":
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", send_body)
        elif kind == "500":
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"server error\n", "text/plain", send_body)
        elif kind == "slow" and len(rest) > 1:
            if not self.server.stopping.wait(_seconds(rest[0])):
                self._file(rest[1:], send_body)
        elif kind == "notimage":
            self._send(HTTPStatus.OK, NOT_AN_IMAGE, "image/jpeg", send_body)
        elif kind == "truncated":
            self._file(rest, send_body, cut=truncate)
        elif kind == "huge":
            self._send(HTTPStatus.OK, huge_png(), "image/png", send_body)
        else:
            message = f"unknown fault route {kind!r}\n".encode()
            self._send(HTTPStatus.NOT_FOUND, message, "text/plain", send_body)

    def _file(self, parts: list[str], send_body: bool, cut: Callable[[bytes], bytes] | None = None) -> None:
        root = self.server.root
        path = root.joinpath(*parts).resolve()
        if path != root and root not in path.parents:
            self._send(HTTPStatus.FORBIDDEN, b"path escapes the served root\n", "text/plain", send_body)
        elif not path.is_file():
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", send_body)
        else:
            data = path.read_bytes()
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self._send(HTTPStatus.OK, cut(data) if cut else data, kind, send_body)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _seconds(text: str) -> float:
    try:
        return max(0.0, float(text))
    except ValueError:
        return 0.0


class CorpusServer:
    """Serves `root` over HTTP on `host:port` (port 0: the OS picks one) from a background thread."""

    def __init__(self, root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"corpus server root {self.root} is not a directory")
        self.host, self.port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """`http://host:port/`, with the port the OS gave; only known once started."""
        if self._server is None:
            raise RuntimeError("CorpusServer.base_url: the server is not running (call start() first)")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> CorpusServer:
        self._server = _Server((self.host, self.port), self.root)
        self._thread = threading.Thread(target=self._server.serve_forever, name="corpus-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> CorpusServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a synthetic corpus folder over loopback HTTP.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pid-file", type=Path, help="write this process's PID here; removed at exit")
    args = parser.parse_args(argv)
    stop = threading.Event()
    # The handler only sets an event: shutting the server down from inside a signal handler that
    # interrupts the main thread could deadlock.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with CorpusServer(args.root, args.host, args.port) as server:
        if args.pid_file:
            atomic_write_text(args.pid_file, f"{os.getpid()}\n")
        print(server.base_url, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            if args.pid_file:
                args.pid_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
