"""Optional API keys: `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`) on every
route but the probes.

Off while no key is configured, as with Ollama. Keys come from the environment variable named by
`auth.api_keys_env` (comma-separated) and from `auth.api_keys_file` (one key per line, `#` starts
a comment; the file must be inside the project). They are never read from config.json and never
logged: the log says how many keys there are and which requests were refused, not with what.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from flask import Flask, Response, request

from modules.config_manager import AuthConfig, resolve_inside
from modules.errors import ConfigError, RequestError, Unauthorized
from modules.logger import get_logger, sanitize

log = get_logger("auth")

# What stays open with keys on: Ollama's probe and the health checks (GET/HEAD), and CORS
# preflights (browsers never send credentials on those).
# /ui is open so a browser can navigate to it; the page holds no data and asks for a key for its
# data calls (/ui/state, /v1/route), which stay protected.
OPEN_PATHS = frozenset({"/", "/health", "/ready", "/ui"})

Respond = Callable[[RequestError], Response]


def load_api_keys(auth: AuthConfig, project_dir: Path, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Every configured key, from the environment variable and the key file."""
    environ = os.environ if environ is None else environ
    keys = {k.strip() for k in environ.get(auth.api_keys_env, "").split(",")}
    if auth.api_keys_file:
        keys |= _keys_from_file(auth.api_keys_file, project_dir)
    return frozenset(k for k in keys if k)


def _keys_from_file(name: str, project_dir: Path) -> set[str]:
    try:
        path = resolve_inside(project_dir, name, "auth.api_keys_file")
        text = path.read_text(encoding="utf-8")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"auth.api_keys_file '{name}': cannot read it ({type(exc).__name__})") from exc
    return {line.split("#", 1)[0].strip() for line in text.splitlines()}


def init_api_keys(app: Flask, auth: AuthConfig, project_dir: Path, respond: Respond) -> None:
    """Refuse requests without a configured key (401 in the client's protocol) when keys exist."""
    keys = load_api_keys(auth, project_dir)
    if not keys:
        log.info("API keys off (none in $%s%s)", auth.api_keys_env,
                 f" or {auth.api_keys_file}" if auth.api_keys_file else "")
        return
    log.info("API keys on: %d key(s) configured", len(keys))
    # Compared as bytes: compare_digest refuses non-ASCII str, and a header may carry any byte.
    accepted = [k.encode("utf-8") for k in keys]

    @app.before_request
    def _require_key() -> Response | None:
        if is_open_request():
            return None
        authorization = request.headers.get("Authorization")
        # Anthropic clients (Claude Code with ANTHROPIC_API_KEY, the anthropic SDK) send the key
        # in `x-api-key` instead; the same keys are accepted there.
        if not authorization and request.headers.get("x-api-key"):
            authorization = f"Bearer {request.headers['x-api-key']}"
        problem = key_problem(authorization, accepted)
        if problem is None:
            return None
        log.warning("refused %s %s from %s: %s", request.method, sanitize(request.path, 100),
                    request.remote_addr, problem)
        response = respond(Unauthorized(problem))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response


def is_open_request() -> bool:
    if request.method == "OPTIONS":
        return True
    return request.method in ("GET", "HEAD") and request.path in OPEN_PATHS


def key_problem(authorization: str | None, accepted: list[bytes]) -> str | None:
    """What is wrong with an Authorization header (None when it carries an accepted key)."""
    if not authorization:
        return "missing API key: send 'Authorization: Bearer <key>'"
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "malformed Authorization header: expected 'Bearer <key>'"
    presented = token.strip().encode("utf-8", "surrogateescape")
    # Every key is compared (no early exit), so timing does not tell which prefix matched.
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(presented, key)
    return None if matched else "invalid API key"
