"""Request bodies of no declared length (`Transfer-Encoding: chunked`) on the real server: over
`server.max_body_bytes` they get 413, as bodies with a `Content-Length` do, instead of being cut
at the limit and served; a malformed chunked body gets 400. Both in the protocol of the route.

Requests that carry images may be up to `server.max_image_body_bytes` (a phone photo is several
MB of base64); every 413 names the field to raise.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from tests.fakes.fake_upstream import FakeUpstream
from tests.hardening.test_hostile_requests import expected_error
from tests.hardening.test_request_heads import exchange
from tests.live_server import LiveServer

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
    assert json.loads(answer) == expected_error(
        route, 413, f"request body is larger than {MAX_BODY} bytes; raise server.max_body_bytes to accept it")


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


# --- images: their own, larger limit ---------------------------------------------------------------

MAX_IMAGE_BODY = 10 * 1024 * 1024
# A phone photo's worth of base64 (about 3 MB of JPEG).
PHOTO = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\x00" * 3_000_000).decode()
WITH_PHOTO = {
    "/api/chat": {"model": "coder", "stream": False,
                  "messages": [{"role": "user", "content": "what is in this photo?", "images": [PHOTO]}]},
    "/api/generate": {"model": "coder", "stream": False, "prompt": "what is in this photo?", "images": [PHOTO]},
    "/v1/chat/completions": {"model": "writer", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in this photo?"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PHOTO}"}}]}]},
    "/v1/messages": {"model": "writer", "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in this photo?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PHOTO}}]}]},
    "/v1/responses": {"model": "writer", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is in this photo?"},
        {"type": "input_image", "image_url": f"data:image/jpeg;base64,{PHOTO}"}]}]},
}
IMAGE_LIMIT_MESSAGE = (f"request body is larger than {MAX_IMAGE_BODY} bytes, the limit for requests that may carry "
                       "images; raise server.max_image_body_bytes to accept it")
TEXT_LIMIT_MESSAGE = f"request body is larger than {MAX_BODY} bytes; raise server.max_body_bytes to accept it"


@pytest.mark.parametrize("route", list(WITH_PHOTO))
def test_a_phone_photo_is_not_refused(open_server: LiveServer, fake_upstream: FakeUpstream, route: str) -> None:
    body = json.dumps(WITH_PHOTO[route]).encode()
    assert MAX_BODY < len(body) < MAX_IMAGE_BODY
    reply = requests.post(open_server.url + route, data=body, timeout=60)
    assert reply.status_code == 200, reply.text[:300]
    sent = fake_upstream.last_request.json
    forwarded = sent["messages"][-1] if "messages" in sent else sent
    assert PHOTO in json.dumps(forwarded)


@pytest.mark.parametrize("route", list(WITH_PHOTO))
def test_text_over_the_text_limit_is_refused_on_image_routes_too(open_server: LiveServer, route: str) -> None:
    body = WITH_PHOTO[route]
    text_only = {key: value for key, value in body.items() if key != "images"}
    if "messages" in body:
        text_only["messages"] = [{"role": "user", "content": "x" * 2_000_000}]
    elif "input" in body:
        text_only["input"] = "x" * 2_000_000
    else:
        text_only["prompt"] = "x" * 2_000_000
    reply = requests.post(open_server.url + route, json=text_only, timeout=60)
    assert reply.status_code == 413 and reply.json() == expected_error(route, 413, TEXT_LIMIT_MESSAGE)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
def test_past_the_image_limit_the_413_names_max_image_body_bytes(open_server: LiveServer, route: str,
                                                                 chunked: bool) -> None:
    body = padded(route, MAX_IMAGE_BODY + 10)
    if chunked:
        status, _, answer = post_chunked(open_server, route, body)
    else:
        reply = requests.post(open_server.url + route, data=body, timeout=60)
        status, answer = reply.status_code, reply.content
    assert status == 413 and json.loads(answer) == expected_error(route, 413, IMAGE_LIMIT_MESSAGE)


def test_routes_without_images_keep_the_text_limit(open_server: LiveServer) -> None:
    photo_body = json.dumps({"model": "lemoe", "input": [PHOTO]}).encode()
    for route in ("/api/embed", "/v1/embeddings"):
        reply = requests.post(open_server.url + route, data=photo_body, timeout=60)
        assert reply.status_code == 413 and reply.json() == expected_error(route, 413, TEXT_LIMIT_MESSAGE)
