"""tests/quiet_http.py: the tests' HTTP servers say nothing when a client hangs up mid-answer,
and still print every other error of a handler. Real sockets on loopback; the plain
ThreadingHTTPServer beside it shows that the hang-up does raise in the handler."""

from __future__ import annotations

import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.quiet_http import QuietHTTPServer

CHUNK, CHUNKS = 64 * 1024, 1024  # 64 MB: more than loopback's buffers hold, so writes block
NOISE = "Exception occurred during processing of request"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/broken":
            raise ValueError("a bug in the handler")
        if self.path == "/reset-elsewhere":  # as when a server behind this one resets
            raise ConnectionResetError("upstream reset")
        self.send_response(200)
        self.send_header("Content-Length", str(CHUNK * CHUNKS))
        self.end_headers()
        for _ in range(CHUNKS):
            self.wfile.write(b"x" * CHUNK)

    def log_message(self, *args):
        pass


def served_once(server_class, path: str, *, hang_up: bool) -> None:
    """One GET of ``path``; the client resets the connection after the status line if
    ``hang_up``, else waits for the server to close it. Returns once the handler has ended."""
    server = server_class(("127.0.0.1", 0), Handler)
    server.daemon_threads = False  # server_close() waits for the handler's thread
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        with socket.create_connection(server.server_address[:2], timeout=30) as client:
            client.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            if hang_up:
                assert client.recv(16).startswith(b"HTTP/1.0 200")
                # close with a reset (RST), as a client that gave up or died does
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                while client.recv(65536):
                    pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("server_class", "noisy"), [(ThreadingHTTPServer, True), (QuietHTTPServer, False)]
)
def test_a_client_that_hangs_up_mid_answer_prints_nothing(capfd, server_class, noisy):
    served_once(server_class, "/", hang_up=True)
    err = capfd.readouterr().err
    assert (NOISE in err) is noisy, err
    if noisy:  # the error the quiet server leaves out: the client's going
        assert "BrokenPipeError" in err or "ConnectionResetError" in err, err


@pytest.mark.parametrize(
    ("path", "error"),
    [("/broken", "ValueError: a bug in the handler"), ("/reset-elsewhere", "upstream reset")],
)
def test_other_errors_are_still_printed(capfd, path, error):
    served_once(QuietHTTPServer, path, hang_up=False)
    err = capfd.readouterr().err
    assert NOISE in err and error in err, err
