"""The Anthropic Messages API (`/v1/messages`), both directions, as pure functions.

Ollama serves this API since v0.14 so that Claude Code can run on it (`ANTHROPIC_BASE_URL`);
like Ollama's `anthropic/anthropic.go` this is a translation onto the native chat: a Messages
body becomes a `ChatRequest`, and the expert's `ChatEvent`s become a `message` object or the SSE
event sequence (message_start, content_block_start/delta/stop, message_delta, message_stop).

Nothing here imports Flask or does IO; the view in http_views.py wires it to `answer_chat`.

Choices worth knowing:
- `max_tokens` is required, as Anthropic requires it (400 without it); it becomes `num_predict`.
- `tool_choice` "none" sends no tools; "auto", "any" and "tool" pass the tools and cannot force
  a call (no backend LeMoE drives has a portable way to), as in Ollama.
- Images are taken inline only (`source.type` "base64"): fetching a client URL would let clients
  make LeMoE call any host.
- `stop_reason` is "tool_use" when the answer called a tool, "max_tokens" when it ran out, else
  "end_turn" (backends do not report which stop sequence matched).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    Message,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    close_events,
    collect_answer,
    name_tool_results,
)
from modules.errors import InvalidRequest, RequestError
from modules.logger import get_logger, sanitize
from modules.protocol.openai_protocol import (
    invalid_type,
    model_from_openai,
    optional_bool,
    optional_int,
    optional_number,
    optional_object,
    require_object,
)

_log = get_logger("anthropic_protocol")

# Shown to clients when an expert fails mid-stream; the real cause goes to the log only.
STREAM_ERROR_MESSAGE = "The model failed while generating the response; the answer is incomplete."
# Anthropic's error `type` by HTTP status (docs.anthropic.com "Errors"; Ollama's NewError).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_TOOL_CHOICES = ("auto", "any", "tool", "none")
# output_config.effort onto ChatRequest.think levels (Ollama maps xhigh to high).
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "max"}


def is_anthropic_path(path: str) -> bool:
    """Whether a request path is on the Anthropic API (its errors take Anthropic's shape)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# ---------------------------------------------------------------------------------------------
# Requests in
# ---------------------------------------------------------------------------------------------


def chat_request_from_anthropic(body: object, *, require_max_tokens: bool = True) -> ChatRequest:
    """Validate a parsed `/v1/messages` body and convert it. Raises `InvalidRequest`.

    `count_tokens` bodies are the same without `max_tokens`, hence `require_max_tokens`.
    """
    body = require_object(body, "body")
    raw_messages = body.get("messages")
    if raw_messages is None:
        raise InvalidRequest("messages: Field required")
    if not isinstance(raw_messages, list):
        raise invalid_type("messages", "an array", raw_messages)
    if not raw_messages:
        raise InvalidRequest("messages: at least one message is required")
    messages = _system_from_anthropic(body.get("system"))
    for i, raw in enumerate(raw_messages):
        messages.extend(_messages_from_anthropic(raw, f"messages.{i}"))
    name_tool_results(messages)
    tools = _tools_from_anthropic(body.get("tools"))
    if _tool_choice_from_anthropic(body.get("tool_choice")) == "none":
        tools = None
    output_config = optional_object(body, "output_config") or {}
    think = _think_from_anthropic(body.get("thinking"))
    return ChatRequest(
        model=model_from_openai(body),
        messages=messages,
        stream=optional_bool(body, "stream") or False,
        options=_options_from_anthropic(body, require_max_tokens),
        tools=tools,
        format=_format_from_output_config(output_config),
        # An explicit thinking switch wins over an effort level, as in Ollama.
        think=think if think is not None else _think_from_effort(output_config),
    )


def body_has_images(body: object) -> bool:
    """Whether a parsed body has an image block (checked before it is validated, to choose its
    size limit), in a message or inside a tool result."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return False
    return any(_block_has_image(block) for message in messages if isinstance(message, dict)
               and isinstance(message.get("content"), list) for block in message["content"])


def _block_has_image(block: object) -> bool:
    if not isinstance(block, dict):
        return False
    if block.get("type") == "image":
        return True
    inner = block.get("content") if block.get("type") == "tool_result" else None
    return isinstance(inner, list) and any(isinstance(b, dict) and b.get("type") == "image" for b in inner)


def _system_from_anthropic(system: object) -> list[Message]:
    if system is None:
        return []
    if isinstance(system, str):
        return [Message(role="system", content=system)] if system else []
    if not isinstance(system, list):
        raise invalid_type("system", "a string or an array of text blocks", system)
    texts = []
    for i, raw in enumerate(system):
        block = require_object(raw, f"system.{i}")
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest(f"system.{i}: expected a text block with a string 'text'")
        texts.append(block["text"])
    text = "\n".join(t for t in texts if t)
    return [Message(role="system", content=text)] if text else []


def _messages_from_anthropic(raw: object, where: str) -> list[Message]:
    """One Anthropic turn as internal messages: a user turn's tool results come first, each as
    its own "tool" message (the shape every backend's chat template expects)."""
    msg = require_object(raw, where)
    role = msg.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role: must be 'user' or 'assistant'")
    content = msg.get("content")
    if isinstance(content, str):
        return [Message(role=role, content=content)]
    if not isinstance(content, list):
        raise invalid_type(f"{where}.content", "a string or an array of content blocks", content)
    texts: list[str] = []
    images: list[str] = []
    calls: list[ToolCall] = []
    thinking: list[str] = []
    results: list[Message] = []
    for i, raw_block in enumerate(content):
        block = require_object(raw_block, f"{where}.content.{i}")
        kind, at = block.get("type"), f"{where}.content.{i}"
        if kind == "text":
            texts.append(_string(block, "text", at))
        elif kind == "image":
            images.append(_image_from_anthropic(block.get("source"), f"{at}.source"))
        elif kind == "tool_use":
            calls.append(_tool_use_from_anthropic(block, at, len(calls)))
        elif kind == "tool_result":
            results.append(_tool_result_from_anthropic(block, at))
        elif kind == "thinking":
            thinking.append(_string(block, "thinking", at))
        elif not isinstance(kind, str):
            raise invalid_type(f"{at}.type", "a string", kind)
        # redacted_thinking, documents, citations, server tool blocks: nothing a local model can
        # use, so they are left out rather than refused (Claude Code sends some of them back).
    out = results if role == "user" else []
    if texts or images or calls or thinking or not results:
        out.append(Message(role=role, content="\n".join(texts), images=images, tool_calls=calls,
                           thinking="".join(thinking) or None))
    return out + ([] if role == "user" else results)


def _string(block: dict[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise invalid_type(f"{where}.{key}", "a string", value)
    return value


def _image_from_anthropic(source: object, where: str) -> str:
    source = require_object(source, where)
    if source.get("type") != "base64":
        raise InvalidRequest(f"{where}.type: only 'base64' image sources are supported")
    data = source.get("data")
    if not isinstance(data, str):
        raise invalid_type(f"{where}.data", "a string", data)
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}.data: the image is not valid base64") from None
    return data


def _tool_use_from_anthropic(block: dict[str, Any], where: str, index: int) -> ToolCall:
    call_id, name = block.get("id"), block.get("name")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}.id: expected a non-empty string")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.name: expected a non-empty string")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise invalid_type(f"{where}.input", "an object", arguments)
    return ToolCall(name=name, arguments=arguments, id=call_id, index=index)


def _tool_result_from_anthropic(block: dict[str, Any], where: str) -> Message:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}.tool_use_id: expected a non-empty string")
    content = block.get("content")
    texts: list[str] = []
    images: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for i, raw in enumerate(content):
            inner = require_object(raw, f"{where}.content.{i}")
            if inner.get("type") == "text":
                texts.append(_string(inner, "text", f"{where}.content.{i}"))
            elif inner.get("type") == "image":
                images.append(_image_from_anthropic(inner.get("source"), f"{where}.content.{i}.source"))
    elif content is not None:
        raise invalid_type(f"{where}.content", "a string or an array of content blocks", content)
    text = "\n".join(texts)
    # The model has to know the tool failed; Anthropic carries that in a flag, chat templates don't.
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    return Message(role="tool", content=text, images=images, tool_call_id=call_id)


def _tools_from_anthropic(raw: object) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise invalid_type("tools", "an array", raw)
    tools = []
    for i, item in enumerate(raw):
        tool = require_object(item, f"tools.{i}")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tools.{i}.name: expected a non-empty string")
        schema = tool.get("input_schema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict):
            raise invalid_type(f"tools.{i}.input_schema", "an object", schema)
        description = tool.get("description")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(description, str):
            function["description"] = description
        tools.append({"type": "function", "function": function})
    return tools or None


def _tool_choice_from_anthropic(raw: object) -> str | None:
    if raw is None:
        return None
    choice = require_object(raw, "tool_choice")
    kind = choice.get("type")
    if kind not in _TOOL_CHOICES:
        raise InvalidRequest("tool_choice.type: must be one of 'auto', 'any', 'tool', 'none'")
    if kind == "tool" and not isinstance(choice.get("name"), str):
        raise InvalidRequest("tool_choice.name: required when tool_choice.type is 'tool'")
    return str(kind)


def _options_from_anthropic(body: dict[str, Any], require_max_tokens: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    max_tokens = optional_int(body, "max_tokens")
    if max_tokens is None and require_max_tokens:
        raise InvalidRequest("max_tokens: Field required")
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidRequest("max_tokens: must be at least 1")
        options["num_predict"] = max_tokens
    # Anthropic's ranges: temperature and top_p in [0, 1].
    for key in ("temperature", "top_p"):
        value = optional_number(body, key)
        if value is not None:
            if not 0.0 <= value <= 1.0:
                raise InvalidRequest(f"{key}: must be between 0 and 1")
            options[key] = value
    top_k = optional_int(body, "top_k")
    if top_k is not None:
        if top_k < 0:
            raise InvalidRequest("top_k: must be a non-negative integer")
        options["top_k"] = top_k
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid_type("stop_sequences", "an array of strings", stop)
        if stop:
            options["stop"] = list(stop)
    return options


def _think_from_effort(output_config: dict[str, Any]) -> str | None:
    effort = output_config.get("effort")
    if effort is None:
        return None
    if effort not in _EFFORTS:
        raise InvalidRequest("output_config.effort: must be one of 'low', 'medium', 'high', 'xhigh', 'max'")
    return _EFFORTS[effort]


def _format_from_output_config(output_config: dict[str, Any]) -> dict[str, Any] | None:
    spec = output_config.get("format")
    if spec is None:
        return None
    spec = require_object(spec, "output_config.format")
    schema = spec.get("schema")
    if spec.get("type") != "json_schema" or not isinstance(schema, dict):
        raise InvalidRequest("output_config.format: expected {'type': 'json_schema', 'schema': {...}}")
    return schema


def _think_from_anthropic(raw: object) -> bool | None:
    if raw is None:
        return None
    thinking = require_object(raw, "thinking")
    kind = thinking.get("type")
    if kind == "disabled":
        return False
    if kind not in ("enabled", "adaptive", "between_tools"):
        raise InvalidRequest("thinking.type: must be 'enabled', 'adaptive', 'between_tools' or 'disabled'")
    budget = thinking.get("budget_tokens")
    if kind == "enabled" and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise InvalidRequest("thinking.budget_tokens: required, a positive integer, when thinking is enabled")
    # No backend takes a reasoning budget in tokens; switching reasoning on is what carries over.
    return True


# ---------------------------------------------------------------------------------------------
# Answers out
# ---------------------------------------------------------------------------------------------


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def anthropic_message_from_events(events: Iterable[ChatEvent], *, model: str, message_id: str) -> dict[str, Any]:
    """A whole non-streamed `message` object from one answer's events."""
    answer = collect_answer(events)
    done = answer.done
    calls = [_tool_use_block(call, with_input=True) for call in answer.calls]
    content: list[dict[str, Any]] = [_thinking_block(answer.thinking)] if answer.thinking else []
    # An answer with nothing at all still carries one (empty) text block, so `content[0].text`
    # works for clients; an answer that only calls tools carries just the calls.
    if answer.text or not calls:
        content.append({"type": "text", "text": answer.text})
    content.extend(calls)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(done, bool(calls)),
        "stop_sequence": None,
        "usage": {"input_tokens": done.usage.prompt_tokens, "output_tokens": done.usage.completion_tokens},
    }


def anthropic_sse_from_events(events: Iterable[ChatEvent], *, model: str, message_id: str) -> Iterator[str]:
    """Stream one answer as Anthropic's SSE event sequence.

    message_start (and a ping) go out before the first event is pulled, so the client has its
    first byte while the expert is still loading. Thinking, text and each tool call are content
    blocks of their own, opened and closed in order. A failure while pulling events becomes one
    `error` event and ends the stream (the status is already 200 by then).
    """
    yield _event("message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})
    yield _event("ping", {"type": "ping"})
    blocks = _BlockWriter()
    done = Done()
    iterator = iter(events)
    try:
        for event in iterator:
            if isinstance(event, TextDelta) and event.text:
                yield from blocks.delta("text", {"type": "text_delta", "text": event.text})
            elif isinstance(event, ThinkingDelta) and event.text:
                yield from blocks.delta("thinking", {"type": "thinking_delta", "thinking": event.text})
            elif isinstance(event, ToolCallDelta):
                yield from blocks.tool_use(event.call)
            elif isinstance(event, Done):
                done = event
                break
    except Exception as exc:
        yield _stream_error_event(exc)
        return
    finally:
        close_events(iterator)
    yield from blocks.close()
    yield _event("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(done, blocks.called_tools), "stop_sequence": None},
        "usage": {"input_tokens": done.usage.prompt_tokens, "output_tokens": done.usage.completion_tokens},
    })
    yield _event("message_stop", {"type": "message_stop"})


class _BlockWriter:
    """Which content block is open and at what index: the stream's one piece of state."""

    def __init__(self) -> None:
        self.index = 0
        self.open_kind: str | None = None
        self.called_tools = False

    def delta(self, kind: str, delta: dict[str, Any]) -> Iterator[str]:
        if self.open_kind != kind:
            yield from self.close()
            block = _thinking_block("") if kind == "thinking" else {"type": "text", "text": ""}
            yield _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                 "content_block": block})
            self.open_kind = kind
        yield _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def tool_use(self, call: ToolCall) -> Iterator[str]:
        yield from self.close()
        # The input arrives whole; it is still sent as one input_json_delta, as clients expect.
        yield _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                             "content_block": _tool_use_block(call, with_input=False)})
        yield _event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                             "delta": {"type": "input_json_delta", "partial_json": _json(call.arguments)}})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": self.index})
        self.index += 1
        self.called_tools = True

    def close(self) -> Iterator[str]:
        if self.open_kind is not None:
            yield _event("content_block_stop", {"type": "content_block_stop", "index": self.index})
            self.index += 1
            self.open_kind = None


def _thinking_block(text: str) -> dict[str, Any]:
    # No signature can be made for a local model's reasoning; the SDK requires the field.
    return {"type": "thinking", "thinking": text, "signature": ""}


def _tool_use_block(call: ToolCall, *, with_input: bool) -> dict[str, Any]:
    return {"type": "tool_use", "id": _tool_use_id(call), "name": call.name,
            "input": call.arguments if with_input else {}}


def _tool_use_id(call: ToolCall) -> str:
    # Ollama upstreams may give no id; Anthropic clients need one to send the result back.
    return call.id or f"toolu_{secrets.token_hex(12)}"


def _stop_reason(done: Done, called_tools: bool) -> str:
    if called_tools:
        return "tool_use"
    return "max_tokens" if done.done_reason == "length" else "end_turn"


def anthropic_error_body(err: RequestError) -> tuple[dict[str, Any], int]:
    """Anthropic's error object and HTTP status for a client-facing error."""
    return {"type": "error", "error": _error_object(err.message, err.status_code)}, err.status_code


def _error_object(message: str, status: int) -> dict[str, str]:
    return {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}


def _stream_error_event(exc: Exception) -> str:
    # A RequestError message is written for clients; anything else may hold paths or secrets.
    if isinstance(exc, RequestError):
        return _event("error", {"type": "error", "error": _error_object(exc.message, exc.status_code)})
    _log.warning("stream ended by %s: %s", type(exc).__name__, sanitize(str(exc)))
    return _event("error", {"type": "error", "error": _error_object(STREAM_ERROR_MESSAGE, 500)})


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {_json(data)}\n\n"
