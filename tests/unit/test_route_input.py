"""What the router reads from client task prompts, RAG prompts and editor completions.

The requests are built from Open WebUI's own templates (tests/fixtures/open_webui.py, which
cites the files and commits) and Continue's request shape (tests/fixtures/continue_requests.py),
and parsed by the real protocol adapters, as the views do.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from modules.chat_types import ChatRequest, RouteDecision
from modules.protocol.ollama_protocol import chat_request_from_ollama, generate_request_from_ollama
from modules.protocol.openai_protocol import chat_request_from_openai, completion_request_from_openai
from modules.route_input import read_route_input, route_read_input, unwrap_retrieved_context
from tests.fixtures import continue_requests, open_webui

PYTHON_CHAT: list[dict[str, Any]] = [
    {"role": "user", "content": "How do I read a CSV file in Python and add up one column?"},
    {"role": "assistant", "content": "Use csv.DictReader:\n\n```python\nimport csv\n\nwith open('sales.csv') as f:\n"
                                     "    total = sum(float(row['price']) for row in csv.DictReader(f))\n```"},
    {"role": "user", "content": "My script raises KeyError: 'price' in that function. How do I fix this bug?"},
]
PYTHON_TURNS = tuple(m["content"] for m in PYTHON_CHAT if m["role"] == "user")
COOKING_DOCS = [
    ("grandma_recipes.pdf", ("Preheat the oven to 180 C. Cream the butter and sugar, add three eggs, fold "
                             "in the flour and bake the sponge cake for 35 minutes.")),
    ("soups.pdf", ("For a winter vegetable soup, roast the carrots and onions, then simmer them in "
                   "stock with thyme for 40 minutes and blend.")),
]


def ollama_chat(messages: list[dict[str, Any]]) -> ChatRequest:
    # Open WebUI sends tasks to an Ollama connection as /api/chat, stream false.
    return chat_request_from_ollama({"model": "lemoe", "messages": messages, "stream": False})


def openai_chat(messages: list[dict[str, Any]]) -> ChatRequest:
    return chat_request_from_openai({"model": "lemoe", "messages": messages})


PARSERS = [pytest.param(ollama_chat, id="ollama"), pytest.param(openai_chat, id="openai")]


# ---------------------------------------------------------------- task prompts


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("task", sorted(open_webui.HISTORY_TASKS))
def test_history_tasks_are_read_as_the_user_turns_they_quote(parse: Any, task: str) -> None:
    content = open_webui.fill_history_task(open_webui.HISTORY_TASKS[task], PYTHON_CHAT)
    heard = read_route_input(parse(open_webui.task_request(content)))
    assert heard.kind == "task"
    # The title template quotes the last two messages, the others the last six.
    expected = PYTHON_TURNS[-1:] if task == "title" else PYTHON_TURNS
    assert heard.texts == expected
    assert heard.expert_label == ""


def test_autocomplete_task_is_read_as_the_chat_it_continues() -> None:
    content = open_webui.fill_autocomplete(PYTHON_CHAT, "and how do I skip rows where the")
    heard = read_route_input(ollama_chat(open_webui.task_request(content)))
    assert (heard.kind, heard.texts) == ("task", PYTHON_TURNS)


def test_autocomplete_task_in_an_empty_chat_is_read_as_the_text_being_typed() -> None:
    content = open_webui.fill_autocomplete([], "how do I reverse a list in pyth", kind="Search Query")
    heard = read_route_input(ollama_chat(open_webui.task_request(content)))
    # The template's own examples (<text>The sun was setting...</text>) come before the history
    # and must not be taken for the user's text.
    assert (heard.kind, heard.texts) == ("task", ("how do I reverse a list in pyth",))


def test_a_user_turn_with_images_only_is_left_out() -> None:
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
            *PYTHON_CHAT]
    # Open WebUI renders a turn without text as "USER: None".
    content = open_webui.fill_history_task(open_webui.TAGS_GENERATION, chat)
    assert "USER: None" in content
    assert read_route_input(ollama_chat(open_webui.task_request(content))).texts == PYTHON_TURNS


def test_emoji_task_is_read_as_the_sentence_it_quotes() -> None:
    content = open_webui.fill_emoji("Here is the fixed function, it now skips the missing key.")
    heard = read_route_input(openai_chat(open_webui.task_request(content)))
    assert (heard.kind, heard.texts) == ("task", ("Here is the fixed function, it now skips the missing key.",))


def test_mixture_of_agents_task_is_read_as_the_users_query() -> None:
    content = open_webui.fill_moa(PYTHON_TURNS[-1], ["Use row.get('price').", "Check the CSV header."])
    heard = read_route_input(openai_chat(open_webui.task_request(content)))
    assert (heard.kind, heard.texts) == ("task", (PYTHON_TURNS[-1],))


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
def test_tool_selection_is_read_as_the_quoted_turns_and_the_query(legacy: bool) -> None:
    messages = open_webui.tool_selection_request(PYTHON_CHAT, '[{"name": "run_python"}]', legacy=legacy)
    heard = read_route_input(openai_chat(messages))
    assert (heard.kind, heard.texts) == ("task", PYTHON_TURNS)


def test_tool_selection_of_a_first_message_is_just_the_query() -> None:
    messages = open_webui.tool_selection_request(PYTHON_CHAT[:1], "[]")
    assert messages[1]["content"] == f"Query: {PYTHON_TURNS[0]}"
    assert read_route_input(ollama_chat(messages)).texts == PYTHON_TURNS[:1]


def test_openai_content_parts_are_read_like_a_string() -> None:
    content = open_webui.fill_history_task(open_webui.TAGS_GENERATION, PYTHON_CHAT)
    parts = [{"role": "user", "content": [{"type": "text", "text": content}]}]
    assert read_route_input(openai_chat(parts)).texts == PYTHON_TURNS


def test_a_query_line_without_the_tools_system_message_is_an_ordinary_chat() -> None:
    heard = read_route_input(openai_chat([{"role": "user", "content": "Query: why is my soup too salty?"}]))
    assert (heard.kind, heard.texts) == ("chat", ("Query: why is my soup too salty?",))


# ---------------------------------------------------------------- edited templates


def test_an_edited_template_without_the_task_header_is_still_read_by_its_history() -> None:
    edited = "Write a five word title for this conversation.\n<chat_history>\n{{MESSAGES:END:4}}\n</chat_history>"
    heard = read_route_input(ollama_chat(open_webui.task_request(open_webui.fill_history_task(edited, PYTHON_CHAT))))
    assert (heard.kind, heard.texts) == ("task", PYTHON_TURNS)


def test_an_edited_template_without_history_tags_is_read_by_its_role_lines() -> None:
    edited = "### Task:\nSummarise the chat in one line.\n### Chat:\n{{MESSAGES:END:6}}\n### Output:\nOne line."
    heard = read_route_input(ollama_chat(open_webui.task_request(open_webui.fill_history_task(edited, PYTHON_CHAT))))
    # Each quoted turn stops where the template resumes ("### Output:").
    assert (heard.kind, heard.texts) == ("task", PYTHON_TURNS)


def test_a_task_quoting_no_conversation_is_routed_as_it_came() -> None:
    edited = "### Task:\nCreate a concise title for the prompt: {{prompt:middletruncate:200}}"
    content = open_webui.fill_history_task(edited, PYTHON_CHAT)
    heard = read_route_input(ollama_chat(open_webui.task_request(content)), utility_expert="fallback")
    # A user's own message may start with "### Task:" as well: without a quoted conversation
    # it is not taken away from the router, not even by utility_expert.
    assert (heard.kind, heard.texts, heard.expert_label) == ("task", (content,), "")


# ---------------------------------------------------------------- retrieved context


@pytest.mark.parametrize("parse", PARSERS)
def test_rag_prompt_is_read_as_the_question_not_the_documents(parse: Any) -> None:
    messages = open_webui.rag_request(PYTHON_CHAT, COOKING_DOCS)
    assert messages[-1]["content"].startswith("### Task:\nRespond to the user query")
    assert messages[-1]["content"].endswith("</context>\n\n" + PYTHON_TURNS[-1])
    heard = read_route_input(parse(messages))
    # Earlier turns are kept for the cascade; only the wrapped one changes.
    assert (heard.kind, heard.texts) == ("rag", PYTHON_TURNS)


def test_legacy_rag_template_is_read_by_its_user_query() -> None:
    messages = open_webui.rag_request(PYTHON_CHAT, COOKING_DOCS, template=open_webui.RAG_LEGACY, plain_context=True)
    assert "<user_query>\n" + PYTHON_TURNS[-1] in messages[-1]["content"]
    assert read_route_input(ollama_chat(messages)).texts == PYTHON_TURNS


def test_legacy_rag_template_as_a_whole_message_is_read_by_its_user_query() -> None:
    # A client that replaces the message with the filled template (nothing after it).
    filled = open_webui.fill_rag(open_webui.RAG_LEGACY, "Bake the cake for 35 minutes.", PYTHON_TURNS[-1])
    assert unwrap_retrieved_context(filled) == PYTHON_TURNS[-1]


def test_rag_in_the_system_message_leaves_the_user_turns_alone() -> None:
    messages = open_webui.rag_request(PYTHON_CHAT, COOKING_DOCS, in_system=True)
    assert messages[0]["role"] == "system" and "<context>" in messages[0]["content"]
    assert read_route_input(openai_chat(messages)).texts == PYTHON_TURNS


def test_web_search_results_are_documents_too() -> None:
    results = [("https://example.com/pasta", "Boil the pasta in salted water for nine minutes.")]
    messages = open_webui.rag_request([{"role": "user", "content": "Python list comprehension with a condition?"}],
                                      results)
    assert read_route_input(ollama_chat(messages)).texts == ("Python list comprehension with a condition?",)


@pytest.mark.parametrize(
    "text",
    [
        "Explain what this XML does: <context><item>1</item></context>",
        "<context>my notes</context>\nWhat do you think?",
        "Please answer in the format ### Task: ... with a USER: line",
    ],
)
def test_pasted_tags_without_a_template_marker_are_an_ordinary_chat(text: str) -> None:
    heard = read_route_input(ollama_chat([{"role": "user", "content": text}]))
    assert (heard.kind, heard.texts) == ("chat", (text,))


def test_a_pasted_chat_log_is_an_ordinary_chat() -> None:
    text = "Is this support chat rude?\nUSER: my soup is cold\nASSISTANT: not my problem"
    heard = read_route_input(openai_chat([{"role": "user", "content": text}]))
    assert (heard.kind, heard.texts) == ("chat", (text,))


# ---------------------------------------------------------------- configured experts


def test_utility_expert_takes_every_task_prompt() -> None:
    for content in [open_webui.fill_history_task(open_webui.TITLE_GENERATION, PYTHON_CHAT),
                    open_webui.fill_autocomplete(PYTHON_CHAT, "and then"),
                    open_webui.fill_emoji("Done!")]:
        heard = read_route_input(ollama_chat(open_webui.task_request(content)), utility_expert="fallback")
        assert (heard.kind, heard.expert_label, heard.method) == ("task", "fallback", "utility")


def test_utility_expert_does_not_take_chats_or_rag_questions() -> None:
    for messages in [PYTHON_CHAT, open_webui.rag_request(PYTHON_CHAT, COOKING_DOCS)]:
        assert read_route_input(openai_chat(messages), utility_expert="fallback").expert_label == ""


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(continue_requests.fim_generate_body("def total(rows):\n    ", "\n\nprint(total(r))"), id="fim"),
        pytest.param(continue_requests.fim_generate_body("def total(rows):\n    ", ""), id="fim-end-of-file"),
        pytest.param(continue_requests.raw_generate_body("<|fim_prefix|>def total(rows):\n    <|fim_suffix|>"
                                                         "<|fim_middle|>"), id="raw"),
    ],
)
def test_continue_autocomplete_goes_to_the_autocomplete_expert(body: dict[str, Any]) -> None:
    heard = read_route_input(generate_request_from_ollama(body), autocomplete_expert="coder")
    assert (heard.kind, heard.expert_label, heard.method) == ("autocomplete", "coder", "autocomplete")
    assert heard.texts == (body["prompt"],)


def test_autocomplete_without_an_expert_is_routed_by_its_prompt() -> None:
    body = continue_requests.fim_generate_body("import csv\n", "")
    heard = read_route_input(generate_request_from_ollama(body))
    assert (heard.kind, heard.expert_label, heard.texts) == ("autocomplete", "", ("import csv\n",))


def test_openai_completion_with_a_suffix_is_autocomplete_and_without_one_is_not() -> None:
    with_suffix = completion_request_from_openai({"model": "lemoe", "prompt": "def f(", "suffix": "):\n"})
    plain = completion_request_from_openai({"model": "lemoe", "prompt": "Once upon a time"})
    assert read_route_input(with_suffix, autocomplete_expert="coder").expert_label == "coder"
    assert read_route_input(plain, autocomplete_expert="coder") == read_route_input(plain)
    assert read_route_input(plain).kind == "chat"


def test_a_plain_generate_is_read_like_a_one_turn_chat() -> None:
    req = generate_request_from_ollama({"model": "lemoe", "prompt": "Why is the sky blue?", "stream": False})
    assert read_route_input(req, autocomplete_expert="coder").texts == ("Why is the sky blue?",)


class _RecordingRouter:
    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    def route(self, user_texts: Any) -> RouteDecision:
        self.seen.append(tuple(user_texts))
        return RouteDecision(0, "fallback", 0.5, "fallback")


def test_a_configured_expert_decides_without_the_router() -> None:
    from modules.config_manager import ExpertConfig

    experts = [ExpertConfig(id=0, label="fallback", type="ollama", url="http://127.0.0.1:1", model_name="m"),
               ExpertConfig(id=3, label="Coder", keywords=["python"], type="ollama", url="http://127.0.0.1:1",
                            model_name="m")]
    router = _RecordingRouter()
    heard = read_route_input(generate_request_from_ollama(continue_requests.fim_generate_body("x = ", "")),
                             autocomplete_expert="coder")
    assert route_read_input(router, experts, heard) == RouteDecision(3, "Coder", 1.0, "autocomplete")
    assert router.seen == []
    # A label that names no expert (only a hand-built config can have one) asks the router.
    stray = read_route_input(generate_request_from_ollama(continue_requests.fim_generate_body("x = ", "")),
                             autocomplete_expert="nobody")
    assert route_read_input(router, experts, stray).label == "fallback"
    assert router.seen == [("x = ",)]


# ---------------------------------------------------------------- hostile bodies


@pytest.mark.parametrize(
    "text",
    [
        "<chat_history>" * 70_000,
        "### Task:\n" + "<context>" * 100_000,
        "### Task:\n" + "USER: x\n" * 100_000,
        "History:\n" + 'USER: """x\n' * 80_000 + "Query: q",
        "emoji\nMessage: ```" * 50_000,
        "responses from various models to the latest user query: \"" * 15_000,
        "<context><source>" + "<user_query>" * 70_000 + "</context>",
    ],
    ids=["histories", "contexts", "role-lines", "tool-lines", "emoji", "moa", "queries"],
)
def test_a_megabyte_of_repeated_markers_is_read_in_linear_time(text: str) -> None:
    # A pattern that backtracks over repeated markers takes minutes on these; a linear scan
    # well under a second, even on a busy machine.
    assert len(text) <= 1_100_000
    started = time.perf_counter()
    heard = read_route_input(openai_chat([{"role": "system", "content": "Available Tools: []"},
                                          {"role": "user", "content": text}]))
    assert time.perf_counter() - started < 2.0
    assert len(heard.texts) <= 33
