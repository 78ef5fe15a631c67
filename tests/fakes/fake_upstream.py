"""A loopback stand-in for the remote LLM servers experts talk to (Ollama and OpenAI).

A real HTTP server on 127.0.0.1 (werkzeug, threaded, free port, daemon thread), so backends are
tested through real sockets, real chunked encoding and real connection drops.

It is written by hand from /work/shared/PROTOCOL.md and on purpose imports nothing from
`modules/`: if the fake shared our protocol code, a wrong field name would pass every test.

Answers are deterministic: model M says "Hello from M" in three pieces unless told otherwise.
Tests steer one upstream model at a time::

    upstream.behave("slow-model", delay_first=2.0)
    upstream.behave("broken", drop_after=1)
    upstream.reset()

Every request is recorded (method, path, headers, parsed JSON body) so tests can assert on what
was forwarded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from werkzeug.datastructures import Headers
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON_MIME = "application/json"
# Fixed so tests can compare timestamps and ids across chunks.
CREATED = 1767225600
GARBAGE_LINE = "this is not json {"


@dataclass
class Behaviour:
    """How the fake answers for one upstream model name. Every knob defaults to "behave well"."""

    # Text pieces of the answer; None means ["Hello", " from", " <model>"].
    tokens: list[str] | None = None
    # Reasoning pieces sent before the text (Ollama `thinking`, OpenAI `reasoning_content`).
    thinking: list[str] = field(default_factory=list)
    # Seconds before the response starts (status line included), and between two pieces.
    delay_first: float = 0.0
    delay_between: float = 0.0
    # Answer this HTTP status with a protocol error body instead of the answer.
    fail_status: int | None = None
    # Raw body for `fail_status`; None means the protocol's own error JSON.
    fail_body: str | None = None
    # Close the connection without sending a single byte back.
    refuse: bool = False
    # Close the connection after this many answer pieces (thinking, text or tool-call frames).
    drop_after: int | None = None
    # Answer 200 with lines that are not JSON.
    garbage: bool = False
    # Send a protocol error line/event after `stream_error_after` pieces, then end the stream.
    stream_error: str | None = None
    stream_error_after: int = 1
    # Answer with this tool call, as (name, arguments), instead of text.
    tool_call: tuple[str, dict[str, Any]] | None = None
    # Hostile answers, after `hostile_after` well-formed pieces: one line of `long_line` bytes with
    # no line break (then the end of the body); the answer's pieces again and again until the
    # client goes away (`endless`); or the whole answer one byte at a time, `trickle` seconds apart.
    hostile_after: int = 0
    long_line: int | None = None
    endless: bool = False
    trickle: float | None = None
    # Refuse (401) requests without `Authorization: Bearer <require_key>`.
    require_key: str | None = None
    done_reason: str = "stop"
    prompt_tokens: int = 5
    # Length of the vectors the embedding routes answer with.
    embedding_dimensions: int = 8


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    # Case-insensitive, as werkzeug headers are.
    headers: Headers
    # The parsed JSON body, or None when the body was empty or not JSON.
    json: Any
    body: bytes


def fake_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector that depends only on `text`: tests can predict what the fake answers."""
    digest = hashlib.sha256(text.encode()).digest() * (dimensions // 32 + 1)
    raw = [b - 127.5 for b in digest[:dimensions]]
    norm = sum(v * v for v in raw) ** 0.5
    return [v / norm for v in raw]


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _ndjson_line(obj: Any) -> bytes:
    return _json_bytes(obj) + b"\n"


def _sse_event(obj: Any) -> bytes:
    return b"data: " + _json_bytes(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _json_response(obj: Any, status: int = 200) -> Response:
    return Response(_json_bytes(obj), status=status, content_type=f"{JSON_MIME}; charset=utf-8")


def _ollama_error(message: str, status: int) -> Response:
    return _json_response({"error": message}, status)


def _openai_error_object(message: str, status: int) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(
        status, "api_error"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _openai_error(message: str, status: int) -> Response:
    return _json_response(_openai_error_object(message, status), status)


def _ollama_metrics(behaviour: Behaviour, completion_tokens: int) -> dict[str, Any]:
    # Non-zero durations: Ollama omits zero values, and clients treat a missing one as a failure.
    return {
        "total_duration": 1_200_000_000,
        "load_duration": 1_000_000,
        "prompt_eval_count": behaviour.prompt_tokens,
        "prompt_eval_duration": 50_000_000,
        "eval_count": completion_tokens,
        "eval_duration": 900_000_000,
    }


def _openai_usage(behaviour: Behaviour, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": behaviour.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": behaviour.prompt_tokens + completion_tokens,
    }


def _split_arguments(arguments: dict[str, Any]) -> list[str]:
    # Real OpenAI servers stream a call's arguments as string fragments; split it in three.
    text = json.dumps(arguments)
    step = max(1, len(text) // 3)
    return [text[i : i + step] for i in range(0, len(text), step)]


def _drop_connection(environ: dict[str, Any]) -> None:
    """Cut the TCP connection under the running request (FIN both ways, no HTTP ending)."""
    sock: socket.socket = environ["werkzeug.socket"]
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _QuietHandler(WSGIRequestHandler):
    # One access-log line per request would drown the test output.
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class FakeUpstream:
    """A fake Ollama + OpenAI server. Use `start()`/`stop()`, or as a context manager."""

    def __init__(self, models: Iterable[str] = ("fake-model",)) -> None:
        self._models = list(models)
        self._lock = threading.Lock()
        self._behaviours: dict[str, Behaviour] = {}
        self._requests: list[RecordedRequest] = []
        self._disconnects = 0
        self._stopping = threading.Event()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[tuple[str, str], Callable[[Request, dict[str, Any]], Response]] = {
            ("GET", "/"): self._answer_root,
            ("HEAD", "/"): self._answer_root,
            ("GET", "/api/version"): self._answer_version,
            ("GET", "/api/tags"): self._answer_tags,
            ("POST", "/api/chat"): self._answer_ollama_chat,
            ("POST", "/api/generate"): self._answer_ollama_generate,
            ("GET", "/v1/models"): self._answer_openai_models,
            ("POST", "/v1/chat/completions"): self._answer_openai_chat,
            ("POST", "/v1/completions"): self._answer_openai_completion,
            ("POST", "/api/embed"): self._answer_ollama_embed,
            ("POST", "/v1/embeddings"): self._answer_openai_embeddings,
        }

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        self._stopping.clear()
        self._server = make_server("127.0.0.1", 0, self, threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        # Wake any request sleeping in a delay so its thread ends promptly.
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeUpstream is not started")
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- knobs and records ------------------------------------------------------------------

    def behave(self, model: str, **knobs: Any) -> Behaviour:
        """Set how `model` answers from now on (replacing earlier knobs). "*" matches any model.

        Unknown knob names raise TypeError, so a typo cannot silently test nothing.
        """
        behaviour = Behaviour(**knobs)
        with self._lock:
            self._behaviours[model] = behaviour
        return behaviour

    def reset(self) -> None:
        """Forget knobs, recorded requests and disconnect counts."""
        with self._lock:
            self._behaviours.clear()
            self._requests.clear()
            self._disconnects = 0

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    @property
    def last_request(self) -> RecordedRequest:
        recorded = self.requests
        if not recorded:
            raise AssertionError("the fake upstream has received no request")
        return recorded[-1]

    @property
    def disconnects(self) -> int:
        """Streams the client abandoned before their end (the client closed its connection)."""
        with self._lock:
            return self._disconnects

    def wait_for_disconnects(self, count: int = 1, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.disconnects >= count:
                return True
            time.sleep(0.02)
        return self.disconnects >= count

    def _behaviour_for(self, model: str) -> Behaviour:
        with self._lock:
            for key in (model, model.removesuffix(":latest"), "*"):
                if key in self._behaviours:
                    return self._behaviours[key]
        return Behaviour()

    def _listed_models(self) -> list[str]:
        with self._lock:
            names = self._models + [m for m in self._behaviours if m != "*"]
        tagged = [n if ":" in n else f"{n}:latest" for n in names]
        return list(dict.fromkeys(tagged))

    # --- WSGI -------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        body = request.get_data()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        with self._lock:
            self._requests.append(
                RecordedRequest(request.method, request.path, Headers(request.headers), parsed, body)
            )
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            response = _json_response({"error": "404 page not found"}, 404)
        elif request.method == "POST" and not isinstance(parsed, dict):
            response = _json_response({"error": "invalid JSON body"}, 400)
        else:
            response = handler(request, parsed or {})
        return response(environ, start_response)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _gate(self, request: Request, behaviour: Behaviour, error: Callable[[str, int], Response]) -> Response | None:
        """The failures that happen before any answer byte: auth, latency, refusal, error status."""
        if behaviour.require_key is not None:
            if request.headers.get("Authorization") != f"Bearer {behaviour.require_key}":
                return error("unauthorized", 401)
        self._sleep(behaviour.delay_first)
        if behaviour.refuse:
            _drop_connection(request.environ)
            return Response(b"")
        if behaviour.fail_status is not None:
            if behaviour.fail_body is not None:
                return Response(behaviour.fail_body, status=behaviour.fail_status, content_type=JSON_MIME)
            return error("the fake upstream was told to fail", behaviour.fail_status)
        return None

    def _paced(
        self,
        environ: dict[str, Any],
        behaviour: Behaviour,
        head: list[bytes],
        pieces: list[bytes],
        tail: list[bytes],
        error_frame: bytes,
    ) -> Iterator[bytes]:
        """Send a stream frame by frame, applying the mid-stream knobs (delay, drop, error, hostile)."""
        try:
            if behaviour.long_line is not None or behaviour.endless or behaviour.trickle is not None:
                yield from self._hostile(behaviour, head, pieces, tail)
                return
            yield from head
            for i in range(len(pieces) + 1):
                if behaviour.drop_after is not None and i == behaviour.drop_after:
                    _drop_connection(environ)
                    return
                if behaviour.stream_error is not None and i == behaviour.stream_error_after:
                    yield error_frame
                    return
                if i == len(pieces):
                    break
                if i > 0:
                    self._sleep(behaviour.delay_between)
                yield pieces[i]
            yield from tail
        except GeneratorExit:
            # werkzeug closes the app iterator when a write fails: the client went away.
            with self._lock:
                self._disconnects += 1
            raise

    def _hostile(self, behaviour: Behaviour, head: list[bytes], pieces: list[bytes],
                 tail: list[bytes]) -> Iterator[bytes]:
        if behaviour.trickle is not None:
            for byte in b"".join(head + pieces + tail):
                if self._stopping.wait(behaviour.trickle):
                    return
                yield bytes([byte])
            return
        yield from head
        yield from pieces[: behaviour.hostile_after]
        if behaviour.long_line is not None:
            # In 64 KiB writes, as a server streams: the fake notices a reader that hung up (or
            # a stop) after one write instead of after the whole line.
            left = behaviour.long_line
            while left > 0 and not self._stopping.is_set():
                size = min(left, 65536)
                yield b"a" * size
                left -= size
            return
        while pieces and not self._stopping.is_set():
            yield from pieces

    def _stream(self, frames: Iterator[bytes], mimetype: str) -> Response:
        response = Response(frames, mimetype=mimetype)
        if mimetype == SSE:
            response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        return response

    def _garbage(self, stream: bool, mimetype: str) -> Response:
        if not stream:
            return Response(GARBAGE_LINE, content_type=JSON_MIME)
        line = f"data: {GARBAGE_LINE}\n\n" if mimetype == SSE else f"{GARBAGE_LINE}\n"
        return self._stream(iter([line.encode(), line.encode()]), mimetype)

    # --- general and listing endpoints -------------------------------------------------------

    def _answer_ollama_embed(self, request: Request, body: dict[str, Any]) -> Response:
        model = str(body.get("model", ""))
        behaviour = self._behaviour_for(model)
        gated = self._gate(request, behaviour, _ollama_error)
        if gated is not None:
            return gated
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) and raw else list(raw or [])
        dims = body.get("dimensions") or behaviour.embedding_dimensions
        return _json_response({
            "model": model,
            "embeddings": [fake_vector(text, behaviour.embedding_dimensions)[:dims] for text in texts],
            "total_duration": 2_000_000, "load_duration": 1_000,
            "prompt_eval_count": sum(len(text.split()) for text in texts),
        })

    def _answer_openai_embeddings(self, request: Request, body: dict[str, Any]) -> Response:
        model = str(body.get("model", ""))
        behaviour = self._behaviour_for(model)
        gated = self._gate(request, behaviour, _openai_error)
        if gated is not None:
            return gated
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else [t if isinstance(t, str) else json.dumps(t) for t in raw or []]
        rows: list[Any] = [fake_vector(text, behaviour.embedding_dimensions) for text in texts]
        if body.get("encoding_format") == "base64":
            rows = [base64.b64encode(struct.pack(f"<{len(r)}f", *r)).decode() for r in rows]
        # Real servers may list the vectors in any order: `index` says whose each is.
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)][::-1]
        tokens = sum(len(text.split()) for text in texts)
        return _json_response({"object": "list", "data": data, "model": model,
                               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def _answer_root(self, request: Request, body: dict[str, Any]) -> Response:
        return Response("Ollama is running", content_type="text/plain; charset=utf-8")

    def _answer_version(self, request: Request, body: dict[str, Any]) -> Response:
        return _json_response({"version": OLLAMA_VERSION})

    def _answer_tags(self, request: Request, body: dict[str, Any]) -> Response:
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": _now_rfc3339(),
                "size": 1234,
                "digest": "0" * 64,
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "fake",
                    "families": ["fake"],
                    "parameter_size": "1B",
                    "quantization_level": "Q4_0",
                },
            }
            for name in self._listed_models()
        ]
        return _json_response({"models": models})

    def _answer_openai_models(self, request: Request, body: dict[str, Any]) -> Response:
        data = [{"id": n, "object": "model", "created": CREATED, "owned_by": "library"} for n in self._listed_models()]
        return _json_response({"object": "list", "data": data})

    # --- Ollama -----------------------------------------------------------------------------

    def _answer_ollama_chat(self, request: Request, body: dict[str, Any]) -> Response:
        model = body.get("model")
        if not model:
            return _ollama_error("model is required", 400)
        behaviour = self._behaviour_for(model)
        early = self._gate(request, behaviour, _ollama_error)
        if early is not None:
            return early
        # Ollama streams unless `stream` is exactly false.
        stream = body.get("stream") is not False
        if behaviour.garbage:
            return self._garbage(stream, NDJSON)

        def line(message: dict[str, Any], done: bool = False, **extra: Any) -> dict[str, Any]:
            obj = {"model": model, "created_at": _now_rfc3339(), "message": {"role": "assistant", "content": "", **message}}
            return {**obj, "done": done, **extra}

        thinking = behaviour.thinking
        if behaviour.tool_call is not None:
            name, arguments = behaviour.tool_call
            calls = [{"function": {"name": name, "arguments": arguments}}]
            answer_lines = [line({"thinking": t}) for t in thinking] + [line({"tool_calls": calls})]
            text, count = "", len(thinking) + 1
        else:
            tokens = behaviour.tokens if behaviour.tokens is not None else ["Hello", " from", f" {model}"]
            answer_lines = [line({"thinking": t}) for t in thinking] + [line({"content": t}) for t in tokens]
            text, count = "".join(tokens), len(thinking) + len(tokens)
        metrics = _ollama_metrics(behaviour, count)
        if not stream:
            message: dict[str, Any] = {"content": text}
            if thinking:
                message["thinking"] = "".join(thinking)
            if behaviour.tool_call is not None:
                message["tool_calls"] = calls
            return _json_response(line(message, True, done_reason=behaviour.done_reason, **metrics))
        final = line({}, True, done_reason=behaviour.done_reason, **metrics)
        frames = self._paced(
            request.environ,
            behaviour,
            [],
            [_ndjson_line(a) for a in answer_lines],
            [_ndjson_line(final)],
            _ndjson_line({"error": behaviour.stream_error}),
        )
        return self._stream(frames, NDJSON)

    def _answer_ollama_generate(self, request: Request, body: dict[str, Any]) -> Response:
        model = body.get("model")
        if not model:
            return _ollama_error("model is required", 400)
        if not body.get("prompt"):
            # An empty prompt is a load/unload probe: one JSON object, even when streaming.
            reason = "unload" if body.get("keep_alive") == 0 else "load"
            return _json_response(
                {"model": model, "created_at": _now_rfc3339(), "response": "", "done": True, "done_reason": reason}
            )
        behaviour = self._behaviour_for(model)
        early = self._gate(request, behaviour, _ollama_error)
        if early is not None:
            return early
        stream = body.get("stream") is not False
        if behaviour.garbage:
            return self._garbage(stream, NDJSON)

        def line(response: str, done: bool = False, **extra: Any) -> dict[str, Any]:
            return {"model": model, "created_at": _now_rfc3339(), "response": response, "done": done, **extra}

        tokens = behaviour.tokens if behaviour.tokens is not None else ["Hello", " from", f" {model}"]
        answer_lines = [{**line(""), "thinking": t} for t in behaviour.thinking] + [line(t) for t in tokens]
        metrics = _ollama_metrics(behaviour, len(answer_lines))
        final_fields = {"done_reason": behaviour.done_reason, "context": [1, 2, 3], **metrics}
        if not stream:
            whole = line("".join(tokens), True, **final_fields)
            if behaviour.thinking:
                whole["thinking"] = "".join(behaviour.thinking)
            return _json_response(whole)
        frames = self._paced(
            request.environ,
            behaviour,
            [],
            [_ndjson_line(a) for a in answer_lines],
            [_ndjson_line(line("", True, **final_fields))],
            _ndjson_line({"error": behaviour.stream_error}),
        )
        return self._stream(frames, NDJSON)

    # --- OpenAI -----------------------------------------------------------------------------

    def _answer_openai_chat(self, request: Request, body: dict[str, Any]) -> Response:
        model = body.get("model")
        if not model or not body.get("messages"):
            return _openai_error("model and messages are required", 400)
        behaviour = self._behaviour_for(model)
        early = self._gate(request, behaviour, _openai_error)
        if early is not None:
            return early
        # OpenAI answers in one JSON object unless `stream` is true.
        stream = body.get("stream") is True
        if behaviour.garbage:
            return self._garbage(stream, SSE)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }

        deltas: list[dict[str, Any]] = [{"reasoning_content": t} for t in behaviour.thinking]
        tool_calls: list[dict[str, Any]] = []
        if behaviour.tool_call is not None:
            name, arguments = behaviour.tool_call
            fragments = _split_arguments(arguments)
            first = {"index": 0, "id": "call_fake0", "type": "function", "function": {"name": name, "arguments": ""}}
            deltas.append({"tool_calls": [first]})
            deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": f}}]} for f in fragments]
            tool_calls = [{**first, "function": {"name": name, "arguments": json.dumps(arguments)}}]
            tool_calls[0].pop("index")
            text, finish = None, "tool_calls"
        else:
            tokens = behaviour.tokens if behaviour.tokens is not None else ["Hello", " from", f" {model}"]
            deltas += [{"content": t} for t in tokens]
            text, finish = "".join(tokens), behaviour.done_reason
        usage = _openai_usage(behaviour, len(deltas))
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if behaviour.thinking:
                message["reasoning_content"] = "".join(behaviour.thinking)
            if tool_calls:
                message["tool_calls"] = tool_calls
            return _json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                    "usage": usage,
                }
            )
        tail = [_sse_event(chunk({}, finish))]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail.append(_sse_event({**chunk({}), "choices": [], "usage": usage}))
        tail.append(SSE_DONE)
        frames = self._paced(
            request.environ,
            behaviour,
            [_sse_event(chunk({"role": "assistant", "content": ""}))],
            [_sse_event(chunk(d)) for d in deltas],
            tail,
            _sse_event(_openai_error_object(behaviour.stream_error or "", 500)),
        )
        return self._stream(frames, SSE)

    def _answer_openai_completion(self, request: Request, body: dict[str, Any]) -> Response:
        model = body.get("model")
        if not model:
            return _openai_error("model is required", 400)
        behaviour = self._behaviour_for(model)
        early = self._gate(request, behaviour, _openai_error)
        if early is not None:
            return early
        stream = body.get("stream") is True
        if behaviour.garbage:
            return self._garbage(stream, SSE)

        def completion(text: str, finish: str | None, obj: str = "text_completion") -> dict[str, Any]:
            return {
                "id": "cmpl-fake",
                "object": obj,
                "created": CREATED,
                "model": model,
                "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": None}],
            }

        tokens = behaviour.tokens if behaviour.tokens is not None else ["Hello", " from", f" {model}"]
        usage = _openai_usage(behaviour, len(tokens))
        if not stream:
            return _json_response({**completion("".join(tokens), behaviour.done_reason), "usage": usage})
        tail = [_sse_event(completion("", behaviour.done_reason))]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail.append(_sse_event({**completion("", None), "choices": [], "usage": usage}))
        tail.append(SSE_DONE)
        frames = self._paced(
            request.environ,
            behaviour,
            [],
            [_sse_event(completion(t, None)) for t in tokens],
            tail,
            _sse_event(_openai_error_object(behaviour.stream_error or "", 500)),
        )
        return self._stream(frames, SSE)


@contextmanager
def reserve_closed_port() -> Iterator[int]:
    """A loopback port where nothing listens: connecting to it is refused.

    The socket stays bound (but never listens) while the block runs, so no other test can grab
    the port in the meantime.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()

