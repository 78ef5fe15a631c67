"""Reading OpenAI-shaped stream chunks, as llama-cpp-python and LiteLLM yield them.

A chunk (a plain dict) carries a piece of text, fragments of tool calls, or a finish reason.
Tool calls arrive in fragments (the name first, then the JSON arguments a few characters at a
time), keyed by `index`; `ToolCallAssembler` joins them and `tool_call_from_parts` checks the
result, so backends yield only whole `ToolCall`s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modules.chat_types import ToolCall
from modules.errors import ExpertStreamBroken


def parts_from_chunk(chunk: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """(text, tool call fragments, finish reason) of a chat or text completion stream chunk."""
    choices = chunk.get("choices") or [{}]
    choice = choices[0]
    finish = choice.get("finish_reason")
    if "delta" not in choice:
        return choice.get("text") or "", [], finish
    delta = choice.get("delta") or {}
    return delta.get("content") or "", list(delta.get("tool_calls") or []), finish


class ToolCallAssembler:
    """Joins streamed OpenAI-style tool call fragments into whole calls, by index."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, fragments: list[dict[str, Any]]) -> None:
        for position, fragment in enumerate(fragments):
            index = fragment.get("index", position)
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            function = fragment.get("function") or {}
            call["id"] = call["id"] or fragment.get("id") or ""
            # Some llama-cpp handlers repeat the name in every fragment; keep the first.
            call["name"] = call["name"] or function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def calls(self) -> list[ToolCall]:
        return [tool_call_from_parts(i, c) for i, c in sorted(self._calls.items())]


def tool_call_from_parts(index: int, parts: Mapping[str, str]) -> ToolCall:
    try:
        arguments = json.loads(parts["arguments"]) if parts["arguments"].strip() else {}
    except json.JSONDecodeError as exc:
        raise ExpertStreamBroken(f"tool call {parts['name']!r} has invalid JSON arguments") from exc
    if not parts["name"] or not isinstance(arguments, dict):
        raise ExpertStreamBroken("tool call without a name or with non-object arguments")
    return ToolCall(name=parts["name"], arguments=arguments, id=parts["id"] or None, index=index)
