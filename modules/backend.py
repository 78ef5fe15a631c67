"""The one interface every expert backend implements (like an httpx transport).

A backend takes a `ChatRequest` and yields `ChatEvent`s; it never sees Flask or a client's
wire format. It translates its own library's exceptions into `ExpertError` subclasses, so the
runner can fall back without knowing which library failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from modules.chat_types import ChatEvent, ChatRequest


class Backend(Protocol):
    def stream_chat(self, request: ChatRequest) -> Iterator[ChatEvent]:
        """Yield the answer as events, ending with exactly one `Done`.

        Raises `ExpertError` (before or between events) when the expert fails. Closing the
        iterator early (client gone) must stop the work and release resources.
        """
        ...

    def close(self) -> None:
        """Release connections or models held by this backend."""
        ...
