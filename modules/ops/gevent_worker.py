"""gunicorn's gevent worker, with the errors gunicorn raises before the app answered in the
client's protocol.

gunicorn reads the request line and the headers itself, and refuses what passes its limits
(`server.max_request_line_bytes`, `max_header_fields`, `max_header_field_bytes`) or breaks the
HTTP grammar (a control byte in a header value, say) before the app sees the request. Its
worker's `handle_error` then writes an HTML page, which no Ollama or OpenAI client can read. This
worker writes the error as the app would: `{"error": "..."}` on `/` and `/api/*`, the OpenAI
error object on `/v1/*`, with gunicorn's status (414, 431, 400, ...). The messages are fixed
texts: gunicorn's own quote the offending bytes, and a header value may be an API key or ANSI.

A parse error is raised while gunicorn builds its request object, so none is left to say which
path the request was for. `_PathKeepingRequest`, the parser's message class in this worker, notes
it on the exception: the path if the request line was parsed, else what the start of the line
says (a request line too long to be parsed still starts with its method and path).

Run it with `api_server.py` (serve.py picks it) or plain gunicorn:
`gunicorn -k modules.ops.gevent_worker.LeMoEGeventWorker 'api_server:create_app()'`.
"""

from __future__ import annotations

import json
import re
import socket
import time
from http import HTTPStatus
from typing import Any

from gunicorn import util  # type: ignore[import-untyped]
from gunicorn.http import errors  # type: ignore[import-untyped]
from gunicorn.http.message import Request  # type: ignore[import-untyped]
from gunicorn.http.parser import RequestParser  # type: ignore[import-untyped]
from gunicorn.workers.ggevent import GeventWorker  # type: ignore[import-untyped]

from modules.logger import get_logger, sanitize

log = get_logger("server")

_PATH_NOTE = "lemoe_path"
# The path of the request target at the start of a request line, origin form or absolute form.
_TARGET_RE = re.compile(rb"^[!-~]+ +(?:[A-Za-z][A-Za-z0-9+.-]*://[^/ ]*)?(/[^ ?#\r\n]*)")
# After an error answer, what the client still sends is read and dropped for this long (or this
# much) before the socket closes: closing on unread bytes makes the kernel send a reset, which
# can destroy the answer before the client has read it.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 256 * 1024
# Errors in what the app sent, not in the request: gunicorn answers them as the app's fault (500).
_APP_ERRORS = (errors.InvalidResponseHeader, errors.InvalidResponseHeaderName)


def _client_error(exc: BaseException, cfg: Any) -> tuple[int, str] | None:
    """The status and message for a request gunicorn refused, or None if it is not the client's fault."""
    if isinstance(exc, _APP_ERRORS):
        return None
    # Built per call: the messages name the limits configured for this server.
    table: tuple[tuple[tuple[type[BaseException], ...], int, str], ...] = (
        ((errors.LimitRequestLine,), 414, f"request line is longer than {cfg.limit_request_line} bytes"),
        ((errors.LimitRequestHeaders,), 431,
         f"request headers are too large: at most {cfg.limit_request_fields} fields "
         f"of {cfg.limit_request_field_size} bytes each"),
        ((errors.InvalidHeaderName, errors.InvalidHeader, errors.ObsoleteFolding), 400, "malformed request header"),
        ((errors.InvalidRequestLine, errors.InvalidRequestMethod, errors.InvalidHTTPVersion), 400,
         "malformed request line"),
        ((errors.UnsupportedTransferCoding,), 501, "unsupported transfer coding"),
        ((errors.InvalidChunkSize, errors.ChunkMissingTerminator, errors.InvalidChunkExtension), 400,
         "malformed chunked request body"),
        ((errors.ExpectationFailed,), 417, "unsupported Expect header"),
        ((errors.InvalidSchemeHeaders,), 400, "contradictory forwarded scheme headers"),
        ((errors.ForbiddenProxyRequest,), 403, "PROXY protocol not allowed from this address"),
        ((errors.InvalidProxyLine, errors.InvalidProxyHeader), 400, "malformed PROXY protocol header"),
    )
    for classes, status, message in table:
        if isinstance(exc, classes):
            return status, message
    return None


def _path_from_head(head: bytes | bytearray | None) -> str | None:
    match = _TARGET_RE.match(bytes(head or b"")[:1024])
    return match.group(1).decode("latin-1") if match else None


def error_response_bytes(path: str, status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error answer in the protocol of `path`; the connection closes after it."""
    from modules.protocol.error_bodies import error_body_for_path
    from modules.errors import RequestError

    err = RequestError(message)
    err.status_code = status  # type: ignore[misc]
    body, _ = error_body_for_path(path, err)
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Connection: close",
            "Content-Type: application/json; charset=utf-8", f"Content-Length: {len(payload)}"]
    if status >= 500:
        # openai-python retries 5xx twice by default; the same request would fail the same way.
        head.append("x-should-retry: false")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


class _PathKeepingRequest(Request):  # type: ignore[misc]
    """gunicorn's request, noting on a parse error which path the request was for."""

    def __init__(self, cfg: Any, unreader: Any, peer_addr: Any, req_number: int = 1) -> None:
        self._lemoe_head: bytearray | None = None
        try:
            super().__init__(cfg, unreader, peer_addr, req_number)
        except Exception as exc:
            setattr(exc, _PATH_NOTE, self.path or _path_from_head(self._lemoe_head))
            raise

    def read_into(self, unreader: Any, buf: bytearray, stop: bool = False) -> None:
        # The first buffer is the one the head accumulates in, request line first.
        if self._lemoe_head is None:
            self._lemoe_head = buf
        super().read_into(unreader, buf, stop)


class LeMoEGeventWorker(GeventWorker):  # type: ignore[misc]
    def init_process(self) -> None:
        # The parser builds its requests from this class attribute; set here, it only changes
        # this worker process (the master parses nothing).
        RequestParser.mesg_class = _PathKeepingRequest
        super().init_process()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        path = getattr(req, "path", None) or getattr(exc, _PATH_NOTE, None) or "/"
        peer = addr[0] if addr else "unix socket"
        refused = _client_error(exc, self.cfg)
        if refused is None:
            log.error("error before the app on %s from %s: %s", sanitize(path, 100), peer, type(exc).__name__,
                      exc_info=exc)
            status, message = 500, "internal server error"
        else:
            status, message = refused
            log.warning("request refused before the app: %d %s on %s from %s (%s)", status, message,
                        sanitize(path, 100), peer, type(exc).__name__)
        try:
            util.write_nonblock(client, error_response_bytes(path, status, message))
        except Exception:  # noqa: BLE001 - the client is gone; nothing is left to tell it
            log.debug("could not send the %d answer to %s", status, peer)
            return
        _drain_before_close(client)


def _drain_before_close(client: socket.socket) -> None:
    deadline = time.monotonic() + _LINGER_SECONDS
    left = _LINGER_BYTES
    try:
        # Our side is done: the client reads the answer, then the end of the stream.
        client.shutdown(socket.SHUT_WR)
        while left > 0:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return
            client.settimeout(wait)
            data = client.recv(min(left, 65536))
            if not data:
                return
            left -= len(data)
    except OSError:
        pass
