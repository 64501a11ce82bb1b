"""An HTTP proxy in front of an S3-compatible server that slows or breaks object reads.

Workers point VITBATCH_S3_ENDPOINT_URL at it. Every `fail_every`-th object GET gets
the next fault of `faults` in turn (deterministic, so a run is reproducible); every
object GET waits `delay_s` first, which makes shards slow enough to be hit mid-way
without depending on how busy the CPU is. `key_faults` answers chosen objects (by
"bucket/key", as written) with a fault every time they are read: a 403 AccessDenied, an
archived object's InvalidObjectState, a KMS denial: errors that no retry mends.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
              "expect", "content-length"}
FAULTS = ("500", "503", "reset", "truncate")
ERROR_XML = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}
# Per-object faults (key_faults): HTTP status, S3 error code, message, as AWS answers them.
KEY_FAULTS = {
    "403": (403, "AccessDenied", "Access Denied"),
    "archived": (403, "InvalidObjectState", "The operation is not valid for the object's storage class"),
    "kms": (400, "KMS.DisabledException", "The KMS key used to encrypt this object is disabled."),
}


class FaultyS3:
    """Start with `with FaultyS3(upstream, ...) as proxy:`; `proxy.url` is the endpoint to hand out."""

    def __init__(self, upstream: str, *, delay_s: float = 0.0, fail_every: int = 0,
                 faults: tuple[str, ...] = FAULTS, key_faults: dict[str, str] | None = None) -> None:
        parsed = urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.delay_s, self.fail_every, self.faults = delay_s, fail_every, faults
        self.key_faults = dict(key_faults or {})
        self.reads: Counter[str] = Counter()  # "bucket/key" of every object GET, as written
        self.object_gets = 0
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultyS3:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def choose(self, method: str, path: str) -> str | None:
        """The fault for this request, or None; object GETs are counted and delayed."""
        segments = [s for s in urlsplit(path).path.split("/") if s]
        if method != "GET" or len(segments) < 2:  # listings, HEADs and writes pass untouched
            return None
        object_path = unquote(urlsplit(path).path.lstrip("/"))
        with self._lock:
            self.reads[object_path] += 1
        if object_path in self.key_faults:
            with self._lock:
                self.injected[self.key_faults[object_path]] += 1
            return self.key_faults[object_path]
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.object_gets += 1
            if not self.fail_every or self.object_gets % self.fail_every:
                return None
            fault = self.faults[(self.object_gets // self.fail_every - 1) % len(self.faults)]
            self.injected[fault] += 1
            return fault

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body if body or method in ("PUT", "POST") else None, headers=headers)
            response = conn.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects from S3
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _proxy(self) -> None:
        proxy: FaultyS3 = self.server.proxy
        body = self._read_body()
        fault = proxy.choose(self.command, self.path)
        if fault == "reset":
            return self._reset()
        if fault in ERROR_XML:
            return self._send(int(fault), _error_xml(*ERROR_XML[fault]), [("Content-Type", "application/xml")])
        if fault in KEY_FAULTS:
            status, code, message = KEY_FAULTS[fault]
            return self._send(status, _error_xml(code, message), [("Content-Type", "application/xml")])
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked" and "Content-Length" in self.headers:
            headers["Content-Length"] = str(len(body))
        status, _, upstream_headers, data = proxy.forward(self.command, self.path, headers, body)
        kept = [(k, v) for k, v in upstream_headers if k.lower() not in HOP_BY_HOP]
        if fault == "truncate":  # full Content-Length announced, half the body sent, then a reset
            self._send(status, data, kept, cut_at=len(data) // 2)
            return self._reset()
        length = dict((k.lower(), v) for k, v in upstream_headers).get("content-length")
        self._send(status, data, kept, head_length=length if self.command == "HEAD" else None)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, data: bytes, headers, cut_at: int | None = None,
              head_length: str | None = None) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", head_length if head_length is not None else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data if cut_at is None else data[:cut_at])
        self.wfile.flush()

    def _reset(self) -> None:
        """Drop the connection with a TCP RST, as a load balancer or a dying server does."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass  # the socket was reset on purpose

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ValueError):
            pass

    def log_message(self, format: str, *args) -> None:
        pass


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>chaos</RequestId><HostId>chaos</HostId></Error>").encode()

