"""The HTTP backends against a real loopback upstream: events, forwarding, and every failure."""

from __future__ import annotations

import contextlib
import http.server
import logging
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import urllib3.exceptions

from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    Message,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
)
from modules.config_manager import ExpertConfig, ServerConfig
from modules.errors import (
    ExpertAnswerTooLarge,
    ExpertError,
    ExpertStreamBroken,
    ExpertTimeout,
    ExpertUnavailable,
)
from modules.http_backends import (
    OllamaBackend,
    OpenAIBackend,
    expert_error_class,
    iter_lines,
    map_requests_exceptions,
)
from tests.fakes.fake_upstream import FakeUpstream

BACKENDS = {"ollama": OllamaBackend, "openai": OpenAIBackend}
SERVER = ServerConfig(connect_timeout=2.0, read_timeout=5.0, threads=8)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
SECRET = "sk-test-0123456789"


def _expert(url: str, kind: str, **fields: object) -> ExpertConfig:
    return ExpertConfig(id=1, label="remote", type=kind, url=url, model_name="up-model", **fields)  # type: ignore[arg-type]


def _chat(**fields: object) -> ChatRequest:
    return ChatRequest(model="remote", messages=[Message(role="user", content="hi")], **fields)  # type: ignore[arg-type]


@pytest.fixture(params=sorted(BACKENDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_backend(kind: str) -> Iterator:
    built: list = []

    def make(url: str, **fields: object) -> OllamaBackend | OpenAIBackend:
        backend = BACKENDS[kind](_expert(url, kind, **fields), SERVER)
        built.append(backend)
        return backend

    yield make
    for backend in built:
        backend.close()


def _chat_path(kind: str) -> str:
    return "/api/chat" if kind == "ollama" else "/v1/chat/completions"


def _collect(events: Iterator[ChatEvent]) -> tuple[list[ChatEvent], ExpertError | None]:
    """The events that arrived before the stream failed, and the failure (if any)."""
    seen: list[ChatEvent] = []
    try:
        for event in events:
            seen.append(event)
    except ExpertError as exc:
        return seen, exc
    return seen, None


# --- answers ---------------------------------------------------------------------------------------


def test_chat_streams_text_then_one_done(fake_upstream: FakeUpstream, make_backend, kind: str) -> None:
    events = list(make_backend(fake_upstream.url).stream_chat(_chat()))
    assert events[:3] == [TextDelta("Hello"), TextDelta(" from"), TextDelta(" up-model")]
    assert len(events) == 4 and isinstance(events[3], Done)
    assert events[3].done_reason == "stop"
    assert (events[3].usage.prompt_tokens, events[3].usage.completion_tokens) == (5, 3)
    recorded = fake_upstream.last_request
    assert recorded.path == _chat_path(kind) and recorded.json["model"] == "up-model"
    assert recorded.json["stream"] is True
    assert "Authorization" not in recorded.headers


def test_ollama_usage_keeps_durations(fake_upstream: FakeUpstream) -> None:
    backend = OllamaBackend(_expert(fake_upstream.url, "ollama"), SERVER)
    done = list(backend.stream_chat(_chat()))[-1]
    assert isinstance(done, Done) and done.usage.total_duration_ns == 1_200_000_000
    backend.close()


def test_completion_kind_uses_the_completion_endpoint(fake_upstream: FakeUpstream, make_backend, kind: str) -> None:
    fake_upstream.behave("up-model", tokens=["x = ", "1"])
    request = ChatRequest(model="remote", messages=[], kind="completion", prompt="def f():", suffix="return x")
    events = list(make_backend(fake_upstream.url).stream_chat(request))
    assert events[:-1] == [TextDelta("x = "), TextDelta("1")] and isinstance(events[-1], Done)
    recorded = fake_upstream.last_request
    assert recorded.path == ("/api/generate" if kind == "ollama" else "/v1/completions")
    assert recorded.json["prompt"] == "def f():" and recorded.json["suffix"] == "return x"


def test_ollama_forwards_options_tools_and_format(fake_upstream: FakeUpstream) -> None:
    backend = OllamaBackend(_expert(fake_upstream.url, "ollama"), SERVER)
    request = _chat(options={"temperature": 0.2, "num_predict": 10, "stop": ["\n\n"]}, tools=TOOLS, format="json")
    list(backend.stream_chat(request))
    body = fake_upstream.last_request.json
    assert body["options"] == {"temperature": 0.2, "num_predict": 10, "stop": ["\n\n"]}
    assert body["tools"] == TOOLS and body["format"] == "json"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    backend.close()


def test_openai_forwards_options_tools_and_format(fake_upstream: FakeUpstream) -> None:
    backend = OpenAIBackend(_expert(fake_upstream.url, "openai"), SERVER)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    list(backend.stream_chat(_chat(options={"temperature": 0.2, "num_predict": 10}, tools=TOOLS, format=schema)))
    body = fake_upstream.last_request.json
    assert body["temperature"] == 0.2 and body["max_tokens"] == 10
    assert body["tools"] == TOOLS and body["response_format"]["json_schema"]["schema"] == schema
    assert body["stream_options"] == {"include_usage": True}
    backend.close()


def test_openai_url_with_or_without_v1(fake_upstream: FakeUpstream) -> None:
    for url in (fake_upstream.url, f"{fake_upstream.url}/v1", f"{fake_upstream.url}/v1/"):
        backend = OpenAIBackend(_expert(url, "openai"), SERVER)
        assert isinstance(list(backend.stream_chat(_chat()))[-1], Done)
        backend.close()
    assert [r.path for r in fake_upstream.requests] == ["/v1/chat/completions"] * 3


def test_tool_call_answer(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", tool_call=("get_weather", {"city": "Tokyo", "days": 3}))
    events = list(make_backend(fake_upstream.url).stream_chat(_chat(tools=TOOLS)))
    calls = [e.call for e in events if isinstance(e, ToolCallDelta)]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Tokyo", "days": 3})]
    assert not any(isinstance(e, TextDelta) for e in events)
    assert [type(e) for e in events][-1] is Done and sum(isinstance(e, Done) for e in events) == 1


def test_thinking_comes_before_text(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", thinking=["let me see"], tokens=["ok"])
    events = list(make_backend(fake_upstream.url).stream_chat(_chat()))
    assert events[:2] == [ThinkingDelta("let me see"), TextDelta("ok")]


def test_concurrent_streams_share_the_pool(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", tokens=["a", "b", "c"], delay_between=0.2)
    backend = make_backend(fake_upstream.url)
    results: list[list[ChatEvent]] = []

    def run() -> None:
        results.append(list(backend.stream_chat(_chat())))

    threads = [threading.Thread(target=run) for _ in range(6)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    # Six 0.4 s answers in parallel, not one after the other (2.4 s).
    assert time.monotonic() - started < 1.8
    assert len(results) == 6 and all(r[:3] == [TextDelta("a"), TextDelta("b"), TextDelta("c")] for r in results)


# --- API keys ----------------------------------------------------------------------------------------


def test_api_key_is_sent_as_bearer(fake_upstream: FakeUpstream, make_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_API_KEY", SECRET)
    fake_upstream.behave("up-model", require_key=SECRET)
    events = list(make_backend(fake_upstream.url, api_key_env="UPSTREAM_API_KEY").stream_chat(_chat()))
    assert isinstance(events[-1], Done)
    assert fake_upstream.last_request.headers["Authorization"] == f"Bearer {SECRET}"


class _Records(logging.Handler):
    # Our own handler: caplog depends on propagation, which the app's logging set-up turns off.
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_missing_key_variable_is_unavailable_and_warned_once(fake_upstream: FakeUpstream, make_backend) -> None:
    logger = logging.getLogger("lemoe.http_backends")
    handler = _Records()
    logger.addHandler(handler)
    try:
        backend = make_backend(fake_upstream.url, api_key_env="UPSTREAM_API_KEY")
        for _ in range(2):
            with pytest.raises(ExpertUnavailable, match="UPSTREAM_API_KEY"):
                list(backend.stream_chat(_chat()))
    finally:
        logger.removeHandler(handler)
    assert [r.levelname for r in handler.records if "UPSTREAM_API_KEY" in r.getMessage()] == ["WARNING"]
    assert fake_upstream.requests == []


def test_rejected_key_never_appears_in_the_error(
    fake_upstream: FakeUpstream, make_backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_API_KEY", SECRET)
    # An upstream that echoes what it got: the key must still not reach our messages.
    fake_upstream.behave("up-model", fail_status=401, fail_body=f'{{"error": "bad key Bearer {SECRET}"}}')
    with pytest.raises(ExpertUnavailable) as info:
        list(make_backend(fake_upstream.url, api_key_env="UPSTREAM_API_KEY").stream_chat(_chat()))
    assert "401" in str(info.value) and "bad key" in str(info.value)
    assert SECRET not in str(info.value)


# --- failures before the first event ------------------------------------------------------------------


def test_backend_down_is_unavailable(closed_port_url: str, make_backend) -> None:
    with pytest.raises(ExpertUnavailable) as info:
        list(make_backend(closed_port_url).stream_chat(_chat()))
    assert isinstance(info.value.__cause__, urllib3.exceptions.NewConnectionError)


def test_error_status_is_unavailable_with_a_snippet(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", fail_status=500, fail_body='{"error":"CUDA out of memory\\u001b[31m"}\n' + "x" * 5000)
    with pytest.raises(ExpertUnavailable) as info:
        list(make_backend(fake_upstream.url).stream_chat(_chat()))
    message = str(info.value)
    assert "HTTP 500" in message and "CUDA out of memory" in message
    assert len(message) < 400 and "\n" not in message


def test_refused_answer_is_unavailable(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", refuse=True)
    with pytest.raises(ExpertUnavailable):
        list(make_backend(fake_upstream.url).stream_chat(_chat()))


def test_slow_first_token_times_out(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", delay_first=3.0)
    started = time.monotonic()
    with pytest.raises(ExpertTimeout):
        list(make_backend(fake_upstream.url, timeout=0.3).stream_chat(_chat()))
    assert time.monotonic() - started < 2.0


# --- failures after events went out --------------------------------------------------------------------


def test_stall_between_chunks_times_out(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", delay_between=3.0)
    seen, error = _collect(make_backend(fake_upstream.url, timeout=0.3).stream_chat(_chat()))
    assert seen == [TextDelta("Hello")] and isinstance(error, ExpertTimeout)


def test_drop_mid_stream_breaks_the_stream(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", drop_after=2)
    seen, error = _collect(make_backend(fake_upstream.url).stream_chat(_chat()))
    assert seen == [TextDelta("Hello"), TextDelta(" from")]
    assert isinstance(error, ExpertStreamBroken)


def test_garbage_breaks_the_stream(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", garbage=True)
    seen, error = _collect(make_backend(fake_upstream.url).stream_chat(_chat()))
    assert seen == [] and isinstance(error, ExpertStreamBroken)


def test_in_stream_error_breaks_the_stream(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", stream_error="model crashed", stream_error_after=1)
    seen, error = _collect(make_backend(fake_upstream.url).stream_chat(_chat()))
    assert seen == [TextDelta("Hello")]
    assert isinstance(error, ExpertStreamBroken) and "model crashed" in str(error)


def test_closing_early_releases_the_upstream(fake_upstream: FakeUpstream, make_backend) -> None:
    fake_upstream.behave("up-model", tokens=["tok"] * 200, delay_between=0.05)
    events = make_backend(fake_upstream.url).stream_chat(_chat())
    assert next(events) == TextDelta("tok")
    started = time.monotonic()
    events.close()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 1.0
    # The upstream notices its client is gone instead of writing 200 chunks into the void.
    assert fake_upstream.wait_for_disconnects(1, timeout=3.0)


# --- the one place foreign exceptions are translated ---------------------------------------------------


def _instances_of_every_requests_exception() -> list[BaseException]:
    classes = [
        cls
        for cls in vars(requests.exceptions).values()
        if isinstance(cls, type) and issubclass(cls, requests.exceptions.RequestException)
    ]
    instances = []
    for cls in classes:
        try:
            instances.append(cls("boom"))
        except TypeError:  # JSONDecodeError wants (msg, doc, pos)
            instances.append(cls("boom", "", 0))
    return instances


@pytest.mark.parametrize("exc", _instances_of_every_requests_exception(), ids=lambda e: type(e).__name__)
def test_every_requests_exception_is_mapped(exc: BaseException) -> None:
    assert expert_error_class(exc) is not None
    with pytest.raises(ExpertError) as info:
        with map_requests_exceptions("remote"):
            raise exc
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (requests.exceptions.ConnectTimeout("connect"), ExpertTimeout),
        (requests.exceptions.ReadTimeout("read"), ExpertTimeout),
        (requests.ConnectionError(urllib3.exceptions.ReadTimeoutError(None, "/api/chat", "read timed out")), ExpertTimeout),
        (requests.ConnectionError("refused"), ExpertUnavailable),
        (requests.exceptions.ChunkedEncodingError("cut"), ExpertStreamBroken),
        (urllib3.exceptions.ProtocolError("reset"), ExpertStreamBroken),
        (urllib3.exceptions.ReadTimeoutError(None, "/", "slow"), ExpertTimeout),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), ExpertStreamBroken),
        (ConnectionResetError("reset"), ExpertUnavailable),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.__name__,
)
def test_mapping_picks_the_most_specific_error(exc: BaseException, expected: type[ExpertError]) -> None:
    with pytest.raises(expected):
        with map_requests_exceptions("remote"):
            raise exc


def test_mapping_leaves_our_errors_and_bugs_alone() -> None:
    ours = ExpertStreamBroken("from a converter")
    with pytest.raises(ExpertStreamBroken) as info:
        with map_requests_exceptions("remote"):
            raise ours
    assert info.value is ours
    with pytest.raises(KeyError):
        with map_requests_exceptions("remote"):
            raise KeyError("a bug stays a bug")


def test_mapped_messages_hide_the_key() -> None:
    with pytest.raises(ExpertUnavailable) as info:
        with map_requests_exceptions("remote", secret=SECRET):
            raise requests.ConnectionError(f"proxy said: bad token {SECRET}")
    assert SECRET not in str(info.value) and "***" in str(info.value)


# --- the transport: lines and proxies ------------------------------------------------------------


def test_lines_are_split_like_requests_does() -> None:
    from modules.http_backends import iter_lines

    chunks = [b"data: a\nda", b"ta: b\r\n", b"\r\n", b"", b"data: c\rlast"]
    expected = list(_requests_iter_lines(chunks))
    assert list(iter_lines(chunks)) == expected == [b"data: a", b"data: b", b"", b"data: c", b"last"]
    assert list(iter_lines([])) == []


def test_a_line_longer_than_a_chunk_is_joined_once() -> None:
    from modules.http_backends import iter_lines

    line = b"x" * 100_000
    chunks = [line[i : i + 512] for i in range(0, len(line), 512)] + [b"\r", b"\nnext\n"]
    assert list(iter_lines(chunks)) == [line, b"", b"next"]


@pytest.mark.parametrize("chunk_size", [1, 7, 512])
def test_a_line_at_the_limit_passes_and_one_byte_more_does_not(chunk_size: int) -> None:
    from modules.http_backends import iter_lines

    def chunked(data: bytes) -> list[bytes]:
        return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]

    assert list(iter_lines(chunked(b"a" * 64 + b"\nb\n"), max_line_bytes=64)) == [b"a" * 64, b"b"]
    assert list(iter_lines(chunked(b"a" * 64), max_line_bytes=64)) == [b"a" * 64]
    lines = iter_lines(chunked(b"ok\n" + b"a" * 65 + b"\n"), max_line_bytes=64)
    assert next(lines) == b"ok"
    with pytest.raises(ExpertAnswerTooLarge, match="line longer than 64 bytes"):
        next(lines)


def test_a_line_without_end_is_refused_as_soon_as_it_passes_the_limit() -> None:
    from modules.http_backends import iter_lines

    sent: list[int] = []

    def endless_line() -> Iterator[bytes]:
        while True:
            sent.append(512)
            yield b"a" * 512

    with pytest.raises(ExpertAnswerTooLarge):
        list(iter_lines(endless_line(), max_line_bytes=4096))
    assert sum(sent) == 4096 + 512


def test_the_answer_limit_counts_every_byte_including_line_breaks() -> None:
    from modules.http_backends import iter_lines

    assert len(list(iter_lines([b"ab\n"] * 10, max_answer_bytes=30))) == 10
    lines = iter_lines([b"ab\n"] * 11, max_answer_bytes=30)
    assert [next(lines) for _ in range(10)] == [b"ab"] * 10
    with pytest.raises(ExpertAnswerTooLarge, match="answer longer than 30 bytes"):
        next(lines)


def test_an_sse_event_of_endless_short_lines_is_bounded() -> None:
    from modules.http_backends import bounded_sse_events

    event = [b"data: " + b"a" * 10] * 5 + [b""]
    assert list(bounded_sse_events(event * 3, 5 * 17)) == event * 3
    with pytest.raises(ExpertAnswerTooLarge, match="event longer than 84 bytes"):
        list(bounded_sse_events(event, 5 * 17 - 1))


_YIELD_CHECK = """
from gevent import monkey
monkey.patch_all()
import time, gevent
from modules.http_backends import iter_lines

ticks = []

def other_request():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.001)

def busy_chunks():
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        yield b"x" * 64 + b"\\n"

gevent.spawn(other_request)
gevent.sleep(0)
ticks.clear()
lines = sum(1 for _ in iter_lines(busy_chunks()))
print(lines, len(ticks))
"""


def test_reading_lets_the_other_greenlets_of_the_worker_run() -> None:
    """Under gevent, a read loop whose data is always there never waits, so without a pause
    no other request of the worker would run until it ends (here: zero ticks)."""
    import subprocess
    import sys

    from tests.contract.conftest import REPO

    done = subprocess.run([sys.executable, "-c", _YIELD_CHECK], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True)
    lines, ticks = map(int, done.stdout.split())
    assert lines > 1000 and ticks > 10


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_long_line_before_the_first_event_fails_the_expert_at_the_limit(
    fake_upstream: FakeUpstream, kind: str, stream: bool
) -> None:
    fake_upstream.behave("up-model", long_line=10_000_000)
    server = ServerConfig(connect_timeout=2.0, read_timeout=5.0, threads=8, max_upstream_line_bytes=65536)
    backend = BACKENDS[kind](_expert(fake_upstream.url, kind), server)
    try:
        seen, error = _collect(backend.stream_chat(_chat(stream=stream)))
    finally:
        backend.close()
    assert seen == [] and isinstance(error, ExpertAnswerTooLarge)
    assert "line longer than 65536 bytes" in str(error) or "event longer than 65536 bytes" in str(error)


def test_a_long_line_after_the_first_event_breaks_the_stream_there(fake_upstream: FakeUpstream, kind: str) -> None:
    fake_upstream.behave("up-model", tokens=["a", "b"], long_line=10_000_000, hostile_after=1)
    backend = BACKENDS[kind](_expert(fake_upstream.url, kind), SERVER)
    try:
        seen, error = _collect(backend.stream_chat(_chat(stream=True)))
    finally:
        backend.close()
    assert [e.text for e in seen if isinstance(e, TextDelta)] == ["a"]
    assert isinstance(error, ExpertAnswerTooLarge)


def test_an_endless_answer_is_cut_at_the_answer_limit(fake_upstream: FakeUpstream, kind: str) -> None:
    fake_upstream.behave("up-model", tokens=["a", "b"], endless=True, hostile_after=1)
    server = ServerConfig(connect_timeout=2.0, read_timeout=5.0, threads=8, max_upstream_line_bytes=1024,
                          max_upstream_answer_bytes=200_000)
    backend = BACKENDS[kind](_expert(fake_upstream.url, kind), server)
    try:
        seen, error = _collect(backend.stream_chat(_chat(stream=True)))
    finally:
        backend.close()
    assert len(seen) > 100 and all(isinstance(e, TextDelta) for e in seen)
    assert isinstance(error, ExpertAnswerTooLarge) and "answer longer than 200000 bytes" in str(error)


def test_an_upstream_trickling_its_first_line_is_given_up_after_the_read_timeout(
        fake_upstream: FakeUpstream, kind: str) -> None:
    # A byte every 50 ms: each read is quick, but the first line would take seconds.
    fake_upstream.behave("up-model", trickle=0.05)
    server = ServerConfig(connect_timeout=2.0, read_timeout=0.5, threads=8)
    backend = BACKENDS[kind](_expert(fake_upstream.url, kind), server)
    started = time.monotonic()
    try:
        seen, error = _collect(backend.stream_chat(_chat(stream=True)))
    finally:
        backend.close()
    # Nothing was sent, so the runner answers with the fallback expert.
    assert seen == [] and isinstance(error, ExpertTimeout)
    assert time.monotonic() - started < 5


def test_a_deadline_for_the_first_line_only() -> None:
    late = time.monotonic() - 1
    with pytest.raises(ExpertTimeout):
        list(iter_lines([b"no line yet"], first_line_by=late))

    def chunks() -> Iterator[bytes]:
        yield b"first\n"
        time.sleep(0.05)
        yield b"second\n"

    # Once a line is through, the deadline is over: later lines may take their time.
    assert list(iter_lines(chunks(), first_line_by=time.monotonic() + 0.01)) == [b"first", b"second"]


def _requests_iter_lines(chunks: list[bytes]):
    # requests' own iter_lines over the same chunks, as the reference behaviour.
    response = requests.models.Response()
    response.iter_content = lambda chunk_size=512, decode_unicode=False: iter(chunks)  # type: ignore[method-assign]
    return response.iter_lines()


def test_the_environment_proxy_is_used_unless_no_proxy_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from modules.http_backends import connection_pool

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert isinstance(connection_pool("http://ollama.example:11434", 4), urllib3.ProxyManager)
    monkeypatch.setenv("NO_PROXY", "ollama.example")
    pool = connection_pool("http://ollama.example:11434", 4)
    assert not isinstance(pool, urllib3.ProxyManager) and isinstance(pool, urllib3.PoolManager)


# --- connection reuse ----------------------------------------------------------------------------


class _KeepAliveUpstream(http.server.ThreadingHTTPServer):
    """HTTP/1.1 with keep-alive and chunked answers (the werkzeug fake closes every connection).

    Counts the connections it accepted. `linger` seconds pass between the final event and the
    end of the body, as from an upstream that is slow to finish (or never does).
    """

    daemon_threads = True

    def __init__(self, linger: float = 0.0) -> None:
        self.connections = 0
        self.linger = linger
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _KeepAliveUpstream

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/api/chat":
            events = [b'{"message":{"role":"assistant","content":"hi"},"done":false}\n',
                      b'{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop"}\n']
            content_type = "application/x-ndjson"
        else:
            events = [b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n',
                      b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
                      b"data: [DONE]\n\n"]
            content_type = "text/event-stream"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        time.sleep(self.server.linger)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@contextlib.contextmanager
def _keep_alive_upstream(linger: float = 0.0) -> Iterator[_KeepAliveUpstream]:
    server = _KeepAliveUpstream(linger)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_finished_answers_leave_their_connection_for_the_next(make_backend, kind: str) -> None:
    with _keep_alive_upstream() as upstream:
        backend = make_backend(upstream.url)
        for _ in range(5):
            events = list(backend.stream_chat(_chat()))
            assert isinstance(events[-1], Done)
        # The end of each body was read, so one connection served all five answers.
        assert upstream.connections == 1


def test_a_body_that_does_not_end_after_the_answer_costs_its_connection_not_the_answer(
    make_backend, kind: str
) -> None:
    with _keep_alive_upstream(linger=3.0) as upstream:
        backend = make_backend(upstream.url)
        started = time.monotonic()
        events = list(backend.stream_chat(_chat()))
        took = time.monotonic() - started
        assert isinstance(events[-1], Done)
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "hi"
        assert took < 2.0
        list(backend.stream_chat(_chat()))
        assert upstream.connections == 2


class _PacedUpstream(http.server.ThreadingHTTPServer):
    """Sends the first event, then holds the rest of the answer until the reader has the first
    event (or 5 s pass): chunked, or close-delimited (no length, the end of the body is the end
    of the connection, as HTTP/1.0 servers stream)."""

    daemon_threads = True

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self.first_event_seen = threading.Event()
        self.gave_up_waiting = False
        super().__init__(("127.0.0.1", 0), _PacedHandler)


class _PacedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _PacedUpstream

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        first = b'{"message":{"role":"assistant","content":"hi"},"done":false}\n'
        rest = b'{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop"}\n'
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        if self.server.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        frame = (lambda data: b"%x\r\n%s\r\n" % (len(data), data)) if self.server.chunked else (lambda data: data)
        self.wfile.write(frame(first))
        self.wfile.flush()
        self.server.gave_up_waiting = not self.server.first_event_seen.wait(5)
        self.wfile.write(frame(rest) + (b"0\r\n\r\n" if self.server.chunked else b""))
        self.wfile.flush()
        self.close_connection = True


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_each_event_is_passed_on_as_soon_as_it_arrives(chunked: bool) -> None:
    upstream = _PacedUpstream(chunked)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    backend = OllamaBackend(_expert(f"http://127.0.0.1:{upstream.server_address[1]}", "ollama"), SERVER)
    try:
        events = []
        for event in backend.stream_chat(_chat()):
            events.append(event)
            upstream.first_event_seen.set()
    finally:
        backend.close()
        upstream.shutdown()
        upstream.server_close()
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["hi"] and isinstance(events[-1], Done)
    assert not upstream.gave_up_waiting, "the reader waited for more bytes before passing on the first event"
