"""The tracking server's /health check with credentials in the URI, against a real HTTP server."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest

from storage.errors import GptpipeError
from storage.tracking import check_health
from tests.quiet_http import QuietHTTPServer


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.seen.append((self.path, self.headers.get("Authorization")))
        expected = "Basic " + base64.b64encode(b"alice:p@ss word").decode()
        ok = self.path == "/health" and self.headers.get("Authorization") == expected
        self.send_response(200 if ok else 500)  # 500, not 401: a 401 would count as "there"
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = QuietHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Recorder.seen.clear()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_credentials_in_the_tracking_uri_go_as_basic_auth(server):
    check_health(f"http://alice:p%40ss%20word@{server}/")  # percent-encoded, as in a URL
    assert _Recorder.seen == [("/health", "Basic YWxpY2U6cEBzcyB3b3Jk")]


def test_wrong_credentials_fail_without_showing_them(server):
    with pytest.raises(GptpipeError) as caught:
        check_health(f"http://alice:wrong-secret@{server}")
    assert "HTTP 500" in str(caught.value) and "wrong-secret" not in str(caught.value)
