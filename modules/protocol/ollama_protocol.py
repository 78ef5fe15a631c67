"""Ollama's native wire protocol (/api/*), both directions, as pure converters.

Server side: parse and validate what clients send to /api/chat and /api/generate into a
`ChatRequest`, and turn `ChatEvent`s into Ollama's NDJSON lines or single JSON objects, plus
the model listings (/api/tags, /api/show, /api/ps, /api/version).
Client side: build the body an `OllamaBackend` posts to a real upstream Ollama, and parse that
upstream's NDJSON back into `ChatEvent`s.

No Flask here: functions take and return plain dicts, strings and typed values. The rules
(defaults, field shapes, what is a 400) follow /work/shared/PROTOCOL.md sections 1 and 4.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    DoneReason,
    Message,
    ModelCard,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from modules.errors import ExpertStreamBroken, InvalidRequest, RequestError
from modules.logger import get_logger, sanitize

_ROLES = ("system", "user", "assistant", "tool")
_THINK_LEVELS = ("low", "medium", "high", "max")
# Keys some clients (LiteLLM, Open WebUI) tuck inside `options` that belong at the top level.
_LIFTED_OPTION_KEYS = ("think", "format", "keep_alive", "system")
_INT_OPTIONS = frozenset(
    {
        "num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
        "num_gpu", "main_gpu", "num_thread", "mirostat", "draft_num_predict", "num_gqa",
    }
)  # fmt: skip
_NUMBER_OPTIONS = frozenset(
    {
        "top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
        "frequency_penalty", "tfs_z", "mirostat_tau", "mirostat_eta",
    }
)  # fmt: skip
_BOOL_OPTIONS = frozenset(
    {
        "penalize_newline", "numa", "use_mmap", "use_mlock", "low_vram", "vocab_only",
        "f16_kv", "logits_all", "embedding_only",
    }
)  # fmt: skip
_KNOWN_OPTIONS = _INT_OPTIONS | _NUMBER_OPTIONS | _BOOL_OPTIONS | {"stop"}

# Go's time.ParseDuration units, which is what Ollama's keep_alive strings use.
_DURATION_UNITS_S = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip
_NUMBER_RE = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_SECONDS_RE = re.compile(rf"[+-]?{_NUMBER_RE}")
_GO_DURATION_RE = re.compile(rf"([+-]?)((?:{_NUMBER_RE}(?:ns|us|µs|μs|ms|s|m|h))+)")
_DURATION_PART_RE = re.compile(rf"({_NUMBER_RE})(ns|us|µs|μs|ms|s|m|h)")

_KEEP_ALIVE_MESSAGE = 'keep_alive must be a duration such as "5m" or a number of seconds'
_STREAM_FAILED_MESSAGE = "the model failed while generating the answer"
# Ollama's integration test (api_test.go) fails a non-raw generate whose last line has an
# empty `context`; we have no token ids to give back, so send a one-element placeholder.
_GENERATE_CONTEXT = [0]
# Same width Ollama pads parameter names to in /api/show (`%-*s %v` with 30).
_PARAMETER_NAME_WIDTH = 30

_log = get_logger("ollama_protocol")


# ---------------------------------------------------------------------------------------------
# Server side: requests from clients
# ---------------------------------------------------------------------------------------------


def chat_request_from_ollama(body: object) -> ChatRequest:
    """Validate a parsed /api/chat body and convert it; raises `InvalidRequest` naming the field.

    An absent or empty `messages` list is a load/unload probe and comes back with no messages.
    """
    fields = require_object(body)
    model = model_from_body(fields)
    options, lifted = _options_and_lifted_from_body(fields)
    raw_messages = fields.get("messages")
    if raw_messages is None:
        raw_messages = []
    if not isinstance(raw_messages, list):
        raise InvalidRequest("messages must be a list")
    messages = [_message_from_ollama(item, i) for i, item in enumerate(raw_messages)]
    system = _optional_str(lifted.get("system"), "system")
    # Only a real conversation gets the system turn, so an empty probe stays a probe.
    if system and messages:
        messages.insert(0, Message(role="system", content=system))
    _check_top_logprobs(fields.get("top_logprobs"))
    return ChatRequest(
        model=model,
        messages=messages,
        stream=_stream_flag(fields.get("stream")),
        options=options,
        tools=_tools_from_ollama(fields.get("tools")),
        format=_format_value(lifted.get("format")),
        think=_think_value(lifted.get("think")),
        keep_alive=keep_alive_seconds(lifted.get("keep_alive")),
        kind="chat",
    )


def generate_request_from_ollama(body: object) -> ChatRequest:
    """Validate a parsed /api/generate body and convert it to a kind="completion" request.

    The system text and the prompt also become messages, so routers and chat-only backends can
    use them; `prompt`, `suffix` and `raw` stay on the request for completion backends.
    """
    fields = require_object(body)
    model = model_from_body(fields)
    options, lifted = _options_and_lifted_from_body(fields)
    prompt = _optional_str(fields.get("prompt"), "prompt") or ""
    suffix = _optional_str(fields.get("suffix"), "suffix")
    system = _optional_str(lifted.get("system"), "system")
    template = _optional_str(fields.get("template"), "template")
    raw = _optional_bool(fields.get("raw"), "raw") or False
    context = _context_from_body(fields.get("context"))
    if raw and (template or system or context):
        # Same rule and wording as Ollama's GenerateHandler.
        raise InvalidRequest("raw mode does not support template, system, or context")
    images = _images_from_ollama(fields.get("images"), "images")
    _check_top_logprobs(fields.get("top_logprobs"))
    messages: list[Message] = []
    if system:
        messages.append(Message(role="system", content=system))
    if prompt:
        messages.append(Message(role="user", content=prompt, images=images))
    return ChatRequest(
        model=model,
        messages=messages,
        stream=_stream_flag(fields.get("stream")),
        options=options,
        format=_format_value(lifted.get("format")),
        think=_think_value(lifted.get("think")),
        keep_alive=keep_alive_seconds(lifted.get("keep_alive")),
        kind="completion",
        prompt=prompt,
        suffix=suffix,
        raw=raw,
    )


def body_has_images(body: object) -> bool:
    """Whether a parsed /api/chat or /api/generate body carries an image (checked before it is
    validated, to choose its size limit)."""
    if not isinstance(body, dict):
        return False
    if body.get("images"):
        return True
    messages = body.get("messages")
    return isinstance(messages, list) and any(isinstance(m, dict) and m.get("images") for m in messages)


def is_load_probe(request: ChatRequest) -> bool:
    """True for Ollama's "load the model" requests: no messages (chat) or no prompt (generate)."""
    if request.kind == "completion":
        return not request.prompt
    return not request.messages


def keep_alive_seconds(value: object) -> float | None:
    """Any Ollama keep_alive form as seconds: "5m", "1h30m", "300ms", "10", 300, -1, ...

    None means "not given". Negative values (keep loaded forever) stay negative, 0 unloads.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequest(_KEEP_ALIVE_MESSAGE)
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise InvalidRequest(_KEEP_ALIVE_MESSAGE)
        return float(value)
    if not isinstance(value, str):
        raise InvalidRequest(_KEEP_ALIVE_MESSAGE)
    text = value.strip()
    if not text:
        return None
    if _PLAIN_SECONDS_RE.fullmatch(text):
        return float(text)
    match = _GO_DURATION_RE.fullmatch(text)
    if match is None:
        raise InvalidRequest(_KEEP_ALIVE_MESSAGE)
    seconds = sum(
        float(number) * _DURATION_UNITS_S[unit]
        for number, unit in _DURATION_PART_RE.findall(match.group(2))
    )
    return -seconds if match.group(1) == "-" else seconds


def require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def model_from_body(fields: dict[str, Any]) -> str:
    model = fields.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model is required")
    return model


def _options_and_lifted_from_body(
    fields: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validated options, and the top-level keys LiteLLM may have put inside them.

    A key given at the top level wins over the same key inside `options`.
    """
    raw_options = fields.get("options")
    if raw_options is None:
        raw_options = {}
    if not isinstance(raw_options, dict):
        raise InvalidRequest("options must be an object")
    lifted = {key: raw_options.get(key) for key in _LIFTED_OPTION_KEYS}
    for key in _LIFTED_OPTION_KEYS:
        if fields.get(key) is not None:
            lifted[key] = fields[key]
    return _options_from_ollama(raw_options), lifted


def _options_from_ollama(raw: dict[str, Any]) -> dict[str, Any]:
    """Keep the known options (type-checked) under their Ollama names; drop the rest.

    Ollama itself warns about unknown keys and carries on, and null values mean "unset".
    """
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _KNOWN_OPTIONS or value is None:
            continue
        if key == "stop":
            stop = _stop_from_option(value)
            if stop:
                options["stop"] = stop
        elif key in _INT_OPTIONS:
            options[key] = _int_option(key, value)
        elif key in _NUMBER_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"options.{key} must be a number")
            options[key] = value
        elif not isinstance(value, bool):
            raise InvalidRequest(f"options.{key} must be a boolean")
        else:
            options[key] = value
    return options


def _int_option(key: str, value: object) -> int:
    # JSON has one number type; Go's option loader accepts 128.0 for an int, so do we.
    if isinstance(value, bool):
        raise InvalidRequest(f"options.{key} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise InvalidRequest(f"options.{key} must be an integer")


def _stop_from_option(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidRequest("options.stop must be a string or a list of strings")


def _message_from_ollama(item: object, index: int) -> Message:
    where = f"messages[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be an object")
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(_ROLES)}")
    return Message(
        role=role,
        content=_optional_str(item.get("content"), f"{where}.content") or "",
        images=_images_from_ollama(item.get("images"), f"{where}.images"),
        tool_calls=_tool_calls_from_ollama(item.get("tool_calls"), where),
        tool_call_id=_optional_str(item.get("tool_call_id"), f"{where}.tool_call_id"),
        tool_name=_optional_str(item.get("tool_name"), f"{where}.tool_name"),
        thinking=_optional_str(item.get("thinking"), f"{where}.thinking"),
    )


def _images_from_ollama(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(image, str) for image in value):
        raise InvalidRequest(f"{where} must be a list of base64 strings")
    return [_strip_data_url(image) for image in value]


def _strip_data_url(image: str) -> str:
    # Ollama wants bare base64; some clients send "data:image/png;base64,...".
    if image.startswith("data:") and ";base64," in image:
        return image.split(",", 1)[1]
    return image


def _tool_calls_from_ollama(value: object, where: str) -> list[ToolCall]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"{where}.tool_calls must be a list")
    return [
        _tool_call_from_ollama(call, f"{where}.tool_calls[{i}]", i) for i, call in enumerate(value)
    ]


def _tool_call_from_ollama(call: object, where: str, position: int) -> ToolCall:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise InvalidRequest(f"{where}.function must be an object")
    function = call["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.function.name must be a non-empty string")
    arguments = _arguments_object(function.get("arguments"))
    if arguments is None:
        raise InvalidRequest(f"{where}.function.arguments must be an object")
    call_id = call.get("id")
    # Ollama puts the index on the function; Open WebUI puts it on the call.
    index = _int_or_none(function.get("index"))
    if index is None:
        index = _int_or_none(call.get("index"))
    return ToolCall(
        name=name,
        arguments=arguments,
        id=call_id if isinstance(call_id, str) and call_id else None,
        index=position if index is None else index,
    )


def _arguments_object(value: object) -> dict[str, Any] | None:
    """Tool-call arguments as an object: an object, a JSON string holding one, or absent."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def _int_or_none(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _optional_str(value: object, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidRequest(f"{where} must be a string")


def _optional_bool(value: object, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InvalidRequest(f"{where} must be a boolean")


def _stream_flag(value: object) -> bool:
    # Ollama streams unless told `"stream": false`; a missing or null stream means true.
    streamed = _optional_bool(value, "stream")
    return True if streamed is None else streamed


def _think_value(value: object) -> bool | str | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _THINK_LEVELS:
        return value
    raise InvalidRequest('think must be true, false, "low", "medium", "high" or "max"')


def _format_value(value: object) -> str | dict[str, Any] | None:
    """ "json", a JSON Schema object, or a JSON string holding one (Open WebUI sends that)."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return value
    if value == "json":
        return "json"
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    raise InvalidRequest('format must be "json" or a JSON schema object')


def _tools_from_ollama(value: object) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise InvalidRequest("tools must be a list of objects")
    return list(value) or None


def _context_from_body(value: object) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or any(_int_or_none(token) is None for token in value):
        raise InvalidRequest("context must be a list of integers")
    return list(value)


def _check_top_logprobs(value: object) -> None:
    # Ollama rejects anything outside 0..20; otherwise we ignore logprobs.
    if value is None:
        return
    number = _int_or_none(value)
    if number is None or not 0 <= number <= 20:
        raise InvalidRequest("top_logprobs must be an integer between 0 and 20")


# ---------------------------------------------------------------------------------------------
# Server side: answers to clients
# ---------------------------------------------------------------------------------------------


def ollama_error_body(err: RequestError) -> tuple[dict[str, Any], int]:
    """Ollama's native error shape and the HTTP status to send it with."""
    return {"error": err.message}, err.status_code


def ollama_load_response(model: str, kind: str, unload: bool) -> dict[str, Any]:
    """The single object Ollama answers a load/unload probe with.

    `kind` is the request kind: "chat" gives the /api/chat shape, anything else /api/generate's.
    """
    reason = "unload" if unload else "load"
    base: dict[str, Any] = {"model": model, "created_at": _now_rfc3339()}
    if kind == "chat":
        base["message"] = {"role": "assistant", "content": ""}
    else:
        base["response"] = ""
    return {**base, "done": True, "done_reason": reason}


@dataclass(frozen=True)
class _Answer:
    """Everything one answer said, gathered for the non-streaming shapes."""

    content: str
    thinking: str
    tool_calls: list[ToolCall]
    done: Done


@dataclass
class _Clock:
    """Monotonic marks of one answer, for the durations a backend did not report."""

    start_ns: int
    first_event_ns: int | None = None

    def mark_event(self) -> None:
        if self.first_event_ns is None:
            self.first_event_ns = time.monotonic_ns()


def ollama_ndjson_from_events(events: Iterable[ChatEvent], *, model: str) -> Iterator[str]:
    """/api/chat streaming: one compact JSON line per event, ending with the done:true line.

    A failure while iterating `events` becomes one `{"error": ...}` line (never the exception
    text) and the stream stops there.
    """
    return _ndjson_from_events(events, model, _chat_chunk, _chat_final)


def ollama_chat_from_events(events: Iterable[ChatEvent], *, model: str) -> dict[str, Any]:
    """/api/chat with stream:false: the whole answer as one object. Exceptions propagate."""
    clock = _Clock(time.monotonic_ns())
    answer = _collect_answer(events, clock)
    final = _chat_final(model, answer.done, clock)
    message = final["message"]
    message["content"] = answer.content
    if answer.thinking:
        message["thinking"] = answer.thinking
    if answer.tool_calls:
        message["tool_calls"] = [_ollama_tool_call(call) for call in answer.tool_calls]
    return final


def ollama_generate_ndjson_from_events(events: Iterable[ChatEvent], *, model: str) -> Iterator[str]:
    """/api/generate streaming: `response` pieces, then the done:true line with `context`."""
    return _ndjson_from_events(events, model, _generate_chunk, _generate_final)


def ollama_generate_from_events(events: Iterable[ChatEvent], *, model: str) -> dict[str, Any]:
    """/api/generate with stream:false: the whole answer as one object. Exceptions propagate."""
    clock = _Clock(time.monotonic_ns())
    answer = _collect_answer(events, clock)
    final = _generate_final(model, answer.done, clock)
    final["response"] = answer.content
    if answer.thinking:
        final["thinking"] = answer.thinking
    return final


def _ndjson_from_events(
    events: Iterable[ChatEvent],
    model: str,
    chunk_from_event: Callable[[str, ChatEvent], dict[str, Any] | None],
    final_from_done: Callable[[str, Done, _Clock], dict[str, Any]],
) -> Iterator[str]:
    clock = _Clock(time.monotonic_ns())
    iterator = iter(events)
    try:
        for event in iterator:
            clock.mark_event()
            if isinstance(event, Done):
                yield _ndjson_line(final_from_done(model, event, clock))
                return
            chunk = chunk_from_event(model, event)
            if chunk is not None:
                yield _ndjson_line(chunk)
        raise ExpertStreamBroken("the answer ended without a Done event")
    except Exception as exc:
        # Content may already be out, so the status is 200 and an error line is all we can say.
        _log.error("stream failed mid-answer: %s", sanitize(repr(exc)))
        message = exc.message if isinstance(exc, RequestError) else _STREAM_FAILED_MESSAGE
        yield _ndjson_line({"error": message})
    finally:
        # A client that goes away closes us; pass that on so the expert call is cancelled.
        _close_quietly(iterator)


def _collect_answer(events: Iterable[ChatEvent], clock: _Clock) -> _Answer:
    content: list[str] = []
    thinking: list[str] = []
    tool_calls: list[ToolCall] = []
    iterator = iter(events)
    try:
        for event in iterator:
            clock.mark_event()
            if isinstance(event, Done):
                return _Answer("".join(content), "".join(thinking), tool_calls, event)
            if isinstance(event, TextDelta):
                content.append(event.text)
            elif isinstance(event, ThinkingDelta):
                thinking.append(event.text)
            elif isinstance(event, ToolCallDelta):
                tool_calls.append(event.call)
    finally:
        _close_quietly(iterator)
    raise ExpertStreamBroken("the answer ended without a Done event")


def _close_quietly(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if callable(close):
        close()


def _chat_chunk(model: str, event: ChatEvent) -> dict[str, Any] | None:
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    if isinstance(event, TextDelta):
        if not event.text:
            return None
        message["content"] = event.text
    elif isinstance(event, ThinkingDelta):
        if not event.text:
            return None
        message["thinking"] = event.text
    elif isinstance(event, ToolCallDelta):
        message["tool_calls"] = [_ollama_tool_call(event.call)]
    else:
        return None
    return {"model": model, "created_at": _now_rfc3339(), "message": message, "done": False}


def _chat_final(model: str, done: Done, clock: _Clock) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": _now_rfc3339(),
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": _ollama_done_reason(done.done_reason),
        **_metrics_from_usage(done.usage, clock),
    }


def _generate_chunk(model: str, event: ChatEvent) -> dict[str, Any] | None:
    # /api/generate has no tool calls; only text and reasoning go out.
    if isinstance(event, TextDelta) and event.text:
        piece: dict[str, Any] = {"response": event.text}
    elif isinstance(event, ThinkingDelta) and event.text:
        piece = {"response": "", "thinking": event.text}
    else:
        return None
    return {"model": model, "created_at": _now_rfc3339(), **piece, "done": False}


def _generate_final(model: str, done: Done, clock: _Clock) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": _now_rfc3339(),
        "response": "",
        "done": True,
        "done_reason": _ollama_done_reason(done.done_reason),
        "context": list(_GENERATE_CONTEXT),
        **_metrics_from_usage(done.usage, clock),
    }


def _ollama_done_reason(reason: DoneReason) -> str:
    # Native Ollama never says "tool_calls" (Open WebUI infers it from the calls it saw).
    return "stop" if reason == "tool_calls" else reason


def _metrics_from_usage(usage: Usage, clock: _Clock) -> dict[str, int]:
    """Ollama's metrics, never zero: Go's omitempty drops zeros and strict clients want them.

    Durations the backend did not report are measured here: prompt eval until the first
    event, eval from there to the end.
    """
    end_ns = time.monotonic_ns()
    first_ns = clock.first_event_ns if clock.first_event_ns is not None else end_ns
    return {
        "total_duration": max(1, usage.total_duration_ns or end_ns - clock.start_ns),
        "load_duration": max(1, usage.load_duration_ns),
        "prompt_eval_count": max(1, usage.prompt_tokens),
        "prompt_eval_duration": max(1, usage.prompt_eval_duration_ns or first_ns - clock.start_ns),
        "eval_count": max(1, usage.completion_tokens),
        "eval_duration": max(1, usage.eval_duration_ns or end_ns - first_ns),
    }


def _ollama_tool_call(call: ToolCall) -> dict[str, Any]:
    # `arguments` stays an object: Continue and ollama-python break on a JSON string here.
    wire: dict[str, Any] = {"id": call.id} if call.id else {}
    wire["function"] = {"index": call.index, "name": call.name, "arguments": dict(call.arguments)}
    return wire


def _ndjson_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat()


def _rfc3339_from_epoch(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


# ---------------------------------------------------------------------------------------------
# Server side: model listings
# ---------------------------------------------------------------------------------------------


def ollama_tags(cards: Iterable[ModelCard]) -> dict[str, Any]:
    """GET /api/tags. `name` and `model` carry the same tagged name (Open WebUI keys by model).

    Recent Ollama lists each model's `capabilities` here too (server/capabilities_test.go checks
    `listModels`), so clients can pick a vision or tools model without an /api/show per model.
    """
    return {
        "models": [
            {
                "name": card.name,
                "model": card.name,
                "modified_at": _rfc3339_from_epoch(card.modified_at),
                "size": card.size,
                "digest": card.digest,
                "details": _details_from_card(card),
                "capabilities": list(card.capabilities),
            }
            for card in cards
        ]
    }


def ollama_show(card: ModelCard) -> dict[str, Any]:
    """POST /api/show, shaped for the clients that read it.

    Continue reads `num_ctx` from `parameters` and turns on FIM when the template has
    `.Suffix`; LiteLLM sends tools natively only when "tools" is in the template and reads the
    context window from a `*context_length` key of `model_info` (which ollama-python requires).
    """
    template = _template_from_capabilities(card.capabilities)
    model_info: dict[str, Any] = {
        "general.architecture": card.family,
        f"{card.family}.context_length": card.context_length,
    }
    if card.embedding_length is not None:
        model_info[f"{card.family}.embedding_length"] = card.embedding_length
    return {
        "modelfile": _modelfile_from_card(card, template),
        "parameters": f"{'num_ctx':<{_PARAMETER_NAME_WIDTH}} {card.context_length}",
        "template": template,
        "details": _details_from_card(card),
        "model_info": model_info,
        "capabilities": list(card.capabilities),
        "modified_at": _rfc3339_from_epoch(card.modified_at),
    }


def ollama_ps(entries: Iterable[tuple[ModelCard, float, int]]) -> dict[str, Any]:
    """GET /api/ps from (card, expires_at epoch seconds, size_vram bytes) tuples."""
    return {
        "models": [
            {
                "name": card.name,
                "model": card.name,
                "size": card.size,
                "digest": card.digest,
                "details": _details_from_card(card),
                "expires_at": _rfc3339_from_epoch(expires_at),
                "size_vram": size_vram,
                "context_length": card.context_length,
            }
            for card, expires_at, size_vram in entries
        ]
    }


def ollama_version(version: str) -> dict[str, Any]:
    """GET /api/version. Open WebUI parses it as X.Y.Z integers, so pass such a string."""
    return {"version": version}


def _details_from_card(card: ModelCard) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": card.format,
        "family": card.family,
        "families": [card.family],
        "parameter_size": card.parameter_size,
        "quantization_level": card.quantization_level,
    }


def _template_from_capabilities(capabilities: Iterable[str]) -> str:
    capabilities = set(capabilities)
    parts = ["{{ if .System }}{{ .System }}{{ end }}"]
    if "tools" in capabilities:
        parts.append("{{ if .Tools }}{{ .Tools }}{{ end }}")
    parts.append("{{ .Prompt }}")
    if "insert" in capabilities:
        parts.append("{{ if .Suffix }}{{ .Suffix }}{{ end }}")
    return "".join(parts)


def _modelfile_from_card(card: ModelCard, template: str) -> str:
    comment = "".join(f"# {line}\n" for line in card.description.splitlines() if line.strip())
    return (
        f'# Modelfile generated by LeMoE for "{card.name}"\n{comment}\n'
        f'FROM {card.name}\nTEMPLATE """{template}"""\nPARAMETER num_ctx {card.context_length}\n'
    )


# ---------------------------------------------------------------------------------------------
# Client side: talking to an upstream Ollama
# ---------------------------------------------------------------------------------------------


def ollama_chat_body_from_request(request: ChatRequest, model_name: str) -> dict[str, Any]:
    """The /api/chat body for an upstream Ollama. Always streamed; we re-buffer if needed."""
    body: dict[str, Any] = {
        "model": model_name,
        "messages": [_ollama_message(message) for message in request.messages],
        "stream": True,
    }
    if request.tools:
        body["tools"] = request.tools
    return {**body, **_shared_generation_fields(request)}


def ollama_generate_body_from_request(request: ChatRequest, model_name: str) -> dict[str, Any]:
    """The /api/generate body for an upstream Ollama (kind="completion"). Always streamed."""
    body: dict[str, Any] = {
        "model": model_name,
        "prompt": request.prompt if request.prompt is not None else _last_user_text(request),
        "stream": True,
    }
    if request.suffix is not None:
        body["suffix"] = request.suffix
    if request.raw:
        body["raw"] = True
    system = _leading_system_text(request)
    # Ollama rejects raw together with system.
    if system and not request.raw:
        body["system"] = system
    images = [image for m in request.messages if m.role == "user" for image in m.images]
    if images:
        body["images"] = images
    return {**body, **_shared_generation_fields(request)}


def _shared_generation_fields(request: ChatRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if request.options:
        fields["options"] = dict(request.options)
    if request.format is not None:
        fields["format"] = request.format
    if request.think is not None:
        fields["think"] = request.think
    if request.keep_alive is not None:
        fields["keep_alive"] = request.keep_alive
    return fields


def _ollama_message(message: Message) -> dict[str, Any]:
    wire: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.images:
        wire["images"] = list(message.images)
    if message.thinking:
        wire["thinking"] = message.thinking
    if message.tool_calls:
        wire["tool_calls"] = [_ollama_tool_call(call) for call in message.tool_calls]
    if message.tool_name:
        wire["tool_name"] = message.tool_name
    if message.tool_call_id:
        wire["tool_call_id"] = message.tool_call_id
    return wire


def _leading_system_text(request: ChatRequest) -> str | None:
    if request.messages and request.messages[0].role == "system":
        return request.messages[0].content
    return None


def _last_user_text(request: ChatRequest) -> str:
    users = [m.content for m in request.messages if m.role == "user"]
    return users[-1] if users else ""


def events_from_ollama_ndjson(lines: Iterable[bytes | str]) -> Iterator[ChatEvent]:
    """Parse an upstream /api/chat or /api/generate NDJSON stream into events.

    done_reason: "length" stays "length", anything else becomes "stop", also after tool calls
    (Ollama's own semantics; the OpenAI adapter turns it into "tool_calls" when it saw calls).
    An `{"error": ...}` line, a line that is not a JSON object, or a stream that ends without a
    done:true line raises `ExpertStreamBroken` (its message is for the log).
    """
    tool_call_count = 0
    for raw_line in lines:
        line = raw_line.decode("utf-8", "replace") if isinstance(raw_line, bytes) else raw_line
        if not line.strip():
            continue
        chunk = _chunk_from_line(line)
        for event in _events_from_chunk(chunk, tool_call_count):
            if isinstance(event, ToolCallDelta):
                tool_call_count += 1
            yield event
        if chunk.get("done") is True:
            yield Done(done_reason=_done_reason_from_ollama(chunk), usage=_usage_from_chunk(chunk))
            return
    raise ExpertStreamBroken("upstream Ollama stream ended without a done line")


def _chunk_from_line(line: str) -> dict[str, Any]:
    try:
        chunk = json.loads(line)
    except ValueError as exc:
        raise ExpertStreamBroken(f"upstream Ollama sent invalid JSON: {line[:200]!r}") from exc
    if not isinstance(chunk, dict):
        raise ExpertStreamBroken(f"upstream Ollama sent a non-object line: {line[:200]!r}")
    if "error" in chunk:
        raise ExpertStreamBroken(f"upstream Ollama error: {str(chunk['error'])[:500]}")
    return chunk


def _events_from_chunk(chunk: dict[str, Any], tool_call_count: int) -> list[ChatEvent]:
    """Text, reasoning and tool calls of one chat line (`message`) or generate line."""
    message = chunk.get("message")
    source = message if isinstance(message, dict) else chunk
    text_key = "content" if isinstance(message, dict) else "response"
    events: list[ChatEvent] = []
    thinking = source.get("thinking")
    if isinstance(thinking, str) and thinking:
        events.append(ThinkingDelta(thinking))
    text = source.get(text_key)
    if isinstance(text, str) and text:
        events.append(TextDelta(text))
    calls = source.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ExpertStreamBroken("upstream Ollama sent tool_calls that are not a list")
    for offset, call in enumerate(calls):
        events.append(ToolCallDelta(_upstream_tool_call(call, tool_call_count + offset)))
    return events


def _upstream_tool_call(call: object, position: int) -> ToolCall:
    try:
        return _tool_call_from_ollama(call, "tool_call", position)
    except InvalidRequest as exc:
        raise ExpertStreamBroken(f"upstream Ollama sent a bad tool call: {exc.message}") from exc


def _done_reason_from_ollama(chunk: dict[str, Any]) -> DoneReason:
    return "length" if chunk.get("done_reason") == "length" else "stop"


def _usage_from_chunk(chunk: dict[str, Any]) -> Usage:
    def count(key: str) -> int:
        value = _int_or_none(chunk.get(key))
        return value if value is not None and value > 0 else 0

    return Usage(
        prompt_tokens=count("prompt_eval_count"),
        completion_tokens=count("eval_count"),
        total_duration_ns=count("total_duration"),
        load_duration_ns=count("load_duration"),
        prompt_eval_duration_ns=count("prompt_eval_duration"),
        eval_duration_ns=count("eval_duration"),
    )
