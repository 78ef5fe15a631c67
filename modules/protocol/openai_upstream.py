"""The OpenAI upstream codec: the chat messages LeMoE sends an OpenAI-shaped model, and the
stream it reads back as `ChatEvent`s.

Three kinds of expert speak OpenAI's chat format to us: OpenAI-compatible servers over HTTP
(`http_backends.OpenAIBackend`, as SSE), llama-cpp-python (`ai_engine`, chunk dicts) and LiteLLM
(`litellm_backend`, chunk objects dumped to dicts); the ONNX backend renders the same message
dicts with its chat template. All of them use this one module:

- `openai_messages` writes internal `Message`s as OpenAI chat message dicts. What a server and a
  chat template want differently is said by its keyword parameters, nowhere else.
- `OpenAIStreamReader` turns stream chunks into `ChatEvent`s; `events_from_openai_sse` frames an
  SSE byte stream into chunks for it.

One strictness for every source. Whatever cannot be read as OpenAI's format raises
`ExpertStreamBroken`: an error event, a chunk that is not an object, a tool-call fragment that is
not an object or has no integer index, a call without a name, arguments that are not a JSON
object, a stream that ends without a finish reason. The runner makes that a silent fallback
before the first token and the protocol's error end after it. What OpenAI allows to be absent is
read leniently: null content, no usage, no choices (a usage-only chunk), an unknown finish reason
(read as "stop"), arguments sent as an object instead of a JSON string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    DoneReason,
    Message,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from modules.errors import ExpertStreamBroken
from modules.logger import sanitize

_UPSTREAM_FINISH: dict[str, DoneReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "stop",
}

# How tool-call arguments are written: "compact" JSON text for a server (OpenAI's own spelling),
# "spaced" JSON text as Python's json.dumps writes it (what chat templates were trained on), or
# the "object" itself for a template that serialises it with `tojson`.
ArgumentsAs = Literal["compact", "spaced", "object"]


# ---------------------------------------------------------------------------------------------
# Messages out
# ---------------------------------------------------------------------------------------------


def openai_messages(
    messages: Sequence[Message],
    *,
    string_content: bool = False,
    tool_names: bool = False,
    arguments: ArgumentsAs = "compact",
) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat message dicts.

    `string_content`: content is always a string, for chat templates that index
    `message['content']` directly: images are left out and a turn of tool calls alone has "".
    Otherwise images become `image_url` content parts and such a turn has null content, as
    OpenAI writes it. `tool_names`: tool results carry the tool's `name` too (templates and some
    LiteLLM providers use it; strict OpenAI servers take only `tool_call_id`). `arguments`: see
    `ArgumentsAs`.

    Every call gets an id and every tool result the id of the call it answers: Ollama clients
    answer by tool name only, OpenAI servers need the id back. Made-up ids are deterministic,
    so the same request gives the same body. Reasoning of earlier turns (`thinking`) is not
    sent back: templates drop it and some servers (DeepSeek) refuse it.
    """
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []
    for m_index, msg in enumerate(messages):
        entry: dict[str, Any]
        if msg.role == "assistant":
            calls = []
            for c_index, call in enumerate(msg.tool_calls):
                call_id = call.id or f"call_{m_index}_{c_index}"
                open_calls.append((call_id, call.name))
                calls.append({
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": _arguments(call.arguments, arguments)},
                })
            content: str | None = msg.content if msg.content or not calls or string_content else None
            entry = {"role": "assistant", "content": content}
            if calls:
                entry["tool_calls"] = calls
        elif msg.role == "tool":
            entry = {"role": "tool", "tool_call_id": _answered_call_id(msg, open_calls, m_index), "content": msg.content}
            if tool_names and msg.tool_name:
                entry["name"] = msg.tool_name
        else:
            entry = {"role": msg.role, "content": msg.content if string_content else _content(msg)}
        out.append(entry)
    return out


def openai_messages_from_request(
    request: ChatRequest, *, string_content: bool = False, tool_names: bool = False, arguments: ArgumentsAs = "compact"
) -> list[dict[str, Any]]:
    """`openai_messages` of a chat request; a completion's prompt becomes one user turn."""
    if request.kind == "completion":
        return [{"role": "user", "content": request.prompt or ""}]
    return openai_messages(request.messages, string_content=string_content, tool_names=tool_names, arguments=arguments)


def compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _arguments(value: dict[str, Any], style: ArgumentsAs) -> str | dict[str, Any]:
    if style == "object":
        return value
    return compact_json(value) if style == "compact" else json.dumps(value)


def _answered_call_id(msg: Message, open_calls: list[tuple[str, str]], m_index: int) -> str:
    """The id of the call a tool result answers: its own, else the oldest open call by name."""
    candidates = [pos for pos, (call_id, _) in enumerate(open_calls) if call_id == msg.tool_call_id]
    if not msg.tool_call_id:
        candidates = [pos for pos, (_, name) in enumerate(open_calls) if name == msg.tool_name]
        candidates = candidates or list(range(len(open_calls)))
    if candidates:
        call_id, _ = open_calls.pop(candidates[0])
        return call_id
    return msg.tool_call_id or f"call_{m_index}_result"


def _content(msg: Message) -> str | list[dict[str, Any]]:
    if not msg.images:
        return msg.content
    # No empty text part: some providers (Anthropic through LiteLLM) refuse one.
    parts: list[dict[str, Any]] = [{"type": "text", "text": msg.content}] if msg.content else []
    for image in msg.images:
        parts.append({"type": "image_url", "image_url": {"url": f"data:{_image_mime(image)};base64,{image}"}})
    return parts


def _image_mime(b64: str) -> str:
    # The base64 of each format's magic bytes; PNG when unknown (servers mostly sniff anyway).
    for prefix, mime in (("/9j/", "image/jpeg"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp")):
        if b64.startswith(prefix):
            return mime
    return "image/png"


# ---------------------------------------------------------------------------------------------
# Stream chunks in
# ---------------------------------------------------------------------------------------------


class OpenAIStreamReader:
    """Reads one answer's chat or text completion chunks (plain dicts) into `ChatEvent`s.

    `feed` each chunk in order, then call `end` once: it gives the tool calls not yet given and
    the one final `Done`. Tool-call fragments (the name first, then the JSON arguments a few
    characters at a time, keyed by `index`) are joined and given whole when the finish reason
    arrives. Usage is taken from the last chunk that has it.
    """

    def __init__(self) -> None:
        self.finish: DoneReason | None = None
        self.usage = Usage()
        self.called_tools = False
        # index -> ([id, name], argument fragments)
        self._calls: dict[int, tuple[list[str | None], list[str]]] = {}

    def feed(self, chunk: object) -> list[ChatEvent]:
        if not isinstance(chunk, dict):
            raise ExpertStreamBroken("upstream sent a JSON value that is not an object")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise ExpertStreamBroken(f"upstream error event: {sanitize(str(message), 200)}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(
                prompt_tokens=_count(usage.get("prompt_tokens")),
                completion_tokens=_count(usage.get("completion_tokens")),
            )
        choices = chunk.get("choices")
        # Only the first choice is ours; we always ask for n=1.
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        if choice is None:
            return []
        events: list[ChatEvent] = []
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        thinking = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(thinking, str) and thinking:
            events.append(ThinkingDelta(thinking))
        for text in (delta.get("content"), choice.get("text")):
            if isinstance(text, str) and text:
                events.append(TextDelta(text))
        self._collect_calls(delta.get("tool_calls"))
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self.finish = _UPSTREAM_FINISH.get(finish, "stop")
            events.extend(self._flush_calls())
        return events

    def end(self) -> list[ChatEvent]:
        """The calls not given yet and the final `Done`; raises if the stream never finished."""
        events = self._flush_calls()
        if self.finish is None:
            raise ExpertStreamBroken("upstream stream ended without a finish_reason")
        reason: DoneReason = "tool_calls" if self.called_tools else self.finish
        return [*events, Done(done_reason=reason, usage=self.usage)]

    def _collect_calls(self, fragments: object) -> None:
        if not isinstance(fragments, list):
            return
        for position, fragment in enumerate(fragments):
            if not isinstance(fragment, dict):
                raise ExpertStreamBroken("upstream sent a tool-call fragment that is not an object")
            index = fragment.get("index", position)
            if not isinstance(index, int):
                raise ExpertStreamBroken("upstream sent a tool-call fragment without an integer index")
            head, parts = self._calls.setdefault(index, ([None, None], []))
            function = fragment.get("function")
            function = function if isinstance(function, dict) else {}
            # The first non-empty id and name win: later fragments repeat or blank them (some
            # llama-cpp handlers repeat the name in every fragment).
            if isinstance(fragment.get("id"), str) and fragment["id"] and head[0] is None:
                head[0] = fragment["id"]
            if isinstance(function.get("name"), str) and function["name"] and head[1] is None:
                head[1] = function["name"]
            if isinstance(function.get("arguments"), str):
                parts.append(function["arguments"])
            elif isinstance(function.get("arguments"), dict):
                parts.append(json.dumps(function["arguments"]))

    def _flush_calls(self) -> list[ChatEvent]:
        events: list[ChatEvent] = []
        for index in sorted(self._calls):
            (call_id, name), parts = self._calls[index]
            if not name:
                raise ExpertStreamBroken(f"upstream tool call {index} has no function name")
            events.append(ToolCallDelta(
                ToolCall(name=name, arguments=_upstream_arguments("".join(parts), index), id=call_id, index=index)
            ))
            self.called_tools = True
        self._calls.clear()
        return events


def events_from_openai_sse(lines: Iterable[bytes | str]) -> Iterator[ChatEvent]:
    """Parse an upstream SSE stream (lines without their line ends) into `ChatEvent`s, through
    `OpenAIStreamReader`: exactly one `Done` comes last, and `ExpertStreamBroken` is raised where
    the reader raises it, or on data that is not JSON. Nothing after `[DONE]` is read."""
    reader = OpenAIStreamReader()
    for data in _sse_data(lines):
        if data.strip() == "[DONE]":
            break
        yield from reader.feed(_parse_json(data))
    yield from reader.end()


def _sse_data(lines: Iterable[bytes | str]) -> Iterator[str]:
    """The data of each SSE event: `data:` lines joined by newlines, dispatched on a blank line."""
    pending: list[str] = []
    for raw in lines:
        # A stray invalid byte should cost one character, not the whole answer.
        line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            if pending:
                yield "\n".join(pending)
                pending = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            pending.append(value[1:] if value.startswith(" ") else value)
    if pending:
        yield "\n".join(pending)


def _parse_json(data: str) -> object:
    try:
        return json.loads(data)
    except ValueError:
        raise ExpertStreamBroken(f"upstream sent invalid JSON: {sanitize(data, 120)}") from None


def _upstream_arguments(text: str, index: int) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except ValueError:
        raise ExpertStreamBroken(f"upstream tool call {index} has arguments that are not JSON") from None
    if not isinstance(parsed, dict):
        raise ExpertStreamBroken(f"upstream tool call {index} has arguments that are not a JSON object")
    return parsed


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
