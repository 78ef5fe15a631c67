"""A lean stand-in LLM server for the benchmarks: Ollama and OpenAI chat, keep-alive, no framework.

bench/upstream.py (the werkzeug fake the contract tests trust) spends about 1 ms of CPU per
answer and closes the connection after each one; on a 2-core machine that shares the CPU with
the server under test, the stand-in itself became the bottleneck. This one is one asyncio
Protocol: answers are built from bytes precomputed per model, so a request costs 0.02-0.07 ms
of CPU (about 50,000 answers/s from one core against wrk).
The field shapes are copied from tests/fakes/fake_upstream.py.

Prints its port on the first line of stdout, then serves until SIGTERM.

    python -m bench.fast_upstream --tokens 20 [--delay-between 0.2] [--models a,b]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

OLLAMA_VERSION = "0.12.0"
# Fixed, as in the werkzeug fake, so ids and timestamps compare across chunks.
CREATED = 1767225600
PROMPT_TOKENS = 5
DONE_REASON = "stop"
SSE_DONE = b"data: [DONE]\n\n"
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024


def answer_tokens(count: int) -> list[str]:
    """`count` distinct pieces, so a client can tell a whole answer from a cut one."""
    return [f"tok{i} " for i in range(count)]


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


def _now() -> bytes:
    return datetime.now(UTC).isoformat().encode()


class Answers:
    """Every answer's bytes, built once per upstream model name."""

    def __init__(self, tokens: list[str], models: list[str]) -> None:
        self.tokens = tokens
        self.models = models
        self._ollama: dict[str, tuple[bytes, list[bytes], bytes, bytes]] = {}
        self._openai: dict[str, tuple[bytes, list[bytes], bytes, bytes, bytes]] = {}

    def ollama(self, model: str) -> tuple[bytes, list[bytes], bytes, bytes]:
        """(line prefix up to created_at's value, one suffix per piece, the done line's suffix,
        the stream:false object's suffix); a line is prefix + timestamp + suffix."""
        cached = self._ollama.get(model)
        if cached is None:
            metrics = {"total_duration": 1_200_000_000, "load_duration": 1_000_000,
                       "prompt_eval_count": PROMPT_TOKENS, "prompt_eval_duration": 50_000_000,
                       "eval_count": len(self.tokens), "eval_duration": 900_000_000}
            marker = "@@CREATED_AT@@"

            def split(obj: dict[str, Any]) -> tuple[bytes, bytes]:
                head, _, tail = _json({"model": model, "created_at": marker, **obj}).partition(marker.encode())
                return head, tail

            def line(message: dict[str, Any], done: bool = False, **extra: Any) -> dict[str, Any]:
                return {"message": {"role": "assistant", "content": "", **message}, "done": done, **extra}

            prefix, _ = split(line({}))
            pieces = [split(line({"content": t}))[1] + b"\n" for t in self.tokens]
            final = split(line({}, True, done_reason=DONE_REASON, **metrics))[1] + b"\n"
            whole = split(line({"content": "".join(self.tokens)}, True, done_reason=DONE_REASON, **metrics))[1]
            cached = self._ollama[model] = (prefix, pieces, final, whole)
        return cached

    def openai(self, model: str) -> tuple[bytes, list[bytes], bytes, bytes, bytes]:
        """(stream head event, one event per piece, finish event, usage event, stream:false body)."""
        cached = self._openai.get(model)
        if cached is None:
            def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
                return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED, "model": model,
                        "system_fingerprint": "fp_fake",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

            count = len(self.tokens)
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": count,
                     "total_tokens": PROMPT_TOKENS + count}
            message = {"role": "assistant", "content": "".join(self.tokens)}
            whole = _json({"id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED, "model": model,
                           "system_fingerprint": "fp_fake",
                           "choices": [{"index": 0, "message": message, "finish_reason": DONE_REASON,
                                        "logprobs": None}],
                           "usage": usage})
            cached = self._openai[model] = (
                _sse(chunk({"role": "assistant", "content": ""})),
                [_sse(chunk({"content": t})) for t in self.tokens],
                _sse(chunk({}, DONE_REASON)),
                _sse({**chunk({}), "choices": [], "usage": usage}),
                whole,
            )
        return cached


def _head(status: str, content_type: bytes, close: bool, length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + content_type + b"\r\n" + framing
            + (b"Connection: close\r\n" if close else b"") + b"\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


JSON_TYPE = b"application/json; charset=utf-8"
NDJSON_TYPE = b"application/x-ndjson"
SSE_TYPE = b"text/event-stream\r\nCache-Control: no-cache"


class Connection(asyncio.Protocol):
    """One client connection: parses requests one after another, answers each in order."""

    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        # A paced stream is being sent: later (pipelined) requests wait in the buffer.
        self.busy = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.serve_buffered()

    def serve_buffered(self) -> None:
        while not self.busy and not self.closed:
            request = self.take_request()
            if request is None:
                return
            self.answer(*request)

    def take_request(self) -> tuple[str, str, bytes, bool] | None:
        """(method, path, body, close after answer) of the next whole request, or None."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self.fail(b"431 Request Header Fields Too Large")
            return None
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            self.fail(b"400 Bad Request")
            return None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        start = end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            decoded = self.dechunk(start)
            if decoded is None:
                return None
            body, used = decoded
        else:
            length = int(headers.get("content-length") or 0)
            if length > MAX_BODY:
                self.fail(b"413 Payload Too Large")
                return None
            if len(self.buffer) < start + length:
                if headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return None
            body, used = bytes(self.buffer[start:start + length]), start + length
        del self.buffer[:used]
        return method, target.split("?", 1)[0], body, close

    def dechunk(self, start: int) -> tuple[bytes, int] | None:
        """A chunked request body, if it has arrived whole: (body, bytes used from the buffer)."""
        body = bytearray()
        pos = start
        while True:
            eol = self.buffer.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(self.buffer[pos:eol]).split(b";", 1)[0], 16)
            if size == 0:
                # No trailers are expected: the body ends with an empty line.
                end = self.buffer.find(b"\r\n", eol + 2)
                return (bytes(body), end + 2) if end >= 0 else None
            if len(self.buffer) < eol + 2 + size + 2:
                return None
            body += self.buffer[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2

    def fail(self, status: bytes) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()
        self.closed = True

    def answer(self, method: str, path: str, body: bytes, close: bool) -> None:
        handler = self.server.routes.get((method, path))
        if handler is None:
            self.send_whole("404 Not Found", JSON_TYPE, b'{"error":"404 page not found"}', close)
            return
        if method == "POST":
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                self.send_whole("400 Bad Request", JSON_TYPE, b'{"error":"invalid JSON body"}', close)
                return
        else:
            parsed = {}
        handler(self, parsed, close, method == "HEAD")

    def send_whole(self, status: str, content_type: bytes, body: bytes, close: bool, head_only: bool = False) -> None:
        assert self.transport is not None
        self.transport.write(_head(status, content_type, close, len(body)) + (b"" if head_only else body))
        if close:
            self.transport.close()

    def send_stream(self, content_type: bytes, first: bytes, pieces: list[bytes], tail: bytes, close: bool,
                    stamp: bytes = b"") -> None:
        """Headers, `first` and the first piece now; each next piece `delay_between` later; `tail` with the last.

        With a `stamp` (Ollama's line start up to created_at), each piece and the tail are
        `stamp + now + piece`: stamped when sent.
        """
        assert self.transport is not None
        delay = self.server.delay_between
        if delay <= 0 or len(pieces) < 2:
            if stamp:
                start = stamp + _now()
                pieces, tail = [start + p for p in pieces], start + tail
            frames = [first, *pieces, tail] if first else [*pieces, tail]
            self.transport.write(_head("200 OK", content_type, close, None)
                                 + b"".join([b"%x\r\n%s\r\n" % (len(f), f) for f in frames]) + b"0\r\n\r\n")
            if close:
                self.transport.close()
            return
        self.busy = True
        self.transport.write(_head("200 OK", content_type, close, None) + _chunk(first + self.stamped(stamp, pieces[0])))
        self.timer = asyncio.get_running_loop().call_later(delay, self.next_piece, pieces, 1, tail, close, stamp)

    @staticmethod
    def stamped(stamp: bytes, piece: bytes) -> bytes:
        return stamp + _now() + piece if stamp else piece

    def next_piece(self, pieces: list[bytes], index: int, tail: bytes, close: bool, stamp: bytes) -> None:
        self.timer = None
        if self.closed or self.transport is None:
            return
        if index < len(pieces) - 1:
            self.transport.write(_chunk(self.stamped(stamp, pieces[index])))
            self.timer = asyncio.get_running_loop().call_later(
                self.server.delay_between, self.next_piece, pieces, index + 1, tail, close, stamp)
            return
        self.transport.write(_chunk(self.stamped(stamp, pieces[index]) + self.stamped(stamp, tail)) + b"0\r\n\r\n")
        self.busy = False
        if close:
            self.transport.close()
            return
        self.serve_buffered()


Handler = Callable[[Connection, dict[str, Any], bool, bool], None]


class Upstream:
    """The routes and the answers they share."""

    def __init__(self, answers: Answers, delay_between: float) -> None:
        self.answers = answers
        self.delay_between = delay_between
        tags = [{"name": n, "model": n, "modified_at": "2026-01-01T00:00:00+00:00", "size": 1234,
                 "digest": "0" * 64,
                 "details": {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
                             "parameter_size": "1B", "quantization_level": "Q4_0"}}
                for n in (m if ":" in m else f"{m}:latest" for m in answers.models)]
        self.tags = _json({"models": tags})
        self.models = _json({"object": "list", "data": [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "library"} for m in answers.models]})
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/"): self.root,
            ("HEAD", "/"): self.root,
            ("GET", "/api/version"): self.version,
            ("GET", "/api/tags"): self.list_tags,
            ("GET", "/v1/models"): self.list_models,
            ("POST", "/api/chat"): self.ollama_chat,
            ("POST", "/v1/chat/completions"): self.openai_chat,
        }

    def root(self, conn: Connection, body: dict[str, Any], close: bool, head_only: bool) -> None:
        conn.send_whole("200 OK", b"text/plain; charset=utf-8", b"Ollama is running", close, head_only)

    def version(self, conn: Connection, body: dict[str, Any], close: bool, head_only: bool) -> None:
        conn.send_whole("200 OK", JSON_TYPE, _json({"version": OLLAMA_VERSION}), close)

    def list_tags(self, conn: Connection, body: dict[str, Any], close: bool, head_only: bool) -> None:
        conn.send_whole("200 OK", JSON_TYPE, self.tags, close)

    def list_models(self, conn: Connection, body: dict[str, Any], close: bool, head_only: bool) -> None:
        conn.send_whole("200 OK", JSON_TYPE, self.models, close)

    def ollama_chat(self, conn: Connection, body: dict[str, Any], close: bool, head_only: bool) -> None:
        model = body.get("model")
        if not model or not isinstance(model, str):
            conn.send_whole("400 Bad Request", JSON_TYPE, b'{"error":"model is required"}', close)
            return
        prefix, pieces, final, whole = self.answers.ollama(model)
        # Ollama streams unless `stream` is exactly false.
        if body.get("stream") is False:
            conn.send_whole("200 OK", JSON_TYPE, prefix + _now() + whole, close)
            return
        conn.send_stream(NDJSON_TYPE, b"", pieces, final, close, stamp=prefix)

    def openai_chat(self, conn: Connection, body: dict[str, Any], close: bool, head_only: bool) -> None:
        model = body.get("model")
        if not model or not isinstance(model, str) or not body.get("messages"):
            conn.send_whole("400 Bad Request", JSON_TYPE,
                            _json({"error": {"message": "model and messages are required",
                                             "type": "invalid_request_error", "param": None, "code": None}}), close)
            return
        head, pieces, finish, usage, whole = self.answers.openai(model)
        # OpenAI answers in one JSON object unless `stream` is true.
        if body.get("stream") is not True:
            conn.send_whole("200 OK", JSON_TYPE, whole, close)
            return
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        tail = finish + (usage if with_usage else b"") + SSE_DONE
        conn.send_stream(SSE_TYPE, head, pieces, tail, close)


async def serve(upstream: Upstream) -> None:
    loop = asyncio.get_running_loop()
    # A deep backlog: bench_streams opens hundreds of connections at once.
    server = await loop.create_server(lambda: Connection(upstream), "127.0.0.1", 0, backlog=2048)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20, help="answer pieces per reply")
    parser.add_argument("--delay-between", type=float, default=0.0, help="seconds between stream pieces")
    parser.add_argument("--models", default="fake-model", help="comma-separated names /api/tags and /v1/models list")
    args = parser.parse_args(argv)
    answers = Answers(answer_tokens(args.tokens), [m for m in args.models.split(",") if m])
    asyncio.run(serve(Upstream(answers, args.delay_between)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
