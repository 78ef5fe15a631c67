"""Reasoning written inline as `<think>...</think>` at the start of an answer, split out.

Local reasoning models (Qwen3, DeepSeek-R1 distills, QwQ as GGUF files) write their reasoning
into the text itself, and llama-cpp-python hands it on as text. Ollama parses it into
`message.thinking`; this does the same for LeMoE's local backend, so clients get reasoning in
`thinking` / `reasoning_content` / a thinking block whichever API they speak.

Only an answer that opens with the tag (after whitespace) is split: a `<think>` later in an
answer is the model writing about the tag, not reasoning. Tags cut across stream chunks are
held back until it is clear what they are.
"""

from __future__ import annotations

from modules.chat_types import TextDelta, ThinkingDelta

OPEN = "<think>"
CLOSE = "</think>"


class ThinkTagSplitter:
    """Feed text pieces in order; get back the text and reasoning events they amount to."""

    def __init__(self) -> None:
        # "start": not yet known whether the answer opens with <think>; "thinking"; "text".
        self._state = "start"
        self._held = ""
        # Right after a tag, the line breaks models put around it belong to neither part.
        self._trim = False

    def feed(self, piece: str) -> list[TextDelta | ThinkingDelta]:
        self._held += piece
        events: list[TextDelta | ThinkingDelta] = []
        if self._state == "start":
            stripped = self._held.lstrip()
            if stripped.startswith(OPEN):
                self._state, self._held, self._trim = "thinking", stripped[len(OPEN):], True
            elif OPEN.startswith(stripped):
                return events  # still could be the tag
            else:
                self._state = "text"
        self._trim_breaks()
        if self._state == "thinking":
            end = self._held.find(CLOSE)
            if end < 0:
                # Keep back what might be the start of the closing tag.
                keep = _partial_suffix(self._held, CLOSE)
                thought, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
                if thought:
                    events.append(ThinkingDelta(thought))
                return events
            thought, self._held = self._held[:end], self._held[end + len(CLOSE):]
            # Models end their reasoning with a line break before the tag.
            if thought.rstrip("\n"):
                events.append(ThinkingDelta(thought.rstrip("\n")))
            self._state, self._trim = "text", True
            self._trim_breaks()
        if self._state == "text" and self._held:
            events.append(TextDelta(self._held))
            self._held = ""
        return events

    def _trim_breaks(self) -> None:
        if self._trim and self._held:
            self._held = self._held.lstrip("\n")
            self._trim = not self._held

    def flush(self) -> list[TextDelta | ThinkingDelta]:
        """What is still held back when the answer ends."""
        held, self._held = self._held, ""
        if not held:
            return []
        return [ThinkingDelta(held)] if self._state == "thinking" else [TextDelta(held)]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
