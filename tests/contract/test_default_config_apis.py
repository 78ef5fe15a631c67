"""The shipped configuration (config/config.json and experts.json, unchanged) answers the Anthropic
and Responses APIs with nothing else running: its Ollama experts point at a port where no Ollama
listens, so every answer comes from the packaged SmolLM2 GGUF fallback, streamed and not."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tests.live_server import REPO, live_server

ASK = "Say hello."


@pytest.fixture(scope="module")
def default_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    project = tmp_path_factory.mktemp("default-config")
    shutil.copytree(REPO / "config", project / "config")
    for folder in ("models", "data", "logs"):
        (project / folder).mkdir()
    config_path: Path = project / "config" / "config.json"
    with live_server(config_path, project) as server:
        yield server.url


def test_messages_answered_by_the_packaged_model(default_url: str) -> None:
    client = anthropic.Anthropic(base_url=default_url, api_key="unused", max_retries=0)
    raw = client.messages.with_raw_response.create(model="lemoe", max_tokens=16,
                                                   messages=[{"role": "user", "content": ASK}])
    assert raw.headers["X-LeMoE-Expert"] == "fallback"
    message = raw.parse()
    assert message.content[0].text.strip() and message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens > 0
    with client.messages.stream(model="fallback", max_tokens=16, messages=[{"role": "user", "content": ASK}]) as s:
        streamed = "".join(s.text_stream)
    assert streamed.strip()


def test_responses_answered_by_the_packaged_model(default_url: str) -> None:
    client = openai.OpenAI(base_url=default_url + "/v1", api_key="unused", max_retries=0)
    raw = client.responses.with_raw_response.create(model="lemoe", input=ASK, max_output_tokens=16)
    assert raw.headers["X-LeMoE-Expert"] == "fallback"
    response = raw.parse()
    assert response.output_text.strip() and response.status in ("completed", "incomplete")
    events = list(client.responses.create(model="fallback", input=ASK, max_output_tokens=16, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta").strip()
