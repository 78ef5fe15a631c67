"""LiteLLM as a client of LeMoE: `ollama_chat/...` and `openai/...` providers, with each kind of router."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

import litellm  # noqa: E402
import pytest  # noqa: E402

from tests.contract.conftest import RoutedServer  # noqa: E402

MESSAGES = [{"role": "user", "content": "debug this python code"}]


@pytest.fixture
def base_url(routed_server: RoutedServer) -> str:
    return routed_server.url


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_chat_provider(base_url: str, stream: bool) -> None:
    reply = litellm.completion(model="ollama_chat/lemoe", api_base=base_url, messages=MESSAGES, stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in reply) if stream else reply.choices[0].message.content
    assert text == "Hello from coder-model"


@pytest.mark.parametrize("stream", [False, True])
def test_openai_provider(base_url: str, stream: bool) -> None:
    reply = litellm.completion(model="openai/lemoe", api_base=base_url + "/v1", api_key="unused",
                               messages=MESSAGES, stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream \
        else reply.choices[0].message.content
    assert text == "Hello from coder-model"
