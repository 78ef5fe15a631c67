"""Bounds on slow clients, so that one cannot hold a gunicorn worker thread forever.

What gunicorn's gthread worker already does: a new connection waits in the worker's poller (not
in a thread) until its first byte arrives, at most 5 seconds before it is put back; an idle
keep-alive connection is closed after `keepalive` seconds (5, in serve.py). What it does not do:
bound a client that sends its body slowly, or one that stops reading a streamed answer; the
thread then blocks on the socket with no timeout.

This module closes those two holes from inside the app, through the request's socket
(`environ["gunicorn.socket"]`):
- the whole request body must arrive within `seconds` (408 in the client's protocol otherwise),
  and it is read here, before the view runs, so the view never blocks on the client;
- every write of the answer must make progress within `seconds`: a client that stops reading
  gets its connection closed, which closes the answer's generator and so stops the expert.

Not covered: a client that dribbles its request *headers*. gunicorn parses them before the app
runs, on a blocking socket; put a reverse proxy with a header timeout (nginx
`client_header_timeout`) in front of a server exposed to untrusted networks.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import ClientDisconnected

from modules.errors import RequestError
from modules.logger import get_logger, sanitize

log = get_logger("clients")

DEFAULT_CLIENT_TIMEOUT = 30.0
CLIENT_TIMEOUT_ENV = "LEMOE_CLIENT_TIMEOUT"

Respond = Callable[[RequestError], Response]


class RequestTimeout(RequestError):
    status_code = 408


def client_timeout_from_environment(environ: dict[str, str] | None = None) -> float:
    """$LEMOE_CLIENT_TIMEOUT in seconds (default 30); an unusable value means the default."""
    raw = (os.environ if environ is None else environ).get(CLIENT_TIMEOUT_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_CLIENT_TIMEOUT
    return value if 0 < value < 86400 else DEFAULT_CLIENT_TIMEOUT


class _DeadlineInput:
    """`wsgi.input` with a deadline for the whole body: each read may only wait what is left."""

    def __init__(self, stream: Any, sock: socket.socket, deadline: float) -> None:
        self._stream = stream
        self._sock = sock
        self._deadline = deadline

    def _arm(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request body deadline passed")
        self._sock.settimeout(remaining)

    def read(self, size: int = -1) -> bytes:
        self._arm()
        return self._stream.read(size)  # type: ignore[no-any-return]

    def readline(self, size: int = -1) -> bytes:
        self._arm()
        return self._stream.readline(size)  # type: ignore[no-any-return]


def init_client_timeouts(app: Flask, seconds: float, respond: Respond) -> None:
    inner = app.wsgi_app

    def bounded_input(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket")
        if isinstance(sock, socket.socket):
            environ["wsgi.input"] = _DeadlineInput(environ["wsgi.input"], sock, time.monotonic() + seconds)
        return inner(environ, start_response)  # type: ignore[no-any-return]

    app.wsgi_app = bounded_input  # type: ignore[method-assign]

    @app.before_request
    def _read_body_in_time() -> Response | None:
        try:
            # Cached, so the view's own get_data() returns it without touching the socket.
            request.get_data(cache=True)
        except ClientDisconnected:
            log.warning("%s %s: request body from %s not received within %gs", request.method,
                        sanitize(request.path, 100), request.remote_addr, seconds)
            response = respond(RequestTimeout(f"request body not received within {seconds:g} seconds"))
            # Where the next request would start on this connection is unknown: close it.
            response.headers["Connection"] = "close"
            return response
        sock = request.environ.get("gunicorn.socket")
        if isinstance(sock, socket.socket):
            # From here on the socket is only written to: each write must progress in time.
            sock.settimeout(seconds)
        return None
