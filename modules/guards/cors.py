"""CORS the way Ollama does it (gin-contrib/cors as configured in Ollama's routes.go).

- A request without `Origin`, or from the server's own origin, is not a CORS request: untouched.
- An origin that is not allowed gets 403 before anything runs (a web page must not be able to
  make a local LeMoE generate for it, even with the answer hidden from it by the browser).
- `OPTIONS` from an allowed origin is a preflight, on any path: 204 with the allowed methods,
  the allowed headers (with the `x-stainless-*` set the openai JS SDK sends) and a max age.
- Every other answer to an allowed origin carries `Access-Control-Allow-Origin: <origin>`.

Allowed origins: Ollama's defaults (`http(s)://localhost`, `127.0.0.1`, `0.0.0.0` on any port,
`app://`, `file://`, `tauri://`, `vscode-webview://`, `vscode-file://`), browser extensions, and
`cors.allowed_origins` (one `*` wildcard allowed per entry; `"*"` alone allows every origin).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flask import Flask, Response, request

from modules.config_manager import CorsConfig
from modules.errors import Forbidden, RequestError
from modules.logger import get_logger, sanitize

log = get_logger("cors")

ALLOWED_HEADERS = (
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "OpenAI-Beta",
    "x-stainless-arch", "x-stainless-async", "x-stainless-custom-poll-interval", "x-stainless-helper-method",
    "x-stainless-lang", "x-stainless-os", "x-stainless-package-version", "x-stainless-poll-helper",
    "x-stainless-retry-count", "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-timeout",
)
ALLOWED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
# Headers a browser page may read from an answer: LeMoE's routing headers and Retry-After.
EXPOSED_HEADERS = ("X-LeMoE-Expert", "X-LeMoE-Route-Method", "X-LeMoE-Route-Score", "Retry-After")
BROWSER_EXTENSION_SCHEMES = ("chrome-extension://", "safari-extension://", "moz-extension://",
                             "ms-browser-extension://")
# gin-contrib/cors's default: browsers may cache a preflight for 12 hours.
MAX_AGE_SECONDS = 12 * 3600

Respond = Callable[[RequestError], Response]


def default_origins() -> list[str]:
    """Ollama's `envconfig.AllowedOrigins()` without OLLAMA_ORIGINS."""
    origins = []
    for host in ("localhost", "127.0.0.1", "0.0.0.0"):
        origins += [f"http://{host}", f"https://{host}", f"http://{host}:*", f"https://{host}:*"]
    return origins + ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]


def is_origin_allowed(origin: str, patterns: Iterable[str]) -> bool:
    """gin-contrib/cors matching: exact, or one `*` standing for any run of characters."""
    origin = origin.lower()
    if origin.startswith(BROWSER_EXTENSION_SCHEMES):
        return True
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern == "*" or pattern == origin:
            return True
        if "*" in pattern:
            prefix, _, suffix = pattern.partition("*")
            if len(origin) >= len(prefix) + len(suffix) and origin.startswith(prefix) and origin.endswith(suffix):
                return True
    return False


def init_cors(app: Flask, cors: CorsConfig, respond: Respond) -> None:
    patterns = default_origins() + list(cors.allowed_origins)
    allow_all = "*" in cors.allowed_origins

    @app.before_request
    def _check_origin() -> Response | None:
        origin = _cross_origin()
        if origin is None:
            return None
        if not is_origin_allowed(origin, patterns):
            log.warning("refused %s %s from origin %s", request.method, sanitize(request.path, 100),
                        sanitize(origin, 100))
            return respond(Forbidden(f"origin '{sanitize(origin, 100)}' is not allowed"))
        if request.method == "OPTIONS":
            return _preflight_response()
        return None

    @app.after_request
    def _allow_origin(response: Response) -> Response:
        origin = _cross_origin()
        if origin is not None and is_origin_allowed(origin, patterns):
            response.headers["Access-Control-Allow-Origin"] = "*" if allow_all else origin
            response.headers["Access-Control-Expose-Headers"] = ", ".join(EXPOSED_HEADERS)
            response.vary.add("Origin")
        return response


def _cross_origin() -> str | None:
    """The request's Origin when it is a cross-origin request, else None."""
    origin = request.headers.get("Origin")
    if not origin:
        return None
    if origin.lower() in (f"http://{request.host}".lower(), f"https://{request.host}".lower()):
        return None
    return origin


def _preflight_response() -> Response:
    response = Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = ", ".join(ALLOWED_METHODS)
    response.headers["Access-Control-Allow-Headers"] = ", ".join(ALLOWED_HEADERS)
    response.headers["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
    response.vary.update(["Access-Control-Request-Method", "Access-Control-Request-Headers"])
    return response
