"""The OpenAI wire format, both directions, as pure functions (Ollama's `openai/openai.go` idea).

Server side (clients talk to us): parse and validate `/v1/chat/completions` and `/v1/completions`
bodies into a `ChatRequest`, and turn a stream of `ChatEvent`s into OpenAI JSON or SSE text.
Client side (we talk to an OpenAI-compatible upstream such as vLLM or llama.cpp server): build
the upstream body from a `ChatRequest`. Its messages, and reading its answer back into
`ChatEvent`s, are the OpenAI upstream codec's (`openai_upstream.py`), which the other
OpenAI-shaped backends (llama-cpp-python, LiteLLM, ONNX templates) share.

Nothing here imports Flask or does IO; the HTTP glue lives in `api_server.py` and the backends.

Choices worth knowing:
- Only options the client sent are set. Ollama's own layer forces temperature/top_p to 1.0 when
  absent; we leave them out so every expert keeps its tuned defaults and the same request gets
  the same answer through `/api/chat` and `/v1/chat/completions`.
- Error `type` by status follows Ollama's `NewError` (400 invalid_request_error, 404
  not_found_error, anything else api_error), filled in with the readable names openai-python's
  exception classes stand for (401 authentication_error, 403 permission_error, 429
  rate_limit_error). OpenAI itself is not consistent here (it sends invalid_request_error for a
  bad key and "requests"/"tokens" for rate limits), and no client branches on `type`: they all
  branch on the status code.
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
    ModelCard,
    Role,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    close_events,
    collect_answer,
    name_tool_results,
)
from modules.errors import InvalidRequest, RequestError
from modules.logger import get_logger, sanitize
from modules.protocol.openai_upstream import compact_json, openai_messages

_log = get_logger("openai_protocol")

SYSTEM_FINGERPRINT = "fp_lemoe"
# Shown to clients when an expert fails mid-stream; the real cause goes to the log only.
STREAM_ERROR_MESSAGE = "The model failed while generating the response; the answer is incomplete."

_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    # Legacy function-calling result turns are tool results under another name.
    "function": "tool",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    422: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
}
# OpenAI effort names onto ChatRequest.think values ("none" switches reasoning off).
_EFFORT_TO_THINK: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "max",
}
# Sampling numbers with OpenAI's accepted ranges; the names are the same in Ollama's options.
_NUMBER_OPTIONS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
# ---------------------------------------------------------------------------------------------
# Server side: requests in
# ---------------------------------------------------------------------------------------------


def chat_request_from_openai(body: object) -> ChatRequest:
    """Validate a parsed `/v1/chat/completions` body and convert it. Raises `InvalidRequest`."""
    body = require_object(body, "body")
    raw_messages = body.get("messages")
    if "messages" not in body or raw_messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.")
    if not isinstance(raw_messages, list):
        raise invalid_type("messages", "an array", raw_messages)
    if not raw_messages:
        raise InvalidRequest("[] is too short - 'messages'")
    messages = [_message_from_openai(m, f"messages[{i}]") for i, m in enumerate(raw_messages)]
    name_tool_results(messages)
    stream_options = optional_object(body, "stream_options")
    return ChatRequest(
        model=model_from_openai(body),
        messages=messages,
        stream=optional_bool(body, "stream") or False,
        options=_options_from_openai(body),
        tools=_tools_from_openai(body),
        format=_format_from_openai(body),
        think=think_from_openai(body),
        include_usage=bool(stream_options and optional_bool(stream_options, "include_usage", "stream_options.")),
    )


def body_has_images(body: object) -> bool:
    """Whether a parsed /v1/chat/completions body has an `image_url` content part (checked before
    it is validated, to choose its size limit)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return False
    return any(isinstance(part, dict) and part.get("type") == "image_url"
               for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
               for part in message["content"])


def completion_request_from_openai(body: object) -> ChatRequest:
    """Validate a parsed legacy `/v1/completions` body and convert it. Raises `InvalidRequest`."""
    body = require_object(body, "body")
    stream_options = optional_object(body, "stream_options")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise invalid_type("suffix", "a string", suffix)
    return ChatRequest(
        model=model_from_openai(body),
        messages=[],
        stream=optional_bool(body, "stream") or False,
        options=_options_from_openai(body),
        kind="completion",
        prompt=_prompt_from_openai(body),
        suffix=suffix or None,
        include_usage=bool(stream_options and optional_bool(stream_options, "include_usage", "stream_options.")),
    )


def _prompt_from_openai(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.")
    if isinstance(prompt, str):
        return prompt
    # openai-python may wrap a single prompt in a list; batches and token arrays are not served.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise InvalidRequest("Invalid value for 'prompt': expected a string or a list holding exactly one string.")


def model_from_openai(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    # An empty name means the same as none: let the router choose.
    return model or None


def _message_from_openai(raw: object, where: str) -> Message:
    msg = require_object(raw, where)
    role_name = msg.get("role")
    if not isinstance(role_name, str) or role_name not in _ROLES:
        allowed = "', '".join(_ROLES)
        raise InvalidRequest(f"Invalid value for '{where}.role': must be one of '{allowed}'.")
    text, images = _content_from_openai(msg.get("content"), f"{where}.content")
    tool_calls = _tool_calls_from_openai(msg.get("tool_calls"), f"{where}.tool_calls")
    legacy_call = msg.get("function_call")
    if legacy_call is not None and not tool_calls:
        tool_calls = [_tool_call_from_function(legacy_call, f"{where}.function_call", None, 0)]
    tool_call_id = msg.get("tool_call_id")
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        raise invalid_type(f"{where}.tool_call_id", "a string", tool_call_id)
    name = msg.get("name")
    thinking = msg.get("reasoning_content") or msg.get("reasoning")
    role = _ROLES[role_name]
    return Message(
        role=role,
        content=text,
        images=images,
        tool_calls=tool_calls,
        tool_call_id=tool_call_id or None,
        tool_name=name if role == "tool" and isinstance(name, str) and name else None,
        thinking=thinking if isinstance(thinking, str) and thinking else None,
    )


def _content_from_openai(content: object, where: str) -> tuple[str, list[str]]:
    """Flatten string / null / content-part content into text plus raw base64 images."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise invalid_type(where, "a string, null or an array of content parts", content)
    texts: list[str] = []
    images: list[str] = []
    for i, raw_part in enumerate(content):
        part = require_object(raw_part, f"{where}[{i}]")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_type(f"{where}[{i}].text", "a string", text)
            texts.append(text)
        elif kind == "image_url":
            images.append(image_from_data_url(part.get("image_url"), f"{where}[{i}].image_url"))
        elif not isinstance(kind, str):
            raise invalid_type(f"{where}[{i}].type", "a string", kind)
        # Audio, files and refusals have no place in the internal message: ignored on purpose.
    return "\n".join(texts), images


def image_from_data_url(image_url: object, where: str) -> str:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise invalid_type(f"{where}.url", "a string", url)
    # Only inline images: fetching a client-supplied URL would let clients make us call any host.
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise InvalidRequest(f"Invalid value for '{where}.url': only base64 'data:' URLs are supported.")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"Invalid value for '{where}.url': the image is not valid base64.") from None
    return data


def _tool_calls_from_openai(raw: object, where: str) -> list[ToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid_type(where, "an array", raw)
    calls = []
    for i, raw_call in enumerate(raw):
        call = require_object(raw_call, f"{where}[{i}]")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise invalid_type(f"{where}[{i}].id", "a string", call_id)
        calls.append(_tool_call_from_function(call.get("function"), f"{where}[{i}].function", call_id or None, i))
    return calls


def _tool_call_from_function(raw: object, where: str, call_id: str | None, index: int) -> ToolCall:
    function = require_object(raw, where)
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"Invalid value for '{where}.name': expected a non-empty string.")
    return ToolCall(
        name=name, arguments=arguments_from_openai(function.get("arguments"), where), id=call_id, index=index
    )


def arguments_from_openai(raw: object, where: str) -> dict[str, Any]:
    # Some clients send "" (or nothing) for a call without arguments, and a few send the object.
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise invalid_type(f"{where}.arguments", "a JSON string", raw)
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise InvalidRequest(f"Invalid value for '{where}.arguments': not valid JSON.") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"Invalid value for '{where}.arguments': expected a JSON object.")
    return parsed


def _options_from_openai(body: dict[str, Any]) -> dict[str, Any]:
    """Sampling fields under Ollama's option names (`ChatRequest.options`)."""
    options: dict[str, Any] = {}
    for key, (low, high) in _NUMBER_OPTIONS.items():
        value = optional_number(body, key)
        if value is not None:
            if not low <= value <= high:
                raise InvalidRequest(f"Invalid value for '{key}': must be between {low:g} and {high:g}.")
            options[key] = value
    # max_completion_tokens replaced max_tokens; Open WebUI and Continue send either.
    for key in ("max_tokens", "max_completion_tokens"):
        value = optional_int(body, key)
        if value is not None:
            if value < 0:
                raise InvalidRequest(f"Invalid value for '{key}': must be a non-negative integer.")
            options["num_predict"] = value
    seed = optional_int(body, "seed")
    if seed is not None:
        options["seed"] = seed
    n = optional_int(body, "n")
    if n is not None and n != 1:
        raise InvalidRequest("Invalid value for 'n': only n=1 is supported.")
    stop = _stop_from_openai(body.get("stop"))
    if stop is not None:
        options["stop"] = stop
    return options


def _stop_from_openai(stop: object) -> list[str] | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise invalid_type("stop", "a string or an array of strings", stop)


def _tools_from_openai(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid_type("tools", "an array", tools)
    for i, tool in enumerate(tools):
        require_object(tool, f"tools[{i}]")
    # Several upstreams reject an empty tool list; "no tools" is the same request.
    return tools or None


def _format_from_openai(body: dict[str, Any]) -> str | dict[str, Any] | None:
    response_format = optional_object(body, "response_format")
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid_type("response_format.json_schema", "an object", spec)
        schema = spec.get("schema")
        if schema is None:
            return "json"
        if not isinstance(schema, dict):
            raise invalid_type("response_format.json_schema.schema", "an object", schema)
        return schema
    raise InvalidRequest("Invalid value for 'response_format.type': must be 'text', 'json_object' or 'json_schema'.")


def think_from_openai(body: dict[str, Any]) -> bool | str | None:
    # Ollama reads `reasoning.effort` first, then `reasoning_effort`.
    reasoning = optional_object(body, "reasoning")
    field, effort = "reasoning_effort", body.get("reasoning_effort")
    if reasoning is not None and reasoning.get("effort") is not None:
        field, effort = "reasoning.effort", reasoning.get("effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in _EFFORT_TO_THINK:
        allowed = "', '".join(_EFFORT_TO_THINK)
        raise InvalidRequest(f"Invalid value for '{field}': must be one of '{allowed}'.")
    return _EFFORT_TO_THINK[effort]


def require_object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        if where == "body":
            raise InvalidRequest("The request body must be a JSON object.")
        raise invalid_type(where, "an object", value)
    return value


def optional_object(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None:
        return None
    return require_object(value, key)


def optional_bool(body: dict[str, Any], key: str, prefix: str = "") -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise invalid_type(prefix + key, "a boolean", value)
    return value


def optional_number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int subclass in Python, but `true` is not a temperature.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid_type(key, "a number", value)
    return value


def optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(key, "an integer", value)
    return value


def invalid_type(where: str, expected: str, got: object) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{where}': expected {expected}, but got {_json_type_name(got)} instead.")


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# ---------------------------------------------------------------------------------------------
# Server side: answers out
# ---------------------------------------------------------------------------------------------


def new_completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def openai_completion_from_events(
    events: Iterable[ChatEvent], *, model: str, completion_id: str, created: int
) -> dict[str, Any]:
    """A whole non-streamed `chat.completion` object from one answer's events."""
    answer = collect_answer(events)
    done, text = answer.done, answer.text
    calls = [_openai_tool_call(call, i) for i, call in enumerate(answer.calls)]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if answer.thinking:
        message["reasoning_content"] = answer.thinking
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {"index": 0, "message": message, "finish_reason": _chat_finish_reason(done, bool(calls)), "logprobs": None}
        ],
        "usage": _openai_usage(done.usage),
    }


def openai_sse_from_events(
    events: Iterable[ChatEvent], *, model: str, completion_id: str, created: int, include_usage: bool
) -> Iterator[str]:
    """Stream one answer as `chat.completion.chunk` SSE events, ending with `data: [DONE]`.

    The role chunk goes out before the first event is pulled, so the client gets its first byte
    while the expert is still thinking. A failure while pulling events becomes one error event
    and ends the stream (the status is already 200 by then).
    """

    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        return _sse_chunk("chat.completion.chunk", completion_id, created, model, choices, usage)

    def delta(fields: dict[str, Any]) -> str:
        return chunk([{"index": 0, "delta": fields, "logprobs": None, "finish_reason": None}])

    calls_sent = 0
    done = Done()
    iterator = iter(events)
    try:
        yield delta({"role": "assistant", "content": ""})
        for event in iterator:
            if isinstance(event, TextDelta) and event.text:
                yield delta({"content": event.text})
            elif isinstance(event, ThinkingDelta) and event.text:
                yield delta({"reasoning_content": event.text})
            elif isinstance(event, ToolCallDelta):
                yield delta({"tool_calls": [_openai_tool_call(event.call, calls_sent)]})
                calls_sent += 1
            elif isinstance(event, Done):
                done = event
                break
    except Exception as exc:
        yield _stream_error_event(exc)
        return
    finally:
        close_events(iterator)
    finish = _chat_finish_reason(done, calls_sent > 0)
    yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}])
    if include_usage:
        yield chunk([], done.usage)
    yield "data: [DONE]\n\n"


def openai_text_completion_from_events(
    events: Iterable[ChatEvent], *, model: str, completion_id: str, created: int
) -> dict[str, Any]:
    """A whole non-streamed legacy `text_completion` object."""
    texts: list[str] = []
    done = Done()
    for event in events:
        if isinstance(event, TextDelta):
            texts.append(event.text)
        elif isinstance(event, Done):
            done = event
            break
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"text": "".join(texts), "index": 0, "finish_reason": _text_finish_reason(done), "logprobs": None}],
        "usage": _openai_usage(done.usage),
    }


def openai_text_sse_from_events(
    events: Iterable[ChatEvent], *, model: str, completion_id: str, created: int, include_usage: bool
) -> Iterator[str]:
    """Stream a legacy completion; chunks are `text_completion` objects too, as OpenAI sends."""

    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        return _sse_chunk("text_completion", completion_id, created, model, choices, usage)

    done = Done()
    iterator = iter(events)
    try:
        for event in iterator:
            if isinstance(event, TextDelta) and event.text:
                yield chunk([{"text": event.text, "index": 0, "finish_reason": None, "logprobs": None}])
            elif isinstance(event, Done):
                done = event
                break
    except Exception as exc:
        yield _stream_error_event(exc)
        return
    finally:
        close_events(iterator)
    yield chunk([{"text": "", "index": 0, "finish_reason": _text_finish_reason(done), "logprobs": None}])
    if include_usage:
        yield chunk([], done.usage)
    yield "data: [DONE]\n\n"


def is_openai_path(path: str) -> bool:
    """Whether a request path is on the OpenAI API (its errors take OpenAI's shape)."""
    return path.startswith("/v1/") or path == "/v1"


def openai_error_body(err: RequestError) -> tuple[dict[str, Any], int]:
    """The OpenAI error object and HTTP status for a client-facing error."""
    return {"error": _error_object(err.message, err.status_code, err.code)}, err.status_code


def openai_model(card: ModelCard) -> dict[str, Any]:
    # Ollama reports the namespace as owner, which is "library" for unqualified names.
    return {"id": card.name, "object": "model", "created": int(card.modified_at), "owned_by": "library"}


def openai_model_list(cards: Iterable[ModelCard]) -> dict[str, Any]:
    return {"object": "list", "data": [openai_model(card) for card in cards]}


def _sse_chunk(
    kind: str, completion_id: str, created: int, model: str, choices: list[dict[str, Any]], usage: Usage | None
) -> str:
    # OpenAI stamps one id and one created value on every chunk of a stream.
    body: dict[str, Any] = {
        "id": completion_id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = _openai_usage(usage)
    return _sse(body)


def _error_object(message: str, status: int, code: str | None) -> dict[str, Any]:
    return {"message": message, "type": _ERROR_TYPES.get(status, "api_error"), "param": None, "code": code}


def _stream_error_event(exc: Exception) -> str:
    # A RequestError message is written for clients; anything else may hold paths or secrets.
    if isinstance(exc, RequestError):
        return _sse({"error": _error_object(exc.message, exc.status_code, exc.code)})
    _log.warning("stream ended by %s: %s", type(exc).__name__, sanitize(str(exc)))
    return _sse({"error": _error_object(STREAM_ERROR_MESSAGE, 500, None)})


def _openai_tool_call(call: ToolCall, index: int) -> dict[str, Any]:
    # The position in this answer, not the backend's index: clients assemble deltas by index.
    return {
        "index": index,
        "id": call.id or new_call_id(),
        "type": "function",
        "function": {"name": call.name, "arguments": compact_json(call.arguments)},
    }


def _chat_finish_reason(done: Done, called_tools: bool) -> str:
    if called_tools:
        return "tool_calls"
    return "length" if done.done_reason == "length" else "stop"


def _text_finish_reason(done: Done) -> str:
    return "length" if done.done_reason == "length" else "stop"


def _openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _sse(body: dict[str, Any]) -> str:
    return f"data: {compact_json(body)}\n\n"


# ---------------------------------------------------------------------------------------------
# Client side: requests to an OpenAI-compatible upstream
# ---------------------------------------------------------------------------------------------


def openai_chat_body_from_request(request: ChatRequest, model_name: str) -> dict[str, Any]:
    """The upstream `/v1/chat/completions` body. Always streamed, with a usage chunk."""
    body: dict[str, Any] = {
        "model": model_name,
        "messages": openai_messages(request.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(_openai_options(request.options))
    if request.tools:
        body["tools"] = request.tools
    if request.format == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(request.format, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": request.format}}
    effort = effort_from_think(request.think)
    if effort is not None:
        body["reasoning_effort"] = effort
    return body


def openai_completion_body_from_request(request: ChatRequest, model_name: str) -> dict[str, Any]:
    """The upstream legacy `/v1/completions` body for a `kind="completion"` request."""
    body: dict[str, Any] = {
        "model": model_name,
        "prompt": request.prompt or "",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.suffix:
        body["suffix"] = request.suffix
    body.update(_openai_options(request.options))
    return body


def _openai_options(options: dict[str, Any]) -> dict[str, Any]:
    """Ollama option names back to OpenAI fields; Ollama-only knobs (num_ctx, top_k...) are dropped."""
    out = {key: options[key] for key in (*_NUMBER_OPTIONS, "seed") if options.get(key) is not None}
    num_predict = options.get("num_predict")
    # Ollama's -1 (no limit) and -2 (fill the context) have no OpenAI spelling: send no limit.
    if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict >= 0:
        out["max_tokens"] = num_predict
    stop = options.get("stop")
    if isinstance(stop, str):
        out["stop"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop"] = list(stop)
    return out


def effort_from_think(think: bool | str | None) -> str | None:
    # Only explicit levels are sent: many upstreams reject unknown or "none" efforts, and a bare
    # True/False has no OpenAI spelling that every server accepts.
    if isinstance(think, str) and think in ("low", "medium", "high", "max"):
        return "high" if think == "max" else think
    return None
