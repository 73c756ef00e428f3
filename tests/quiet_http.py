"""The tests' HTTP servers: quiet when a client hangs up, as loud as ever about anything else.

socketserver prints "Exception occurred during processing of request from ..." and a traceback
to stderr (`handle_error`) for whatever a request handler raises, a client that went away
included: BrokenPipeError or ConnectionResetError from writing the answer to it, or from reading
its next request on a kept-alive connection. A handler thread that outlives its test prints that
into the middle of the suite's output. `QuietHTTPServer` drops such an error only when the
client's socket is indeed gone; any other error (one of the handler's own, or a connection reset
by another server the handler talked to while its client still waits) is printed as before.
"""

from __future__ import annotations

import socket
import sys
from http.server import ThreadingHTTPServer

CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def client_gone(request: socket.socket) -> bool:
    """Whether the client of ``request`` closed or reset its end (a peek, nothing is read)."""
    try:
        request.setblocking(False)
        return request.recv(1, socket.MSG_PEEK) == b""  # end of stream: closed
    except BlockingIOError:
        return False  # still connected, with nothing to say
    except OSError:
        return True  # reset


class QuietHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that says nothing about a client that hung up (see the module)."""

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exception(), CLIENT_GONE) and client_gone(request):
            return
        super().handle_error(request, client_address)
