"""Request heads gunicorn refuses before the app runs (a request line or headers too large, too
many headers, bytes a header may not hold), on the real server through raw sockets: each is
answered in the protocol of the request's path with gunicorn's status, not as gunicorn's HTML
page, and the limits come from the config.
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.hardening.conftest import StartLemoe
from tests.hardening.test_hostile_requests import assert_no_leak, expected_error
from tests.live_server import LiveServer

PATHS = ["/", "/api/chat", "/api/tags", "/v1/chat/completions", "/v1/models"]
HEADERS_TOO_LARGE = "request headers are too large: at most 100 fields of 8190 bytes each"
SECRET = "sk-secret-1234567890"


class RawReply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(server: LiveServer, data: bytes) -> RawReply:
    """Send raw bytes, read the answer until the server closes the connection."""
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return RawReply(received)


def head_request(method: str, target: str, headers: list[tuple[str, bytes]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: lemoe"]
    lines += [name.encode() + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def assert_error_reply(reply: RawReply, path: str, status: int, message: str) -> None:
    assert reply.status == status, reply.status_line
    assert reply.headers["content-type"] == "application/json; charset=utf-8"
    assert reply.headers["connection"] == "close"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert reply.json() == expected_error(path, status, message)
    assert_no_leak(reply.body.decode())


# Case -> (request bytes for a path, status, message).
HEAD_CASES: dict[str, tuple[Any, int, str]] = {
    "a 60 KB header": (lambda path: head_request("POST", path, [("X-Big", b"a" * 60_000)]),
                       431, HEADERS_TOO_LARGE),
    "1,000 headers": (lambda path: head_request("POST", path, [(f"X-H{i}", b"v") for i in range(1000)]),
                      431, HEADERS_TOO_LARGE),
    "ANSI in Authorization": (
        lambda path: head_request("POST", path, [("Authorization", f"Bearer \x1b[31m{SECRET}\x1b[0m".encode())]),
        400, "malformed request header"),
    "NUL in a header name": (lambda path: head_request("GET", path, [("X-\x00Evil", b"1")]),
                             400, "malformed request header"),
    "a 10 KB request line": (lambda path: head_request("GET", f"{path}?q={'a' * 10_000}", []),
                             414, "request line is longer than 4094 bytes"),
    "a bad HTTP version": (lambda path: f"GET {path} HTTP/7.3\r\nHost: x\r\n\r\n".encode(),
                           400, "malformed request line"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_refused_request_heads_are_answered_in_the_protocol_of_their_path(open_server: LiveServer, case: str,
                                                                          path: str) -> None:
    build, status, message = HEAD_CASES[case]
    reply = exchange(open_server, build(path))
    assert_error_reply(reply, path, status, message)
    assert SECRET.encode() not in reply.body


def test_refused_heads_are_logged_without_the_bytes_that_broke_them(open_server: LiveServer) -> None:
    build, _, _ = HEAD_CASES["ANSI in Authorization"]
    exchange(open_server, build("/api/chat"))
    log = open_server.log_text()
    assert "request refused before the app: 400 malformed request header on /api/chat" in log
    assert SECRET not in log and "\x1b" not in log


@pytest.fixture(scope="module")
def tight_server(start_lemoe: StartLemoe) -> LiveServer:
    return start_lemoe({"server": {"max_request_line_bytes": 512, "max_header_fields": 20,
                                   "max_header_field_bytes": 1024}})


@pytest.mark.parametrize("path", ["/api/tags", "/v1/models"])
def test_request_head_limits_come_from_the_config(tight_server: LiveServer, open_server: LiveServer,
                                                  path: str) -> None:
    long_line = head_request("GET", f"{path}?q={'a' * 600}", [])
    many_headers = head_request("GET", path, [(f"X-H{i}", b"v") for i in range(30)])
    long_header = head_request("GET", path, [("X-Big", b"a" * 2000)])
    # The same requests are fine under the default limits...
    for request in (long_line, many_headers, long_header):
        assert exchange(open_server, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")).status == 200
    # ...and refused under the configured ones.
    assert_error_reply(exchange(tight_server, long_line), path, 414, "request line is longer than 512 bytes")
    tight = "request headers are too large: at most 20 fields of 1024 bytes each"
    assert_error_reply(exchange(tight_server, many_headers), path, 431, tight)
    assert_error_reply(exchange(tight_server, long_header), path, 431, tight)
