"""A slow object store on loopback: moto's S3 server behind a proxy that delays every request.

An object store answers a request in 20-50 ms; moto on loopback in well under one, which
hides exactly the cost that concurrent reads are meant to hide. :class:`S3Proxy` forwards
each request to an upstream S3 server after a fixed delay, and records what it saw: each
request's method and path, and the most requests it held at once. Keys in ``deny`` are
answered ``403 AccessDenied`` as S3 would for an object the caller may not read; a key in
``throttle`` is answered ``503 SlowDown`` as many times as it says, as S3 answers a prefix
read faster than it has scaled to.

Tests run it in their own process (:class:`S3Proxy`, :func:`moto_server`). A benchmark runs
it in a child process so that the server's Python threads do not compete for the GIL with
the decode being measured::

    python -m pipeline.testing.s3_proxy --latency-ms 30
    # prints {"upstream": "http://127.0.0.1:P1", "proxy": "http://127.0.0.1:P2"}, serves
    # until stdin closes; GET /__proxy__/stats and POST /__proxy__/reset report and clear.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import http.server
import json
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "proxy-authenticate", "proxy-authorization"}
_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b"<Message>Access Denied</Message></Error>")
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class S3Proxy:
    """Forwards HTTP requests on 127.0.0.1 to ``upstream`` (``http://host:port``), each after
    ``delay`` seconds, or ``delay(method, path)`` seconds if it is a function (the path is
    ``/bucket/key``). ``requests`` is the log of (method, path) seen; ``max_in_flight`` the
    most requests held at once (delayed or forwarded). ``throttle``: "bucket/key" -> how many
    requests for it to answer 503 SlowDown first. Set ``delay``, ``deny`` and ``throttle``
    any time."""

    def __init__(
        self, upstream: str, delay: float | Callable[[str, str], float] = 0.0,
        deny: Iterable[str] = (), throttle: dict[str, int] | None = None,
    ):
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.delay = delay
        self.deny = {p.strip("/") for p in deny}  # "bucket/key"
        self.throttle = dict(throttle or {})
        self.requests: list[tuple[str, str]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> S3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def counts(self, under: str = "") -> collections.Counter:
        """Requests by method, for paths (``/bucket/key``) that start with ``under``."""
        with self._lock:
            return collections.Counter(m for m, p in self.requests if p.startswith(under))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self._in_flight

    def stats(self) -> dict:
        with self._lock:
            counts = collections.Counter(m for m, _ in self.requests)
            return {"counts": dict(counts), "max_in_flight": self.max_in_flight,
                    "requests": list(self.requests)}

    def _throttled(self, key: str) -> bool:
        with self._lock:
            if self.throttle.get(key, 0) <= 0:
                return False
            self.throttle[key] -= 1
            return True

    @contextlib.contextmanager
    def _held(self, method: str, path: str) -> Iterator[None]:
        with self._lock:
            self.requests.append((method, path))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1


def _handler(proxy: S3Proxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as clients of a real store expect
        # Without TCP_NODELAY a small answer written after its headers waits for the client's
        # delayed ACK (40 ms on Linux): every request would look 40 ms slower than set.
        disable_nagle_algorithm = True
        upstream: http.client.HTTPConnection | None = None  # one per client connection

        def log_message(self, *args) -> None:  # quiet: the log is proxy.requests
            pass

        def _any(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith("/__proxy__/"):
                return self._control(path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                return self._reply(501, {}, b"chunked request bodies are not forwarded")
            with proxy._held(self.command, path):
                delay = proxy.delay
                time.sleep(delay(self.command, path) if callable(delay) else delay)
                if path.strip("/") in proxy.deny and self.command in ("GET", "HEAD"):
                    return self._reply(403, {"Content-Type": "application/xml"}, _DENIED)
                if proxy._throttled(path.strip("/")):
                    return self._reply(503, {"Content-Type": "application/xml"}, _SLOW_DOWN)
                status, headers, data = self._forward(body)
            self._reply(status, headers, data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            for attempt in (1, 2):  # a kept-alive upstream connection may have been closed
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    self.upstream.request(self.command, self.path, body or None, headers)
                    response = self.upstream.getresponse()
                    data = response.read()
                    out = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                    return response.status, out, data
                except (http.client.HTTPException, OSError):
                    self.upstream.close()
                    self.upstream = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                if self.command != "HEAD" or k.lower() != "content-length":
                    self.send_header(k, v)
            if self.command == "HEAD":  # a HEAD answer states the object's length, no body
                self.send_header("Content-Length", headers.get("Content-Length", "0"))
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _control(self, path: str) -> None:
            if path == "/__proxy__/reset":
                proxy.reset()
            data = json.dumps(proxy.stats()).encode()
            self._reply(200, {"Content-Type": "application/json"}, data)

    return Handler


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=30.0, help="delay per request")
    args = parser.parse_args(argv)
    with moto_server() as upstream, S3Proxy(upstream, args.latency_ms / 1000) as proxy:
        print(json.dumps({"upstream": upstream, "proxy": proxy.url}), flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin (or exits)


if __name__ == "__main__":
    main()
