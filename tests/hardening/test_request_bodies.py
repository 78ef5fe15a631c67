"""Request bodies of no declared length (`Transfer-Encoding: chunked`) on the real server: over
`server.max_body_bytes` they get 413, as bodies with a `Content-Length` do, instead of being cut
at the limit and served; a malformed chunked body gets 400. Both in the protocol of the route.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.contract.conftest import LiveServer
from tests.hardening.test_hostile_requests import expected_error
from tests.hardening.test_request_heads import exchange

MAX_BODY = 1_048_576
CHAT = {"/api/chat": {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "stream": False},
        "/v1/chat/completions": {"model": "writer", "messages": [{"role": "user", "content": "hi"}]}}


def padded(route: str, size: int) -> bytes:
    """A valid chat request of exactly `size` bytes: the JSON, then spaces."""
    body = json.dumps(CHAT[route]).encode()
    return body + b" " * (size - len(body))


def post_chunked(server: LiveServer, route: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", route, body=pieces(), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("route", list(CHAT))
@pytest.mark.parametrize("body", ["valid JSON padded with spaces", "one long string"])
def test_a_chunked_body_over_the_limit_gets_413_in_the_protocol(open_server: LiveServer, route: str,
                                                                body: str) -> None:
    data = padded(route, 1_500_000) if body.startswith("valid") else b'"' + b"a" * 1_500_000 + b'"'
    status, headers, answer = post_chunked(open_server, route, data)
    assert status == 413, answer[:300]
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(answer) == expected_error(route, 413, f"request body is larger than {MAX_BODY} bytes")


@pytest.mark.parametrize("route", list(CHAT))
@pytest.mark.parametrize("size", [MAX_BODY, MAX_BODY + 1])
def test_the_chunked_limit_is_exact(open_server: LiveServer, route: str, size: int) -> None:
    status, _, answer = post_chunked(open_server, route, padded(route, size))
    if size <= MAX_BODY:
        assert status == 200, answer[:300]
        text = json.loads(answer)
        content = text["message"]["content"] if route == "/api/chat" else text["choices"][0]["message"]["content"]
        assert content.startswith("Hello from")
    else:
        assert status == 413, answer[:300]


@pytest.mark.parametrize("route", list(CHAT))
@pytest.mark.parametrize("framing", [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX\r\n0\r\n\r\n"], ids=["bad size", "no terminator"])
def test_a_malformed_chunked_body_is_a_400_in_the_protocol(open_server: LiveServer, route: str, framing: bytes) -> None:
    reply = exchange(open_server, f"POST {route} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                     + framing)
    assert reply.status == 400, reply.status_line
    assert reply.json() == expected_error(route, 400, "malformed request body")
    assert f"POST {route}: malformed request body from 127.0.0.1" in open_server.log_text()
