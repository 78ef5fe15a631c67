"""Open WebUI's task and RAG prompts and Continue's autocomplete, through the real `ollama` and
`openai` clients, against real servers running the default router.

Two servers (gunicorn, loopback) with the embedding router and the packaged multilingual encoder,
and the experts of tests/fixtures/routing_cases.py on the loopback fake upstream, where model M
answers "Hello from M": `routed` reads task prompts like their chat and sends editor completions
to `completer` (router.autocomplete_expert); `pinned` sends task prompts to the fallback expert
(router.utility_expert). The prompts are Open WebUI's own templates and Continue's own request
bodies (tests/fixtures cites the files and commits).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import ollama
import openai
import pytest
import requests

from tests.fakes.fake_upstream import FakeUpstream
from tests.fixtures import continue_requests, open_webui
from tests.fixtures.routing_cases import CHATS, OTHER_DOCUMENTS, QUESTIONS, experts_file
from tests.hardening.conftest import write_project
from tests.live_server import LiveServer, start, stop, wait_until_serving

Messages = list[dict[str, Any]]
ROUTER_METHODS = {"embedding", "cascade", "keyword", "fallback"}


@pytest.fixture(scope="module")
def servers(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    experts = experts_file(fake_upstream.url)["experts"]
    configs = {
        "routed": {"router": {"model_path": "use-multilingual", "autocomplete_expert": "completer"}},
        "pinned": {"router": {"model_path": "use-multilingual", "utility_expert": "fallback"}},
    }
    # Both start at once: the encoder load is most of a start.
    started: dict[str, LiveServer] = {}
    try:
        for name, config in configs.items():
            project = tmp_path_factory.mktemp(name)
            started[name] = start(write_project(project, config, experts), project)
        for server in started.values():
            wait_until_serving(server)
        yield started
    finally:
        for server in started.values():
            stop(server)


def task_prompts(chat: Messages) -> dict[str, Messages]:
    prompts = {name: open_webui.task_request(open_webui.fill_history_task(template, chat))
               for name, template in open_webui.HISTORY_TASKS.items()}
    prompts["autocomplete"] = open_webui.task_request(open_webui.fill_autocomplete(chat, "and could you also"))
    prompts["tools"] = open_webui.tool_selection_request(chat, '[{"name": "web_search", "parameters": {}}]')
    return prompts


TASK_CASES = [pytest.param(expected, name, messages, id=f"{expected}-{name}")
              for expected, chat in CHATS.items() for name, messages in task_prompts(chat).items()]
RAG_CASES = (
    [pytest.param(expected, open_webui.rag_request(chat, OTHER_DOCUMENTS[expected]), id=f"{expected}-chat")
     for expected, chat in CHATS.items()]
    + [pytest.param(expected, open_webui.rag_request([{"role": "user", "content": q}], OTHER_DOCUMENTS[expected]),
                    id=f"{expected}-question") for expected, q in QUESTIONS.items()]
    + [pytest.param("coder", open_webui.rag_request(CHATS["coder"], OTHER_DOCUMENTS["coder"], in_system=True),
                    id="coder-system")]
)


def ollama_answer(url: str, messages: Messages) -> str:
    # Open WebUI sends its tasks to an Ollama connection as /api/chat with stream false.
    reply = ollama.Client(host=url).chat(model="lemoe", messages=messages, stream=False)
    return reply.message.content or ""


def openai_route(url: str, messages: Messages) -> tuple[str, str, str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="lemoe", messages=messages)  # type: ignore[arg-type]
    answer = raw.parse().choices[0].message.content or ""
    return raw.headers["X-LeMoE-Expert"], raw.headers["X-LeMoE-Route-Method"], answer


# ---------------------------------------------------------------- routed like their chat


@pytest.mark.parametrize("expected", sorted(CHATS))
def test_each_conversation_reaches_its_specialist(servers: dict[str, LiveServer], expected: str) -> None:
    # The baseline the task cases compare with: the chat itself, on both APIs.
    assert ollama_answer(servers["routed"].url, CHATS[expected]) == f"Hello from {expected}-model"
    assert openai_route(servers["routed"].url, CHATS[expected])[0] == expected


@pytest.mark.parametrize(("expected", "name", "messages"), TASK_CASES)
def test_task_prompt_reaches_its_chats_expert_on_both_apis(
    servers: dict[str, LiveServer], expected: str, name: str, messages: Messages
) -> None:
    url = servers["routed"].url
    assert ollama_answer(url, messages) == f"Hello from {expected}-model"
    expert, method, answer = openai_route(url, messages)
    # The header tells the truth: the router decided, on the turns the task quotes.
    assert (expert, answer) == (expected, f"Hello from {expected}-model")
    assert method in ROUTER_METHODS


@pytest.mark.parametrize(("expected", "messages"), RAG_CASES)
def test_rag_prompt_routes_on_the_question_not_the_documents(
    servers: dict[str, LiveServer], expected: str, messages: Messages
) -> None:
    for server in ("routed", "pinned"):  # a RAG prompt is the user's chat, not a task
        url = servers[server].url
        assert ollama_answer(url, messages) == f"Hello from {expected}-model"
        expert, method, _ = openai_route(url, messages)
        assert expert == expected and method in ROUTER_METHODS


def test_dry_run_route_reads_the_task_prompt_too(servers: dict[str, LiveServer]) -> None:
    title = task_prompts(CHATS["chef"])["title"]
    body = requests.post(f"{servers['routed'].url}/v1/route", json={"model": "lemoe", "messages": title},
                         timeout=30).json()
    assert body["expert"] == "chef" and body["method"] in ROUTER_METHODS


def test_the_log_line_names_the_input_and_shows_what_the_router_read(servers: dict[str, LiveServer]) -> None:
    server = servers["routed"]
    question = QUESTIONS["chef"]
    openai_route(server.url, open_webui.rag_request([{"role": "user", "content": question}], OTHER_DOCUMENTS["chef"]))
    openai_route(server.url, task_prompts(CHATS["writer"])["title"])
    lines = [line for line in server.log_text().splitlines() if " route expert=" in line]
    assert "input=rag" in lines[-2] and question in lines[-2] and "pandas" not in lines[-2]
    assert "input=task" in lines[-1] and "lighthouse keeper" in lines[-1] and "### Task" not in lines[-1]


# ---------------------------------------------------------------- router.utility_expert


@pytest.mark.parametrize("name", ["title", "tags", "follow_up", "query", "autocomplete", "tools"])
def test_utility_expert_answers_every_task_prompt(servers: dict[str, LiveServer], name: str) -> None:
    messages = task_prompts(CHATS["coder"])[name]
    url = servers["pinned"].url
    assert ollama_answer(url, messages) == "Hello from fallback-model"
    assert openai_route(url, messages)[:2] == ("fallback", "utility")
    # The chat it quotes still reaches its specialist.
    assert openai_route(url, CHATS["coder"])[:2] == ("coder", "embedding")


# ---------------------------------------------------------------- router.autocomplete_expert


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(continue_requests.fim_generate_body("import csv\n\ndef total(path):\n    ", "\n\nprint(total(p))"),
                     id="fim"),
        pytest.param(continue_requests.fim_generate_body("def poem():\n    return '", ""), id="fim-end-of-file"),
        pytest.param(continue_requests.raw_generate_body("<|fim_prefix|>def total(path):\n    <|fim_suffix|>\n"
                                                         "<|fim_middle|>"), id="raw"),
    ],
)
def test_continue_autocomplete_goes_to_the_autocomplete_expert(
    servers: dict[str, LiveServer], fake_upstream: FakeUpstream, body: dict[str, Any]
) -> None:
    # Exactly the body Continue's Ollama provider posts (streamed NDJSON).
    reply = requests.post(f"{servers['routed'].url}/api/generate", json=body, timeout=30)
    assert reply.status_code == 200
    assert (reply.headers["X-LeMoE-Expert"], reply.headers["X-LeMoE-Route-Method"]) == ("completer", "autocomplete")
    text = "".join(json.loads(line)["response"] for line in reply.text.splitlines())
    assert text == "Hello from completer-model"
    forwarded = fake_upstream.requests_to("/api/generate")[-1].json
    assert forwarded["model"] == "completer-model" and forwarded.get("suffix") == body.get("suffix")


def test_ollama_client_fim_goes_to_the_autocomplete_expert(servers: dict[str, LiveServer]) -> None:
    client = ollama.Client(host=servers["routed"].url)
    reply = client.generate(model="lemoe", prompt="def total(rows):\n    ", suffix="\n", stream=False)
    assert reply.response == "Hello from completer-model"
    # A plain generate is routed by its prompt, as before.
    plain = client.generate(model="lemoe", prompt="Write a short poem about the sea at night.", stream=False)
    assert plain.response == "Hello from writer-model"


def test_openai_completion_with_a_suffix_goes_to_the_autocomplete_expert(servers: dict[str, LiveServer]) -> None:
    client = openai.OpenAI(base_url=f"{servers['routed'].url}/v1", api_key="unused", max_retries=0)
    fim = client.completions.with_raw_response.create(model="lemoe", prompt="def total(rows):\n    ", suffix="\n")
    assert (fim.headers["X-LeMoE-Expert"], fim.headers["X-LeMoE-Route-Method"]) == ("completer", "autocomplete")
    plain = client.completions.with_raw_response.create(model="lemoe", prompt="Write a short poem about the sea.")
    assert plain.headers["X-LeMoE-Expert"] == "writer"
    assert plain.headers["X-LeMoE-Route-Method"] in ROUTER_METHODS


def test_without_an_autocomplete_expert_completions_are_routed_by_their_prompt(servers: dict[str, LiveServer]) -> None:
    body = continue_requests.fim_generate_body("# python function that reads a csv file\ndef ", "", model="lemoe")
    reply = requests.post(f"{servers['pinned'].url}/api/generate", json={**body, "stream": False}, timeout=30)
    assert reply.headers["X-LeMoE-Route-Method"] in ROUTER_METHODS
    assert reply.headers["X-LeMoE-Expert"] != "completer"
