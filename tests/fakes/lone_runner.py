"""A runner around one backend under test, whose fallback expert must never be asked.

For tests of what reaches the client through the runner (rather than through the backend
alone): the fallback records being called, and the health record is returned to look at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modules.chat_types import ChatEvent, ChatRequest, Done
from modules.config_manager import AppConfig, ExpertConfig, LocalModelsConfig, RouterConfig, ServerConfig
from modules.expert_health import ExpertHealth
from modules.expert_runner import ExpertRunner

FALLBACK = ExpertConfig(id=0, label="fallback", type="ollama", url="http://127.0.0.1:1", model_name="m")


class RecordingFallback:
    def __init__(self) -> None:
        self.calls = 0

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatEvent]:
        self.calls += 1
        yield Done()

    def close(self) -> None:
        pass


def lone_runner(
    expert: ExpertConfig, backend: Any, local_models: LocalModelsConfig | None = None
) -> tuple[ExpertRunner, RecordingFallback, ExpertHealth]:
    """`expert` (any id but 0) answered by `backend`; one failure benches it."""
    config = AppConfig(server=ServerConfig(), router=RouterConfig(), local_models=local_models or LocalModelsConfig(),
                       experts=(FALLBACK, expert), project_dir=Path("."), config_path=Path("c.json"),
                       experts_path=Path("e.json"))
    fallback, health = RecordingFallback(), ExpertHealth(1, 60)
    return ExpertRunner(config, {FALLBACK.id: fallback, expert.id: backend}, health), fallback, health
