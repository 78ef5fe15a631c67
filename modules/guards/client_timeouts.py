"""Bounds on slow clients, so that one cannot hold one of a worker's request slots forever.

What gunicorn's gevent worker already does: a request line and its headers must arrive within
`keepalive` seconds (5, in serve.py), and an idle keep-alive connection is closed after as long.
What it does not do: bound a client that sends its body slowly, or one that stops reading a
streamed answer; the request then waits on the socket with no timeout.

This module closes those two holes from inside the app, through the request's socket
(`environ["gunicorn.socket"]`):
- the whole request body must arrive within `seconds` (408 in the client's protocol otherwise;
  a watchdog thread enforces the total, a socket timeout each read), and it is read here, before
  the view runs, so the view never blocks on the client. gunicorn then spends at most 5 more
  seconds draining what is left of such a body before it closes the connection;
- every write of the answer must make progress within `seconds`: a client that stops reading
  gets its connection closed, which closes the answer's generator and so stops the expert.

Headers dribbled byte by byte are gunicorn's to bound (the keep-alive time above), since it
parses them before the app runs. Under plain gunicorn with `-k gthread` they are not bounded:
put a reverse proxy with a header timeout (nginx `client_header_timeout`) in front of such a
server if it is exposed to untrusted networks.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import ClientDisconnected, HTTPException

from modules.errors import InvalidRequest, RequestError, RequestTimeout
from modules.logger import get_logger, sanitize

log = get_logger("clients")

Respond = Callable[[RequestError], Response]


class _BodyWatchdog:
    """One thread per process that cuts short request bodies still arriving at their deadline.

    A socket timeout bounds each read, not the whole body: a client sending one byte a second
    would never trip it. At the deadline the watchdog drops the socket's timeout to almost
    nothing, so the next read fails and the request gets its 408.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._live: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cond:
            token = next(self._tokens)
            heapq.heappush(self._heap, (deadline, token, sock))
            self._live.add(token)
            if self._thread is None:
                # Started on first use, so it lives in the gunicorn worker, not the master.
                self._thread = threading.Thread(target=self._run, name="lemoe-body-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def release(self, token: int) -> None:
        with self._cond:
            self._live.discard(token)

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token, sock = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                if token in self._live:
                    self._live.discard(token)
                    _set_timeout(sock, 0.001)


_WATCHDOG = _BodyWatchdog()


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    try:
        sock.settimeout(seconds)
    except OSError:  # already closed: nothing left to bound
        pass


def init_client_timeouts(app: Flask, seconds: float, respond: Respond) -> None:
    inner = app.wsgi_app

    def bounded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket")
        if not isinstance(sock, socket.socket):
            return inner(environ, start_response)
        _set_timeout(sock, seconds)
        token = _WATCHDOG.watch(sock, time.monotonic() + seconds)
        try:
            return inner(environ, start_response)
        finally:
            # The body is read by now (or never will be); what remains is writing the answer,
            # and each write must make progress within `seconds`.
            _WATCHDOG.release(token)
            _set_timeout(sock, seconds)

    app.wsgi_app = bounded  # type: ignore[method-assign]

    @app.before_request
    def _read_body_in_time() -> Response | None:
        try:
            # Cached, so the view's own get_data() returns it without touching the socket.
            request.get_data(cache=True)
        except ClientDisconnected:
            log.warning("%s %s: request body from %s not received within %gs", request.method,
                        sanitize(request.path, 100), request.remote_addr, seconds)
            return respond(RequestTimeout(f"request body not received within {seconds:g} seconds"))
        except HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - the WSGI server's own error for a body it cannot frame
            # gunicorn raises its parse errors (a bad chunk size, say) from the body's reads; they
            # are the client's fault, not a 500. gunicorn closes the connection after it.
            log.warning("%s %s: malformed request body from %s (%s)", request.method,
                        sanitize(request.path, 100), request.remote_addr, type(exc).__name__)
            return respond(InvalidRequest("malformed request body"))
        return None
