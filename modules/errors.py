"""Every error LeMoE raises on purpose, in one tree.

    LeMoEError
    ├── RequestError                  the client's request cannot be served (4xx/5xx to the client)
    │   ├── InvalidRequest      400
    │   │   └── MissingCapability     400   no expert can take the request's images, tools, ...
    │   │       └── ContextTooLong    400   ... or a prompt this long
    │   ├── Unauthorized        401
    │   ├── Forbidden           403   e.g. a browser origin CORS does not allow
    │   ├── UnknownModel        404
    │   ├── NotFound            404   unknown route
    │   ├── MethodNotAllowed    405
    │   ├── RequestTimeout      408   the client did not send its body in time
    │   ├── BodyTooLarge        413
    │   ├── RateLimited         429
    │   └── ServiceUnavailable  503   not even the fallback expert could answer
    ├── ExpertError                   a backend failed; the runner falls back, clients never see it
    │   ├── ExpertTimeout
    │   ├── ExpertUnavailable
    │   └── ExpertStreamBroken
    │       └── ExpertAnswerTooLarge  a line, event or whole answer past the server's bounds
    └── ConfigError                   start-up only; names the file and field

The protocol adapters turn a `RequestError` into the client's own error shape. Messages of
request errors are written for the client; messages of expert errors are for the log only.
"""

from __future__ import annotations


class LeMoEError(Exception):
    status_code = 500


class RequestError(LeMoEError):
    status_code = 400
    # Short machine-readable code for OpenAI's `error.code` (None when OpenAI has none).
    code: str | None = None

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequest(RequestError):
    status_code = 400


class MissingCapability(InvalidRequest):
    """The model asked for (an expert, or every expert behind the router) cannot take what the
    request needs; the message names it, in Ollama's words ("x does not support tools")."""


class ContextTooLong(MissingCapability):
    code = "context_length_exceeded"


class Unauthorized(RequestError):
    status_code = 401
    code = "invalid_api_key"


class Forbidden(RequestError):
    status_code = 403


class UnknownModel(RequestError):
    status_code = 404
    code = "model_not_found"


class NotFound(RequestError):
    status_code = 404


class MethodNotAllowed(RequestError):
    status_code = 405


class RequestTimeout(RequestError):
    status_code = 408


class BodyTooLarge(RequestError):
    status_code = 413


class RateLimited(RequestError):
    status_code = 429
    code = "rate_limit_exceeded"


class ServiceUnavailable(RequestError):
    status_code = 503


class ExpertError(LeMoEError):
    """A backend failed. The message is for the log, never for a client."""


class ExpertTimeout(ExpertError):
    pass


class ExpertUnavailable(ExpertError):
    pass


class ExpertStreamBroken(ExpertError):
    pass


class ExpertAnswerTooLarge(ExpertStreamBroken):
    """The upstream sent more than LeMoE agreed to read: one line (or SSE event) longer than
    `server.max_upstream_line_bytes`, or an answer past `server.max_upstream_answer_bytes`."""


class ConfigError(LeMoEError):
    """A configuration file is invalid. Raised at load time, before serving."""
