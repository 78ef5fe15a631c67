"""Rate limiting per client IP (Flask-Limiter, moving window) and the proxies trusted to name it.

Each client IP gets one budget for the whole API: `per_minute` requests in any 60 seconds
(a sliding window, not a fixed minute), whatever the route or method. The probes (`GET /`,
`HEAD /`, `/health`, `/ready`) and CORS preflights cost nothing. Over the budget the client gets
429 in its own protocol with `Retry-After` (seconds until a request leaves the window).

Counts live where `storage_uri` says: `memory://` keeps them in the process, so under gunicorn
each worker counts on its own (N workers let a client through N times the limit); a
`redis://host:port` storage is shared by every worker and replica. If Redis cannot be reached
the counts fall back to memory (logged) instead of failing requests, and go back to Redis once it
answers again. A storage that fails while telling when a refused client's window ends is logged
too, and the client is told to wait a whole window.

The client IP is the TCP peer. `X-Forwarded-For` is believed only for `trusted_proxies` hops
(werkzeug's ProxyFix): with 0, a client cannot dodge its limit by sending the header.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from flask import Flask, Response, request
from flask_limiter import Limiter, RateLimitExceeded
from limits.errors import ConfigurationError
from werkzeug.middleware.proxy_fix import ProxyFix

from modules.config_manager import RateLimitConfig
from modules.errors import ConfigError, RateLimited, RequestError
from modules.logger import get_logger, sanitize

log = get_logger("rate_limit")

# Probe routes that load balancers, Ollama clients and health checks poll: never limited.
PROBE_PATHS = frozenset({"/", "/health", "/ready"})
# A Redis that does not answer in this time counts as down (the in-memory counts take over).
_REDIS_TIMEOUT_SECONDS = 1

Respond = Callable[[RequestError], Response]


def init_rate_limit(app: Flask, config: RateLimitConfig, respond: Respond) -> Limiter | None:
    """Trust the configured proxies and, unless `per_minute` is 0, limit every client IP."""
    trust_proxies(app, config.trusted_proxies)
    if config.per_minute == 0:
        log.info("rate limit off (rate_limit.per_minute is 0)")
        return None
    limit = f"{config.per_minute} per minute"
    try:
        limiter = Limiter(
            client_address,
            app=app,
            application_limits=[limit],
            in_memory_fallback=[limit],
            strategy="moving-window",
            storage_uri=config.storage_uri,
            storage_options=_storage_options(config.storage_uri),
            key_prefix="lemoe",
            headers_enabled=False,
            # Unknown routes and wrong methods have no endpoint; they still cost the client.
            request_identifier=lambda: request.endpoint or "unrouted",
        )
    except ConfigurationError as exc:
        raise ConfigError(f"rate_limit.storage_uri: {exc}") from exc
    limiter.request_filter(is_exempt)
    app.register_error_handler(RateLimitExceeded, lambda exc: respond(_rate_limited(limiter, config.per_minute)))
    log.info("rate limit: %d requests per minute per client IP (moving window, storage %s)",
             config.per_minute, config.storage_uri.split("://", 1)[0])
    return limiter


def trust_proxies(app: Flask, count: int) -> None:
    """Take the client IP from the last `count` X-Forwarded-For hops (the trusted proxies)."""
    if count > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count)  # type: ignore[method-assign]
        log.info("trusting X-Forwarded-For from %d proxy hop(s)", count)


def client_address() -> str:
    return request.remote_addr or "unknown"


def is_exempt() -> bool:
    """Probes and CORS preflights are free: browsers send a preflight before many requests."""
    if request.method == "OPTIONS":
        return True
    return request.method in ("GET", "HEAD") and request.path in PROBE_PATHS


def _rate_limited(limiter: Limiter, per_minute: int) -> RateLimited:
    retry_after = _seconds_until_reset(limiter)
    log.warning("rate limit hit by %s on %s %s", client_address(), request.method, request.path)
    return RateLimited(f"rate limit exceeded: {per_minute} requests per minute; retry in {retry_after}s",
                       retry_after=retry_after)


def _seconds_until_reset(limiter: Limiter) -> int:
    """Seconds until the oldest request in the client's window expires (at least 1)."""
    current = limiter.current_limit
    try:
        reset_at = current.window.reset_time if current is not None else time.time() + 60
    except Exception as exc:  # noqa: BLE001 - any storage failure; a whole window is a safe answer
        # Logged: a storage that keeps failing here would otherwise show only as clients told
        # to wait a full minute.
        log.warning("rate limit storage failed to tell when %s's window ends (%s: %s); Retry-After 60 s",
                    client_address(), type(exc).__name__, sanitize(str(exc)))
        reset_at = time.time() + 60
    return max(1, math.ceil(reset_at - time.time()))


def _storage_options(storage_uri: str) -> dict[str, str | int]:
    if not storage_uri.startswith(("redis://", "rediss://", "redis+unix://")):
        return {}
    # Without timeouts a hung Redis would hang every request; with them it is "down" quickly.
    return {"socket_timeout": _REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": _REDIS_TIMEOUT_SECONDS}
