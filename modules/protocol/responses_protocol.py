"""The OpenAI Responses API (`/v1/responses`), both directions, as pure functions.

Ollama serves it since v0.13.3 (Codex and the agent SDKs call it); like Ollama's
`openai/responses.go` this is a translation onto the native chat: a Responses body becomes a
`ChatRequest`, and the expert's `ChatEvent`s become a `response` object or its SSE events
(response.created ... response.completed). Errors are OpenAI's error object (openai_protocol).

Nothing here imports Flask or does IO; the view in http_views.py wires it to `answer_chat`.

Choices worth knowing:
- LeMoE stores nothing, so `previous_response_id`, `conversation` and `background` are refused
  (400) rather than ignored: ignoring them would answer without the context the client meant.
- Only `function` tools reach the expert; hosted tools (web_search, file_search, ...) have no
  one to run them here and are left out, as a model without them would answer.
- An answer that ran out of tokens is `status: "incomplete"` with
  `incomplete_details.reason: "max_output_tokens"`, as OpenAI reports it.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
    Usage,
    close_events,
    collect_answer,
    name_tool_results,
)
from modules.errors import InvalidRequest, RequestError
from modules.logger import get_logger, sanitize
from modules.protocol.openai_protocol import (
    arguments_from_openai,
    image_from_data_url,
    invalid_type,
    model_from_openai,
    new_call_id,
    optional_bool,
    optional_int,
    optional_number,
    optional_object,
    require_object,
    think_from_openai,
)

_log = get_logger("responses_protocol")

STREAM_ERROR_MESSAGE = "The model failed while generating the response; the answer is incomplete."
_MESSAGE_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_UNSTORED = ("previous_response_id", "conversation")


@dataclass(frozen=True)
class ResponsesRequest:
    """A parsed Responses body: the chat to run, and the settings a `response` object echoes."""

    chat: ChatRequest
    # Already in wire form: instructions, tools, temperature, top_p, max_output_tokens, text, reasoning.
    echo: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Requests in
# ---------------------------------------------------------------------------------------------


def responses_request_from_openai(body: object) -> ResponsesRequest:
    """Validate a parsed `/v1/responses` body and convert it. Raises `InvalidRequest`."""
    body = require_object(body, "body")
    for key in _UNSTORED:
        if body.get(key) is not None:
            raise InvalidRequest(f"'{key}' is not supported: LeMoE does not store responses; send the whole "
                                 "conversation in 'input'.")
    if optional_bool(body, "background"):
        raise InvalidRequest("'background' is not supported: LeMoE does not store responses.")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid_type("instructions", "a string", instructions)
    messages = [Message(role="system", content=instructions)] if instructions else []
    messages.extend(_messages_from_input(body.get("input")))
    name_tool_results(messages)
    tools, echoed_tools = _tools_from_responses(body.get("tools"))
    if body.get("tool_choice") == "none":
        tools = None
    text_format, format_value = _format_from_responses(optional_object(body, "text"))
    chat = ChatRequest(
        model=model_from_openai(body),
        messages=messages,
        stream=optional_bool(body, "stream") or False,
        options=_options_from_responses(body),
        tools=tools,
        format=format_value,
        think=think_from_openai(body),
    )
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
    echo = {
        "instructions": instructions or None,
        "tools": echoed_tools,
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "max_output_tokens": body.get("max_output_tokens"),
        "text": {"format": text_format},
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")} if reasoning else None,
    }
    return ResponsesRequest(chat=chat, echo=echo)


def body_has_images(body: object) -> bool:
    """Whether a parsed body has an `input_image` part (checked before validation, for its size limit)."""
    items = body.get("input") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return False
    return any(isinstance(part, dict) and part.get("type") == "input_image"
               for item in items if isinstance(item, dict)
               for key in ("content", "output") if isinstance(item.get(key), list)
               for part in item[key])


def _messages_from_input(raw: object) -> list[Message]:
    if raw is None:
        raise InvalidRequest("Missing required parameter: 'input'.")
    if isinstance(raw, str):
        return [Message(role="user", content=raw)]
    if not isinstance(raw, list):
        raise invalid_type("input", "a string or an array of input items", raw)
    if not raw:
        raise InvalidRequest("Invalid 'input': empty array. Expected at least one input item.")
    messages: list[Message] = []
    # Reasoning items belong to the assistant turn that follows them.
    pending_thinking: str | None = None
    for i, raw_item in enumerate(raw):
        where = f"input[{i}]"
        item = require_object(raw_item, where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            message = _message_item(item, where)
            if message.role == "assistant" and pending_thinking:
                message.thinking, pending_thinking = pending_thinking, None
            messages.append(message)
        elif kind == "function_call":
            call = _function_call_item(item, where)
            last = messages[-1] if messages else None
            # Parallel calls arrive as consecutive items; they are one assistant turn.
            if last is not None and last.role == "assistant":
                last.tool_calls.append(ToolCall(call.name, call.arguments, call.id, len(last.tool_calls)))
            else:
                messages.append(Message(role="assistant", tool_calls=[call], thinking=pending_thinking))
                pending_thinking = None
        elif kind == "function_call_output":
            messages.append(_function_output_item(item, where))
        elif kind == "reasoning":
            pending_thinking = _reasoning_text(item) or pending_thinking
        elif kind == "item_reference":
            raise InvalidRequest(f"Invalid '{where}': item references need stored responses, which LeMoE does not keep.")
        else:
            raise InvalidRequest(f"Invalid value for '{where}.type': unknown input item type {sanitize(str(kind), 40)!r}.")
    return messages


def _message_item(item: dict[str, Any], where: str) -> Message:
    role = item.get("role")
    if not isinstance(role, str) or role not in _MESSAGE_ROLES:
        raise InvalidRequest(f"Invalid value for '{where}.role': must be one of 'user', 'system', 'developer', "
                             "'assistant'.")
    text, images = _content_from_responses(item.get("content"), f"{where}.content")
    return Message(role=_MESSAGE_ROLES[role], content=text, images=images)  # type: ignore[arg-type]


def _content_from_responses(content: object, where: str) -> tuple[str, list[str]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise invalid_type(where, "a string or an array of content parts", content)
    texts: list[str] = []
    images: list[str] = []
    for i, raw in enumerate(content):
        part = require_object(raw, f"{where}[{i}]")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_type(f"{where}[{i}].text", "a string", text)
            texts.append(text)
        elif kind == "input_image":
            if part.get("image_url") is None:
                raise InvalidRequest(f"Invalid '{where}[{i}]': only images given as base64 'data:' URLs in "
                                     "'image_url' are supported.")
            images.append(image_from_data_url(part.get("image_url"), f"{where}[{i}].image_url"))
        elif kind == "input_file":
            raise InvalidRequest(f"Invalid '{where}[{i}]': file inputs are not supported.")
        elif not isinstance(kind, str):
            raise invalid_type(f"{where}[{i}].type", "a string", kind)
        # Refusals and audio have no place in the internal message: ignored on purpose.
    return "".join(texts), images


def _function_call_item(item: dict[str, Any], where: str) -> ToolCall:
    name, call_id = item.get("name"), item.get("call_id")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"Invalid value for '{where}.name': expected a non-empty string.")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"Invalid value for '{where}.call_id': expected a non-empty string.")
    return ToolCall(name=name, arguments=arguments_from_openai(item.get("arguments"), where), id=call_id)


def _function_output_item(item: dict[str, Any], where: str) -> Message:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"Invalid value for '{where}.call_id': expected a non-empty string.")
    text, images = _content_from_responses(item.get("output", ""), f"{where}.output")
    return Message(role="tool", content=text, images=images, tool_call_id=call_id)


def _reasoning_text(item: dict[str, Any]) -> str | None:
    parts = [*(item.get("content") or []), *(item.get("summary") or [])]
    texts = [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(texts) or None


def _tools_from_responses(raw: object) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """(tools for the expert in chat form, the tools as the response object echoes them)."""
    if raw is None:
        return None, []
    if not isinstance(raw, list):
        raise invalid_type("tools", "an array", raw)
    tools: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        tool = require_object(item, f"tools[{i}]")
        if tool.get("type") != "function":
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"Invalid value for 'tools[{i}].name': expected a non-empty string.")
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise invalid_type(f"tools[{i}].parameters", "an object", parameters)
        function: dict[str, Any] = {"name": name, "parameters": parameters}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    echoed = [{"type": "function", "name": t["function"]["name"], "description": t["function"].get("description"),
               "parameters": t["function"]["parameters"], "strict": None} for t in tools]
    return tools or None, echoed


def _format_from_responses(text: dict[str, Any] | None) -> tuple[dict[str, Any], str | dict[str, Any] | None]:
    """(text.format as echoed, ChatRequest.format)."""
    spec = optional_object(text, "format") if text is not None else None
    if spec is None or spec.get("type") == "text":
        return {"type": "text"}, None
    kind = spec.get("type")
    if kind == "json_object":
        return {"type": "json_object"}, "json"
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise invalid_type("text.format.schema", "an object", schema)
        return spec, schema
    raise InvalidRequest("Invalid value for 'text.format.type': must be 'text', 'json_object' or 'json_schema'.")


def _options_from_responses(body: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = optional_number(body, key)
        if value is not None:
            if not 0.0 <= value <= high:
                raise InvalidRequest(f"Invalid value for '{key}': must be between 0 and {high:g}.")
            options[key] = value
    max_output = optional_int(body, "max_output_tokens")
    if max_output is not None:
        if max_output < 1:
            raise InvalidRequest("Invalid value for 'max_output_tokens': must be a positive integer.")
        options["num_predict"] = max_output
    return options


# ---------------------------------------------------------------------------------------------
# Answers out
# ---------------------------------------------------------------------------------------------


def new_response_id() -> str:
    return f"resp_{secrets.token_hex(12)}"


def response_from_events(events: Iterable[ChatEvent], *, model: str, response_id: str, created: int,
                         echo: dict[str, Any]) -> dict[str, Any]:
    """A whole non-streamed `response` object from one answer's events."""
    answer = collect_answer(events)
    suffix = response_id.removeprefix("resp_")
    output = [_reasoning_item(f"rs_{suffix}", answer.thinking)] if answer.thinking else []
    # Without text the message is still there when nothing else is, so `output_text` is "".
    if answer.text or not answer.calls:
        output.append(_message_item_out(f"msg_{suffix}", answer.text, "completed"))
    output += [_function_call(call, f"fc_{suffix}_{i}", "completed") for i, call in enumerate(answer.calls)]
    return _response_object(response_id, model, created, echo, _status(answer.done), output, answer.done.usage)


def responses_sse_from_events(events: Iterable[ChatEvent], *, model: str, response_id: str, created: int,
                              echo: dict[str, Any]) -> Iterator[str]:
    """Stream one answer as the Responses API's SSE events.

    response.created and response.in_progress go out before the first event is pulled. Reasoning,
    the message and each function call are output items of their own, added, filled and done in
    order. A failure while pulling events becomes an `error` event and `response.failed`.
    """
    writer = _StreamWriter(response_id, model, created, echo)
    yield writer.event("response.created", {"response": writer.snapshot("in_progress")})
    yield writer.event("response.in_progress", {"response": writer.snapshot("in_progress")})
    done = Done()
    iterator = iter(events)
    try:
        for event in iterator:
            if isinstance(event, Done):
                done = event
                break
            yield from writer.add(event)
    except Exception as exc:
        yield from writer.fail(exc)
        return
    finally:
        close_events(iterator)
    yield from writer.close_open()
    status = _status(done)
    final = "response.completed" if status == "completed" else "response.incomplete"
    yield writer.event(final, {"response": writer.snapshot(status, done.usage)})


class _StreamWriter:
    """One stream's state: sequence numbers, the open output item, and the output so far."""

    def __init__(self, response_id: str, model: str, created: int, echo: dict[str, Any]) -> None:
        self.response_id, self.model, self.created, self.echo = response_id, model, created, echo
        self.suffix = response_id.removeprefix("resp_")
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open_kind: str | None = None
        self.open_text: list[str] = []

    def event(self, kind: str, data: dict[str, Any]) -> str:
        payload = {"type": kind, **data, "sequence_number": self.sequence}
        self.sequence += 1
        return f"event: {kind}\ndata: {_json(payload)}\n\n"

    def snapshot(self, status: str, usage: Usage | None = None) -> dict[str, Any]:
        return _response_object(self.response_id, self.model, self.created, self.echo, status, list(self.output),
                                usage)

    def add(self, event: ChatEvent) -> Iterator[str]:
        if isinstance(event, TextDelta) and event.text:
            yield from self._open("message")
            self.open_text.append(event.text)
            yield self.event("response.output_text.delta", {**self._at(), "content_index": 0, "delta": event.text,
                                                            "logprobs": []})
        elif isinstance(event, ThinkingDelta) and event.text:
            yield from self._open("reasoning")
            self.open_text.append(event.text)
            yield self.event("response.reasoning_summary_text.delta", {**self._at(), "summary_index": 0,
                                                                       "delta": event.text})
        elif isinstance(event, ToolCallDelta):
            yield from self.close_open()
            item_id = f"fc_{self.suffix}_{len(self.output)}"
            item = _function_call(event.call, item_id, "completed")
            index = len(self.output)
            yield self.event("response.output_item.added", {
                "output_index": index, "item": {**item, "status": "in_progress", "arguments": ""}})
            yield self.event("response.function_call_arguments.delta", {
                "item_id": item_id, "output_index": index, "delta": item["arguments"]})
            yield self.event("response.function_call_arguments.done", {
                "item_id": item_id, "output_index": index, "name": item["name"], "arguments": item["arguments"]})
            yield self.event("response.output_item.done", {"output_index": index, "item": item})
            self.output.append(item)

    def _at(self) -> dict[str, Any]:
        return {"item_id": self._open_id(), "output_index": len(self.output)}

    def _open_id(self) -> str:
        return f"{'rs' if self.open_kind == 'reasoning' else 'msg'}_{self.suffix}_{len(self.output)}"

    def _open(self, kind: str) -> Iterator[str]:
        if self.open_kind == kind:
            return
        yield from self.close_open()
        self.open_kind = kind
        item = (_reasoning_item(self._open_id(), None) if kind == "reasoning"
                else _message_item_out(self._open_id(), None, "in_progress"))
        yield self.event("response.output_item.added", {"output_index": len(self.output), "item": item})
        if kind == "message":
            yield self.event("response.content_part.added", {**self._at(), "content_index": 0,
                                                             "part": _output_text("")})

    def close_open(self) -> Iterator[str]:
        if self.open_kind is None:
            return
        text, at = "".join(self.open_text), self._at()
        if self.open_kind == "message":
            item = _message_item_out(at["item_id"], text, "completed")
            yield self.event("response.output_text.done", {**at, "content_index": 0, "text": text, "logprobs": []})
            yield self.event("response.content_part.done", {**at, "content_index": 0, "part": _output_text(text)})
        else:
            item = _reasoning_item(at["item_id"], text)
            yield self.event("response.reasoning_summary_text.done", {**at, "summary_index": 0, "text": text})
        yield self.event("response.output_item.done", {"output_index": at["output_index"], "item": item})
        self.output.append(item)
        self.open_kind, self.open_text = None, []

    def fail(self, exc: Exception) -> Iterator[str]:
        # A RequestError message is written for clients; anything else may hold paths or secrets.
        if isinstance(exc, RequestError):
            message = exc.message
        else:
            _log.warning("stream ended by %s: %s", type(exc).__name__, sanitize(str(exc)))
            message = STREAM_ERROR_MESSAGE
        yield self.event("error", {"code": "server_error", "message": message, "param": None})
        failed = self.snapshot("failed")
        failed["error"] = {"code": "server_error", "message": message}
        yield self.event("response.failed", {"response": failed})


def _response_object(response_id: str, model: str, created: int, echo: dict[str, Any], status: str,
                     output: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "tool_choice": "auto",
        "truncation": "disabled",
        "store": False,
        "background": False,
        "service_tier": "default",
        "metadata": {},
        "tools": [],
        **echo,
        "usage": None if usage is None else {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        },
    }


def _status(done: Done) -> str:
    return "incomplete" if done.done_reason == "length" else "completed"


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item_out(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str | None) -> dict[str, Any]:
    summary = [] if text is None else [{"type": "summary_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": summary}


def _function_call(call: ToolCall, item_id: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.id or new_call_id(), "name": call.name,
            "arguments": _json(call.arguments), "status": status}


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
