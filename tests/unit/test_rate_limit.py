"""The rate-limit guard on a bare Flask app (the live-server behaviour is in tests/hardening)."""

from __future__ import annotations

import pytest
from flask import Flask, Response, jsonify, request

from modules.config_manager import RateLimitConfig
from modules.errors import ConfigError, RequestError
from modules.guards.rate_limit import init_rate_limit


def respond(err: RequestError) -> Response:
    response = jsonify({"error": err.message})
    response.status_code = err.status_code
    response.headers["Retry-After"] = str(err.retry_after)
    return response


def app_with(config: RateLimitConfig) -> Flask:
    app = Flask(__name__)
    app.add_url_rule("/", "root", lambda: "ok", methods=["GET"])
    app.add_url_rule("/work", "work", lambda: request.remote_addr or "", methods=["GET", "POST"])
    init_rate_limit(app, config, respond)
    return app


def test_limit_is_per_client_and_shared_by_routes() -> None:
    client = app_with(RateLimitConfig(per_minute=2)).test_client()
    a = {"REMOTE_ADDR": "10.0.0.1"}
    assert client.get("/work", environ_base=a).status_code == 200
    assert client.post("/work", environ_base=a).status_code == 200
    refused = client.get("/work", environ_base=a)
    assert refused.status_code == 429 and refused.json == {"error": "rate limit exceeded: 2 requests per minute; "
                                                                    f"retry in {refused.headers['Retry-After']}s"}
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert client.get("/work", environ_base={"REMOTE_ADDR": "10.0.0.2"}).status_code == 200
    assert client.get("/", environ_base=a).status_code == 200
    assert client.options("/work", environ_base=a).status_code == 200


def test_zero_turns_the_limit_off() -> None:
    client = app_with(RateLimitConfig(per_minute=0)).test_client()
    assert {client.get("/work").status_code for _ in range(100)} == {200}


def test_forwarded_for_is_used_only_behind_trusted_proxies() -> None:
    spoofed = {"REMOTE_ADDR": "10.0.0.9"}
    headers = {"X-Forwarded-For": "203.0.113.5"}
    untrusted = app_with(RateLimitConfig()).test_client()
    assert untrusted.get("/work", headers=headers, environ_base=spoofed).text == "10.0.0.9"
    trusted = app_with(RateLimitConfig(trusted_proxies=1)).test_client()
    assert trusted.get("/work", headers=headers, environ_base=spoofed).text == "203.0.113.5"


@pytest.mark.parametrize("uri", ["nosuch://host", "mongodb://127.0.0.1"])
def test_unusable_storage_is_a_config_error(uri: str) -> None:
    with pytest.raises(ConfigError, match="rate_limit.storage_uri"):
        app_with(RateLimitConfig(storage_uri=uri))


def test_a_storage_failure_while_timing_the_window_is_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    app = Flask(__name__)
    app.add_url_rule("/work", "work", lambda: "ok", methods=["GET"])
    limiter = init_rate_limit(app, RateLimitConfig(per_minute=1), respond)
    assert limiter is not None
    client = app.test_client()
    assert client.get("/work").status_code == 200

    def storage_down(*args: object) -> None:
        raise ConnectionError("storage went away")

    # The count still refuses the request; only asking the storage when the window ends fails.
    monkeypatch.setattr(limiter.storage, "get_moving_window", storage_down)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("lemoe.rate_limit")
    logger.addHandler(handler)
    try:
        refused = client.get("/work")
    finally:
        logger.removeHandler(handler)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
    failures = [r.getMessage() for r in records if "storage failed" in r.getMessage()]
    assert failures == ["rate limit storage failed to tell when 127.0.0.1's window ends "
                        "(ConnectionError: storage went away); Retry-After 60 s"]
    assert all(r.levelno == logging.WARNING for r in records if "storage failed" in r.getMessage())
