"""S3 test fixtures: a real moto S3 server over HTTP on loopback, and a fault-injecting proxy.

Import the fixtures into a conftest (or a test module) with
``from tests.fixtures_s3 import moto_server, s3_env  # noqa: F401``.
"""

from __future__ import annotations

import http.client
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlparse

import pytest

from tests.quiet_http import QuietHTTPServer

# Distinctive, so that a test can assert it never shows up in an error message.
SECRET = "gptpipe-TEST-secret-7Qz9xW4v"
ACCESS_KEY = "testing-key"


@dataclass(frozen=True)
class S3Env:
    bucket: str
    endpoint: str
    secret: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 server in a thread of this process for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    werkzeug = logging.getLogger("werkzeug")  # one log line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()  # the port the OS picked for port=0
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture()
def s3_env(moto_server, monkeypatch, tmp_path) -> Iterator[S3Env]:
    """AWS_* settings pointing at moto, a fresh bucket, and no S3 client cached across tests."""
    import boto3

    import storage.s3

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    # Keep a developer's ~/.aws and the instance metadata service out of the tests.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.s3.reset_clients()
    bucket = f"gptpipe-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=bucket)
    try:
        yield S3Env(bucket=bucket, endpoint=moto_server, secret=SECRET)
    finally:
        storage.s3.reset_clients()


# ----------------------------------------------------------------------------- fault injection

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "transfer-encoding"}
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyProxy:
    """An HTTP proxy on loopback in front of an S3 endpoint that fails the requests it is told to.

    ``inject(kind, times, match)``: the next ``times`` requests whose ``"METHOD /path?query"``
    satisfies ``match`` fail, as ``"503"`` (an S3 SlowDown answer) or ``"drop"`` (the connection
    closes without an answer, as when a server or load balancer dies mid-request). Others are
    forwarded unchanged (bodies byte for byte, chunked ones included, so SigV4 and the checksums
    S3 verifies stay valid). ``failed`` lists the requests that were failed.
    """

    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream).netloc
        self.failed: list[str] = []
        self.forwarded: list[str] = []
        self._lock = threading.Lock()
        self._kind = None
        self._left = 0.0
        self._match: Callable[[str], bool] = lambda request: True
        self._server = QuietHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def inject(self, kind: str, times: float = 1, match: Callable[[str], bool] | None = None):
        assert kind in ("503", "drop")
        with self._lock:
            self._kind, self._left = kind, times
            self._match = match or (lambda request: True)

    def _fault_for(self, request: str) -> str | None:
        with self._lock:
            if self._left > 0 and self._match(request):
                self._left -= 1
                self.failed.append(request)
                return self._kind
            self.forwarded.append(request)
            return None

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered for us

    def log_message(self, *args) -> None:
        pass

    def _raw_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = b""
            while True:  # keep the framing (and aws-chunked trailers) as sent
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return raw
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy: FaultyProxy = self.server.proxy
        body = self._raw_body()
        fault = proxy._fault_for(f"{self.command} {self.path}")
        if fault == "drop":
            self.close_connection = True
            return
        if fault == "503":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(_SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP - {"transfer-encoding"}:
                    upstream.putheader(name, value)
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP | {"content-length", "server", "date"}:
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
