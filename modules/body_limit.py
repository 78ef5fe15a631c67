"""`server.max_body_bytes` for request bodies that declare no length (`Transfer-Encoding: chunked`).

Flask refuses a `Content-Length` over its `MAX_CONTENT_LENGTH` with 413 before reading a byte.
A chunked body declares nothing: werkzeug stops reading it at the limit and hands the view what
it read, so a 1.5 MB body was served as its first megabyte (a valid request padded with spaces
got an answer, anything else "invalid JSON"). Here a body that fills the limit is refused with
413, in the client's protocol, when more of it follows.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, Response, current_app, request

from modules.errors import BodyTooLarge, RequestError
from modules.logger import get_logger, sanitize

log = get_logger("clients")

Respond = Callable[[RequestError], Response]


def init_body_limit(app: Flask, respond: Respond) -> None:
    """Refuse chunked bodies over the limit; register after the guard that reads the body in time
    (`init_client_timeouts`), so the body read here is already bounded and cached."""

    @app.before_request
    def _refuse_long_chunked_body() -> Response | None:
        # Read at each request: a reload changes the limit at once.
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        if limit is None or request.content_length is not None:
            return None
        if len(request.get_data(cache=True)) < limit:
            return None
        try:
            # werkzeug's own stream stops at the limit; the WSGI server's tells whether it ended.
            more = request.input_stream.read(1)
        except (OSError, ValueError):
            # Stalled or broken right at the limit: its end was not seen, so it is not accepted.
            more = b"?"
        if not more:
            return None
        log.warning("%s %s: chunked request body from %s is larger than %d bytes", request.method,
                    sanitize(request.path, 100), request.remote_addr, limit)
        return respond(BodyTooLarge(f"request body is larger than {limit} bytes"))
