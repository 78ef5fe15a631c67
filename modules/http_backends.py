"""Experts that live on another server: a remote Ollama (`type: ollama`) or any OpenAI-compatible
server (`type: openai`).

Each backend owns one urllib3 connection pool (urllib3 directly: `requests` spends about 0.3 ms
of CPU per call merging settings, cookies and hooks that a gateway does not use), always streams
from the upstream (so the first event is available as early as the upstream sends it, and a hung
upstream is caught by the read timeout between chunks) and leaves every wire detail to the
protocol modules' converters. Everything `requests`/`urllib3` can throw is translated into an
`ExpertError` in one place, `map_requests_exceptions`, so the runner can fall back without
knowing which library failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import certifi
import requests
import urllib3
import urllib3.exceptions

from modules.blocking import yield_to_others
from modules.chat_types import ChatEvent, ChatRequest
from modules.config_manager import ExpertConfig, ServerConfig
from modules.protocol.embedding_protocol import (
    embed_result_from_ollama,
    embed_result_from_openai,
    ollama_embed_body_from_request,
    openai_embed_body_from_request,
)
from modules.embeddings import EmbedRequest, EmbedResult
from modules.errors import (
    ExpertAnswerTooLarge,
    ExpertError,
    ExpertStreamBroken,
    ExpertTimeout,
    ExpertUnavailable,
    InvalidRequest,
)
from modules.logger import get_logger, sanitize
from modules.protocol.ollama_protocol import (
    events_from_ollama_ndjson,
    ollama_chat_body_from_request,
    ollama_generate_body_from_request,
)
from modules.protocol.openai_protocol import (
    openai_chat_body_from_request,
    openai_completion_body_from_request,
)
from modules.protocol.openai_upstream import events_from_openai_sse

_log = get_logger("http_backends")

# How much of an error body goes into the log line: enough to see the upstream's reason.
_SNIPPET_BYTES = 1024
_SNIPPET_CHARS = 200
# Most bytes per read of a streamed answer. A read returns one HTTP chunk of a chunked answer
# (every streaming upstream's), or what has arrived of any other, so the size never holds back a
# token; it only saves reads on large answers (at 512 bytes, one MiB of a long line took 2,048).
_READ_BYTES = 65536
# After the final event an upstream sends at most the end of its body (a chunked stream's
# terminator, a trailing blank line). Reading that lets the connection serve the next request;
# an upstream that goes on sending, or stalls, loses its connection instead of our time.
_TAIL_LINES = 8
_TAIL_SECONDS = 0.5
# An upstream that sends faster than we forward never makes a read wait, so a read loop would
# keep the worker's one thread (every other request's too, under gevent) to itself. Handing it
# over this often keeps another request's wait within about a millisecond per busy stream (with
# 2 ms slices, `/api/version` waited 71 ms at p99 beside 8 hostile answers, 42 ms with 1 ms, and
# 0.5 ms slices measured no better: bench/bench_hostile.py).
_PAUSE_SECONDS = 0.001

# Most specific first: ConnectTimeout is both a Timeout and a ConnectionError, and every
# requests exception is also an OSError.
EXCEPTION_MAP: tuple[tuple[type[BaseException], type[ExpertError]], ...] = (
    # urllib3 makes a refused or unresolvable connection a ConnectTimeoutError too, for old
    # callers' sake; it is not a timeout.
    (urllib3.exceptions.NewConnectionError, ExpertUnavailable),
    (requests.exceptions.Timeout, ExpertTimeout),
    (urllib3.exceptions.TimeoutError, ExpertTimeout),
    (requests.exceptions.ChunkedEncodingError, ExpertStreamBroken),
    (requests.exceptions.ContentDecodingError, ExpertStreamBroken),
    (requests.exceptions.StreamConsumedError, ExpertStreamBroken),
    (urllib3.exceptions.ProtocolError, ExpertStreamBroken),
    (urllib3.exceptions.DecodeError, ExpertStreamBroken),
    # Bytes that are not UTF-8 where the converters expect text.
    (UnicodeError, ExpertStreamBroken),
    # Refused, DNS failure, reset before the status line, bad URL, too many redirects, ...
    (requests.exceptions.RequestException, ExpertUnavailable),
    (urllib3.exceptions.HTTPError, ExpertUnavailable),
    (OSError, ExpertUnavailable),
)

_WHAT = {ExpertTimeout: "timed out", ExpertStreamBroken: "stream broke", ExpertUnavailable: "unreachable"}


def expert_error_class(exc: BaseException) -> type[ExpertError] | None:
    """The `ExpertError` subclass a foreign exception stands for, or None if it is not ours to map."""
    # requests reports a read timeout *while streaming* as a ConnectionError wrapping urllib3's
    # ReadTimeoutError (models.Response.iter_content); it is still a timeout.
    if isinstance(exc, requests.exceptions.ConnectionError) and any(
        isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in exc.args
    ):
        return ExpertTimeout
    for foreign, ours in EXCEPTION_MAP:
        if isinstance(exc, foreign):
            return ours
    return None


def _redacted(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


@contextmanager
def map_requests_exceptions(label: str, secret: str | None = None) -> Iterator[None]:
    """Re-raise whatever requests/urllib3 throw as the most specific `ExpertError`.

    `ExpertError`s (from the converters, or raised inside the block) pass through untouched.
    Messages are for the log: sanitised, bounded, and never contain `secret`.
    """
    try:
        yield
    except ExpertError:
        raise
    except Exception as exc:
        mapped = expert_error_class(exc)
        if mapped is None:
            raise
        detail = sanitize(_redacted(str(exc), secret), _SNIPPET_CHARS)
        raise mapped(f"expert '{label}' {_WHAT[mapped]} ({type(exc).__name__}: {detail})") from exc


def _body_snippet(response: urllib3.BaseHTTPResponse, secret: str | None) -> str:
    """The start of an error body, safe for one log line (an upstream may echo our headers)."""
    try:
        head = response.read(_SNIPPET_BYTES)
    except (urllib3.exceptions.HTTPError, OSError):
        return "(unreadable body)"
    text = head.decode("utf-8", "replace")
    return sanitize(_redacted(text, secret), _SNIPPET_CHARS) or "(empty body)"


def iter_lines(
    chunks: Iterable[bytes], *, max_line_bytes: int | None = None, max_answer_bytes: int | None = None,
    first_line_by: float | None = None,
) -> Iterator[bytes]:
    """The lines of a byte stream, split like `requests.Response.iter_lines` (\\n, \\r or \\r\\n).

    Linear in the size of the stream: each chunk is split once and a line that spans chunks
    grows in one buffer (re-splitting the buffered text on every read made one long line cost
    quadratic time, 1.5 s of a blocked worker for 1 MB). Raises `ExpertAnswerTooLarge` as soon
    as a line passes `max_line_bytes` or the stream passes `max_answer_bytes` (counted after
    decompression, so a small gzip bomb counts at its real size). Hands the thread to other
    requests after each millisecond of reading (`_PAUSE_SECONDS`). Raises `ExpertTimeout` when no
    line is complete by `first_line_by` (a `time.monotonic()` value): the read timeout bounds each
    read, so an upstream trickling a byte a second would otherwise never be given up on.
    """
    pending = bytearray()
    total = 0
    paused_at = time.monotonic()
    for chunk in chunks:
        if first_line_by is not None and time.monotonic() > first_line_by:
            raise ExpertTimeout("no complete line within the read timeout")
        total += len(chunk)
        if max_answer_bytes is not None and total > max_answer_bytes:
            raise ExpertAnswerTooLarge(f"answer longer than {max_answer_bytes} bytes")
        if time.monotonic() - paused_at >= _PAUSE_SECONDS:
            yield_to_others()
            paused_at = time.monotonic()
        for piece in chunk.splitlines(keepends=True):
            ended = piece[-1:] in (b"\n", b"\r")
            pending += piece.rstrip(b"\r\n") if ended else piece
            if max_line_bytes is not None and len(pending) > max_line_bytes:
                raise ExpertAnswerTooLarge(f"line longer than {max_line_bytes} bytes")
            if ended:
                # A \r\n split between two chunks gives an empty line more, as in requests.
                line = bytes(pending)
                pending.clear()
                first_line_by = None
                yield line
    if pending:
        yield bytes(pending)


def bounded_sse_events(lines: Iterable[bytes], max_event_bytes: int) -> Iterator[bytes]:
    """`lines` unchanged, but an SSE event (the lines up to a blank one) may not pass
    `max_event_bytes`: an event made of endless short `data:` lines is joined and parsed whole."""
    size = 0
    for line in lines:
        size = size + len(line) + 1 if line else 0
        if size > max_event_bytes:
            raise ExpertAnswerTooLarge(f"event longer than {max_event_bytes} bytes")
        yield line


def _body_chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The decoded body as it arrives, at most `_READ_BYTES` a piece.

    Not `response.stream(n)`: on an answer that is not chunked it waits for n bytes (or the
    end), which at a useful size would hold back the tokens of a close-delimited stream.
    """
    # Every response here comes from a PoolManager, an HTTPResponse; the base class lacks this.
    if response.chunked and response.supports_chunked_reads():  # type: ignore[attr-defined]
        yield from response.read_chunked(_READ_BYTES, decode_content=True)
        return
    while data := response.read1(_READ_BYTES):
        yield data


def _read_tail(lines: Iterator[bytes], response: urllib3.BaseHTTPResponse) -> bool:
    """Read what follows the final event; True if the body ended there (the connection is reusable).

    Without this the unread terminator makes urllib3 see the pooled connection as dropped, and
    every request paid for a new connection (and, in the upstream, a new handler).
    """
    sock = getattr(response.connection, "sock", None)
    previous = sock.gettimeout() if sock is not None else None
    try:
        if sock is not None:
            sock.settimeout(_TAIL_SECONDS)
        for count, _ in enumerate(lines, start=1):
            if count > _TAIL_LINES:
                return False
        return True
    except (urllib3.exceptions.HTTPError, OSError):
        return False
    finally:
        if sock is not None:
            try:
                sock.settimeout(previous)
            except OSError:
                pass


def connection_pool(base_url: str, size: int) -> urllib3.PoolManager:
    """A pool for one upstream, through the proxy the environment names for it, if any.

    The environment is read once here, like the API key: re-reading proxy variables and ~/.netrc
    on every call is what made `requests` slow.
    """
    options: dict[str, Any] = {
        "num_pools": 2,
        "maxsize": size,
        "cert_reqs": "CERT_REQUIRED",
        "ca_certs": certifi.where(),
    }
    scheme = base_url.split("://", 1)[0].lower()
    proxy = requests.utils.get_environ_proxies(base_url).get(scheme)
    if proxy:
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


class _HttpBackend(ABC):
    """What both HTTP backends share: one pooled session, timeouts, the API key, error mapping."""

    def __init__(self, expert: ExpertConfig, server: ServerConfig) -> None:
        if not expert.url or not expert.model_name:
            raise ValueError(f"expert '{expert.label}' needs url and model_name")
        self._label = expert.label
        self._base_url = expert.url.rstrip("/")
        self._model_name = expert.model_name
        self._timeouts = (server.connect_timeout, expert.timeout or server.read_timeout)
        self._key_env = expert.api_key_env
        # Read once: the environment is the deployment's, not something to re-check per request.
        self._api_key = (os.environ.get(self._key_env) or None) if self._key_env else None
        if self._key_env and self._api_key is None:
            _log.warning(
                "expert '%s': environment variable %s is not set; the expert will be skipped",
                self._label,
                self._key_env,
            )
        # One open stream per server thread at most, so that many pooled connections suffice.
        self._pool = connection_pool(self._base_url, server.threads)
        self._timeout = urllib3.Timeout(connect=self._timeouts[0], read=self._timeouts[1])
        self._max_line_bytes = server.max_upstream_line_bytes
        self._max_answer_bytes = server.max_upstream_answer_bytes

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatEvent]:
        """POST the request upstream (always streamed) and yield its events as they arrive."""
        url, body = self._url_and_body(request)
        first_line_by = time.monotonic() + self._timeouts[1]
        with map_requests_exceptions(self._label, self._api_key):
            response = self._post(url, body)
            finished = False
            try:
                lines = iter_lines(_body_chunks(response), max_line_bytes=self._max_line_bytes,
                                   max_answer_bytes=self._max_answer_bytes, first_line_by=first_line_by)
                yield from self._events(lines)
                finished = _read_tail(lines, response)
            finally:
                # Also runs when the consumer closes us early (client gone): drop the upstream
                # connection instead of leaving the upstream generating into a full socket. An
                # answer read to the end of its body leaves its connection in the pool.
                if not finished:
                    response.close()
                response.release_conn()

    def embed(self, request: EmbedRequest) -> EmbedResult:
        """POST an embedding request upstream and read its one JSON answer (bounded)."""
        url, body = self._embed_url_and_body(request)
        started = time.perf_counter_ns()
        with map_requests_exceptions(self._label, self._api_key):
            response = self._post(url, body)
            data = b""
            try:
                data = response.read(self._max_answer_bytes + 1, decode_content=True)
            finally:
                if len(data) > self._max_answer_bytes or not data:
                    # Unread bytes would be taken for the next answer on a reused connection.
                    response.close()
                response.release_conn()
        if len(data) > self._max_answer_bytes:
            raise ExpertAnswerTooLarge(f"answer longer than {self._max_answer_bytes} bytes")
        try:
            parsed = json.loads(data)
        except ValueError:
            raise ExpertStreamBroken(f"expert '{self._label}' answered with invalid JSON") from None
        result = self._embed_result(parsed, request.count)
        if not result.total_duration_ns:
            result = dataclasses.replace(result, total_duration_ns=time.perf_counter_ns() - started)
        return result

    def _post(self, url: str, body: dict[str, Any]) -> urllib3.BaseHTTPResponse:
        """POST `body` as JSON; the response once its status is 200 (its body not read yet)."""
        if self._key_env and self._api_key is None:
            raise ExpertUnavailable(f"expert '{self._label}': environment variable {self._key_env} is not set")
        try:
            response = self._pool.urlopen(
                "POST",
                url,
                body=json.dumps(body, allow_nan=False).encode("utf-8"),
                headers=self._headers(),
                preload_content=False,
                decode_content=True,
                retries=False,
                redirect=False,
                timeout=self._timeout,
            )
        except urllib3.exceptions.ProtocolError as exc:
            # Closed or reset before a status line: nothing was streamed, the expert is
            # unreachable (a ProtocolError after the status line is a broken stream).
            raise ExpertUnavailable(
                f"expert '{self._label}' unreachable ({type(exc).__name__}: "
                f"{sanitize(_redacted(str(exc), self._api_key), _SNIPPET_CHARS)})"
            ) from exc
        if response.status != 200:
            try:
                raise ExpertUnavailable(
                    f"expert '{self._label}' answered HTTP {response.status}: {_body_snippet(response, self._api_key)}"
                )
            finally:
                response.close()
                response.release_conn()
        return response

    def close(self) -> None:
        self._pool.clear()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept-Encoding": "gzip, deflate"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    @abstractmethod
    def _url_and_body(self, request: ChatRequest) -> tuple[str, dict[str, Any]]:
        """Where to POST `request` upstream, and the body in the upstream's protocol."""

    @abstractmethod
    def _events(self, lines: Iterable[bytes]) -> Iterator[ChatEvent]:
        """The upstream's streamed lines as ChatEvents."""

    @abstractmethod
    def _embed_url_and_body(self, request: EmbedRequest) -> tuple[str, dict[str, Any]]:
        """Where to POST an embedding request upstream, and its body."""

    @abstractmethod
    def _embed_result(self, body: object, count: int) -> EmbedResult:
        """The upstream's embedding answer for `count` inputs."""


class OllamaBackend(_HttpBackend):
    """An expert served by a remote Ollama: /api/chat, or /api/generate for completions."""

    def _url_and_body(self, request: ChatRequest) -> tuple[str, dict[str, Any]]:
        if request.kind == "completion":
            return f"{self._base_url}/api/generate", ollama_generate_body_from_request(request, self._model_name)
        return f"{self._base_url}/api/chat", ollama_chat_body_from_request(request, self._model_name)

    def _events(self, lines: Iterable[bytes]) -> Iterator[ChatEvent]:
        return events_from_ollama_ndjson(lines)

    def _embed_url_and_body(self, request: EmbedRequest) -> tuple[str, dict[str, Any]]:
        if request.tokens is not None:
            raise InvalidRequest(f"model '{self._label}' takes text, not token arrays")
        return f"{self._base_url}/api/embed", ollama_embed_body_from_request(request, self._model_name)

    def _embed_result(self, body: object, count: int) -> EmbedResult:
        return embed_result_from_ollama(body, count)


class OpenAIBackend(_HttpBackend):
    """An expert on an OpenAI-compatible server: /v1/chat/completions, or /v1/completions."""

    def __init__(self, expert: ExpertConfig, server: ServerConfig) -> None:
        super().__init__(expert, server)
        # Users paste base URLs both ways ("http://host:8000" and "http://host:8000/v1").
        self._base_url = self._base_url.removesuffix("/v1")

    def _url_and_body(self, request: ChatRequest) -> tuple[str, dict[str, Any]]:
        if request.kind == "completion":
            return f"{self._base_url}/v1/completions", openai_completion_body_from_request(request, self._model_name)
        return f"{self._base_url}/v1/chat/completions", openai_chat_body_from_request(request, self._model_name)

    def _events(self, lines: Iterable[bytes]) -> Iterator[ChatEvent]:
        return events_from_openai_sse(bounded_sse_events(lines, self._max_line_bytes))

    def _embed_url_and_body(self, request: EmbedRequest) -> tuple[str, dict[str, Any]]:
        return f"{self._base_url}/v1/embeddings", openai_embed_body_from_request(request, self._model_name)

    def _embed_result(self, body: object, count: int) -> EmbedResult:
        return embed_result_from_openai(body, count)
