"""Slow clients cannot hold a request slot: a server with two slots (`threads: 2`) and a 1-second client
timeout ($LEMOE_CLIENT_TIMEOUT) against clients that stall or dribble their body, or stop reading
a streamed answer."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

from tests.fakes.fake_upstream import FakeUpstream
from tests.hardening.conftest import StartLemoe
from tests.live_server import LiveServer

CLIENT_TIMEOUT = 1.0
CHAT = json.dumps({"model": "lemoe", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()


@pytest.fixture(scope="module")
def two_threads(start_lemoe: StartLemoe) -> LiveServer:
    return start_lemoe({"server": {"threads": 2}}, env={"LEMOE_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT)})


@contextmanager
def connection(server: LiveServer, receive_buffer: int | None = None) -> Iterator[socket.socket]:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(15)
    sock.connect((host, int(port)))
    try:
        yield sock
    finally:
        sock.close()


def head(route: str, length: int) -> bytes:
    return (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    header_block, _, body = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("route,expected", [
    ("/api/chat", {"error": "request body not received within 1 seconds"}),
    ("/v1/chat/completions", {"error": {"message": "request body not received within 1 seconds",
                                        "type": "api_error", "param": None, "code": None}}),
])
def test_stalled_body_gets_408_in_protocol(two_threads: LiveServer, route: str, expected: dict) -> None:
    with connection(two_threads) as sock:
        started = time.monotonic()
        sock.sendall(head(route, 200) + b'{"model": ')
        status, _, body = read_reply(sock)
        elapsed = time.monotonic() - started
    assert status == 408 and json.loads(body) == expected
    assert CLIENT_TIMEOUT - 0.1 < elapsed < CLIENT_TIMEOUT + 2


def test_dribbled_body_is_cut_at_the_deadline(two_threads: LiveServer) -> None:
    # Each byte arrives well within the timeout; the body as a whole does not.
    with connection(two_threads) as sock:
        started = time.monotonic()
        sock.sendall(head("/api/chat", 100))
        status = None
        for _ in range(40):
            try:
                sock.sendall(b" ")
            except OSError:
                break
            time.sleep(0.25)
            sock.setblocking(False)
            try:
                peek = sock.recv(65536, socket.MSG_PEEK)
            except BlockingIOError:
                peek = b""
            sock.setblocking(True)
            if peek:
                status = int(peek.split()[1])
                break
    assert status == 408
    assert time.monotonic() - started < CLIENT_TIMEOUT + 2


def test_stalled_clients_do_not_lock_out_others(two_threads: LiveServer) -> None:
    with connection(two_threads) as first, connection(two_threads) as second, connection(two_threads) as third:
        for sock in (first, second, third):
            sock.sendall(head("/api/chat", 500) + b"{")
        started = time.monotonic()
        r = requests.post(two_threads.url + "/api/chat", data=CHAT, timeout=15)
        assert r.status_code == 200 and r.json()["message"]["content"] == "Hello from fallback-model"
        assert time.monotonic() - started < 2 * CLIENT_TIMEOUT + 3


def test_client_that_stops_reading_a_stream_is_dropped_and_the_expert_stopped(
        two_threads: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("flaky-model", tokens=["y" * 20_000] * 400)
    body = json.dumps({"model": "lemoe", "messages": [{"role": "user", "content": "weather"}]}).encode()
    with connection(two_threads, receive_buffer=4096) as sock:
        sock.sendall(head("/api/chat", len(body)) + body)
        sock.recv(1024)  # the answer has started; from now on this client reads nothing
        assert fake_upstream.wait_for_disconnects(1, timeout=CLIENT_TIMEOUT + 8)
    r = requests.post(two_threads.url + "/api/chat", data=CHAT, timeout=15)
    assert r.status_code == 200


def test_dribbled_headers_are_cut_after_the_keep_alive_time(two_threads: LiveServer) -> None:
    # gunicorn's gevent worker gives a request line and its headers the keep-alive time (5 s)
    # to arrive; a client sending a byte every 0.2 s would otherwise hold a connection slot
    # for as long as it likes.
    with connection(two_threads) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        for _ in range(100):
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            sock.setblocking(False)
            try:
                closed = sock.recv(65536) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed = True
            sock.setblocking(True)
            if closed:
                break
        took = time.monotonic() - started
    assert closed
    assert took < 5 + 3
    # The slot is free again: a normal request is answered.
    r = requests.post(two_threads.url + "/api/chat", data=CHAT, timeout=15)
    assert r.status_code == 200
