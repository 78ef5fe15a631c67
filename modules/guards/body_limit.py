"""Request body limits: `server.max_body_bytes` for text, `server.max_image_body_bytes` for the
routes that carry images, and both for bodies that declare no length (`Transfer-Encoding: chunked`).

A phone photo is several megabytes of base64, far past the 1 MB that is plenty for any text, so
the routes that take images (`image_endpoints`) read bodies up to the image limit, and once such a
body is parsed, one over the text limit must really carry an image (`check_text_body`). Every
413 names the field to raise.

Flask refuses a `Content-Length` over its `MAX_CONTENT_LENGTH` with 413 before reading a byte.
A chunked body declares nothing: werkzeug stops reading it at the limit and hands the view what
it read, so a 1.5 MB body was served as its first megabyte (a valid request padded with spaces
got an answer, anything else "invalid JSON"). Here a body that fills the limit is refused with
413, in the client's protocol, when more of it follows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from flask import Flask, Response, current_app, request

from modules.errors import BodyTooLarge, RequestError
from modules.logger import get_logger, sanitize

log = get_logger("clients")

Respond = Callable[[RequestError], Response]
# app.config keys: the image limit (kept current by hot reload), and the endpoints it applies to.
IMAGE_LIMIT_KEY = "LEMOE_MAX_IMAGE_BODY_BYTES"
_IMAGE_ENDPOINTS_KEY = "LEMOE_IMAGE_ENDPOINTS"


def image_body_limit(max_body_bytes: int, max_image_body_bytes: int) -> int:
    # Raising the text limit past the image limit must not make image requests the smaller ones.
    return max(max_body_bytes, max_image_body_bytes)


def init_image_body_limit(app: Flask, image_endpoints: Collection[str]) -> None:
    """Let `image_endpoints` read bodies up to the image limit; register before anything reads a body."""
    app.config[_IMAGE_ENDPOINTS_KEY] = frozenset(image_endpoints)

    @app.before_request
    def _raise_the_limit_for_images() -> None:
        if request.endpoint in current_app.config[_IMAGE_ENDPOINTS_KEY]:
            request.max_content_length = current_app.config[IMAGE_LIMIT_KEY]


def too_large(limit: int) -> BodyTooLarge:
    """The 413 for a body over `limit`, naming the field that sets it."""
    if request.endpoint in current_app.config.get(_IMAGE_ENDPOINTS_KEY, ()) and \
            limit == current_app.config.get(IMAGE_LIMIT_KEY) and limit != current_app.config["MAX_CONTENT_LENGTH"]:
        return BodyTooLarge(f"request body is larger than {limit} bytes, the limit for requests that may carry "
                            f"images; raise server.max_image_body_bytes to accept it")
    return BodyTooLarge(f"request body is larger than {limit} bytes; raise server.max_body_bytes to accept it")


def check_text_body(size: int, carries_images: bool) -> None:
    """Refuse a parsed body over the text limit that carries no image (it was read under the image limit)."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if size > limit and not carries_images:
        raise too_large(limit)


def init_body_limit(app: Flask, respond: Respond) -> None:
    """Refuse chunked bodies over the limit; register after the guard that reads the body in time
    (`init_client_timeouts`), so the body read here is already bounded and cached."""

    @app.before_request
    def _refuse_long_chunked_body() -> Response | None:
        # Read at each request: a reload changes the limit at once (and image routes have their own).
        limit = request.max_content_length
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
        return respond(too_large(limit))
