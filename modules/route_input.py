"""What the router should read, given what a client actually sent.

Chat front ends send more than the user's chat through the model they are pointed at. Open
WebUI sends its own task prompts (title, tags, follow-up questions, search queries, image
prompts, autocomplete, emoji, tool selection) as one user message that quotes the conversation,
and it wraps the user's question in retrieved documents for RAG and web search. Routed as they
come, a title request about a Python chat reads as "generate a title" (the fallback expert) and
a question about Python asked over cooking documents reads as cooking. This module recognises
those shapes and hands the router the user turns the conversation really has.

Recognition keys on the markers that survive an admin editing the templates: `### Task:` at the
start, a `<chat_history>` block and its `USER:` / `ASSISTANT:` lines (Open WebUI renders history
as `ROLE: content` lines), a `<context>` block of `<source>` documents, and `<user_query>`. When
a shape is recognised but nothing usable is inside it, the request is routed as it came.

Code editors' inline completion (Continue's `/api/generate` with `raw` or `suffix`, FIM) is
recognised too, so that it can go to one configured expert.

Pure functions only: no Flask, no HTTP. The router is passed in and never changed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from modules.chat_types import ChatRequest, RouteDecision, RouteMethod
from modules.config_manager import ExpertConfig
from modules.router_factory import Router

# "chat": an ordinary conversation; "task": a client's own prompt quoting the conversation;
# "rag": user turns wrapped in retrieved documents; "autocomplete": an editor's inline completion.
InputKind = Literal["chat", "task", "rag", "autocomplete"]

# Route methods of the configured experts that take a kind of input without asking the router.
UTILITY_METHOD: RouteMethod = "utility"
AUTOCOMPLETE_METHOD: RouteMethod = "autocomplete"


@dataclass(frozen=True)
class RouteInput:
    """The texts the router should read, and how they were found."""

    kind: InputKind
    # User turns, oldest first, as the router expects them.
    texts: tuple[str, ...]
    # A configured expert that takes this input without the router ("" = ask the router).
    expert_label: str = ""
    # The method reported when `expert_label` decides.
    method: RouteMethod = UTILITY_METHOD


def read_route_input(req: ChatRequest, *, utility_expert: str = "", autocomplete_expert: str = "") -> RouteInput:
    """Recognise the client's prompt templates in `req` and say what the router should read."""
    if req.kind == "completion":
        # An editor's inline completion: Continue sends FIM with `suffix`, and its templated
        # completion with `raw: true`. A plain prompt is read like a one-turn chat.
        if req.raw or req.suffix is not None:
            return RouteInput("autocomplete", (req.prompt or "",), autocomplete_expert, AUTOCOMPLETE_METHOD)
        user_turns = [req.prompt or ""]
        system_texts: list[str] = []
    else:
        user_turns = [m.content for m in req.messages if m.role == "user"]
        system_texts = [m.content for m in req.messages if m.role == "system"]
    if not user_turns:
        return RouteInput("chat", ())

    quoted = _quoted_conversation(user_turns[-1], system_texts)
    if quoted == ():
        # A task header that quotes nothing readable is too little to go on: a user's own
        # message may start with "### Task:" too. It is routed as it came.
        return RouteInput("task", tuple(user_turns))
    if quoted is not None:
        return RouteInput("task", quoted, utility_expert, UTILITY_METHOD)

    questions = [unwrap_retrieved_context(turn) for turn in user_turns]
    if any(q is not None for q in questions):
        return RouteInput("rag", tuple(q if q is not None else t for q, t in zip(questions, user_turns, strict=True)))
    return RouteInput("chat", tuple(user_turns))


def route_read_input(router: Router, experts: Sequence[ExpertConfig], heard: RouteInput) -> RouteDecision:
    """The decision for `heard`: its configured expert if it has one, else the router's."""
    if heard.expert_label:
        label = heard.expert_label.lower()
        expert = next((e for e in experts if e.label.lower() == label), None)
        # Config validation refuses a label that names no expert; one that slips through (a
        # hand-built config) is ignored rather than failing the request.
        if expert is not None:
            return RouteDecision(expert.id, expert.label, 1.0, heard.method)
    return router.route(heard.texts)


# --- task prompts ---------------------------------------------------------------------------
# Bodies reach 1 MB, so everything below is one linear scan: blocks are found with str.find,
# and no pattern can backtrack over a run of repeated markers.

_TASK_HEADER = re.compile(r"\A\s*###\s*Task\s*:", re.IGNORECASE)
# Open WebUI's get_messages_content: "\n".join(f"{ROLE}: {content}"), roles upper-cased.
_ROLE_LINE = re.compile(r"^(USER|ASSISTANT|SYSTEM|TOOL):[ \t]?", re.MULTILINE)
# Outside a <chat_history> block a quoted turn ends where the template resumes: a markdown
# heading or a tag at the start of a line (every Open WebUI template is built of both).
_TEMPLATE_RESUMES = re.compile(r"^(?:#{1,6}[ \t]|</?[A-Za-z_]{1,32}>)", re.MULTILINE)
_UNREADABLE_TURN = "None"  # what get_content_from_message gives an image-only turn
# Routers read the last few user turns (router.context_messages is at most 20); a quoted history
# longer than this only costs time.
_MAX_QUOTED_TURNS = 32
_EMOJI_MARKER = "\nmessage:"
_MOA_MARKER = "responses from various models to the latest user query:"
_TOOLS_SYSTEM = "available tools:"
_QUERY_LINE = "\nQuery: "


def _quoted_conversation(text: str, system_texts: Sequence[str]) -> tuple[str, ...] | None:
    """The user turns a task prompt quotes, oldest first; () for a task with none readable;
    None when `text` is no task prompt."""
    lower = text.lower()
    history = _block(text, lower, "<chat_history>", "</chat_history>")
    if history is not None:
        inner, end = history
        turns = _user_turns_in_history(inner)
        if not turns:
            # Autocomplete in an empty chat: the text being typed is all there is. In a chat,
            # the half-typed words are too little to route on; the chat's last turn decides.
            typed = _block(text, lower, "<text>", "</text>", end)
            if typed is not None and typed[0].strip():
                turns.append(typed[0].strip())
        return tuple(turns)
    tools = _tool_selection_turns(text, system_texts)
    if tools is not None:
        return tools
    if unwrap_retrieved_context(text) is not None:
        return None  # a RAG prompt also starts with "### Task:"
    quoted = _emoji_sentence(text, lower) or _moa_query(text, lower)
    if quoted:
        return (quoted,)
    if _TASK_HEADER.match(text):
        # An edited template without its <chat_history> tags still quotes ROLE: lines.
        return tuple(_user_turns_in_history(text, stop_at_template=True))
    return None


def _block(text: str, lower: str, opening: str, closing: str, start: int = 0) -> tuple[str, int] | None:
    """The text between the first `opening` tag at or after `start` and the next `closing`
    tag (tags in any case), with the index just past `closing`."""
    begin = lower.find(opening, start)
    if begin < 0:
        return None
    end = lower.find(closing, begin + len(opening))
    if end < 0:
        return None
    return text[begin + len(opening):end], end + len(closing)


def _user_turns_in_history(history: str, *, stop_at_template: bool = False) -> list[str]:
    turns: list[str] = []
    for role, body in reversed(_role_segments(history)):
        if role != "USER":
            continue
        if stop_at_template:
            resumes = _TEMPLATE_RESUMES.search(body)
            body = body[: resumes.start()] if resumes else body
        body = body.strip()
        if body and body != _UNREADABLE_TURN:
            turns.append(unwrap_retrieved_context(body) or body)
            if len(turns) == _MAX_QUOTED_TURNS:
                break
    return turns[::-1]


def _role_segments(history: str) -> list[tuple[str, str]]:
    """(ROLE, content) for each `ROLE: content` turn; a turn runs to the next ROLE: line."""
    starts = list(_ROLE_LINE.finditer(history))
    if not starts:
        return []
    ends = [m.start() for m in starts[1:]] + [len(history)]
    return [(m.group(1), history[m.end():end]) for m, end in zip(starts, ends, strict=True)]


def _emoji_sentence(text: str, lower: str) -> str | None:
    # The emoji task quotes one sentence (of the answer being spoken), nothing of the chat:
    # "...fitting emoji...\n\nMessage: ```{{prompt}}```".
    marker = lower.rfind(_EMOJI_MARKER)
    if marker < 0 or "emoji" not in lower[:marker]:
        return None
    tail = text[marker + len(_EMOJI_MARKER):].strip()
    if len(tail) < 6 or not (tail.startswith("```") and tail.endswith("```")):
        return None
    return tail[3:-3].strip() or None


def _moa_query(text: str, lower: str) -> str | None:
    # The mixture-of-agents task: '...to the latest user query: "{{prompt}}"\n\nYour task is...'.
    marker = lower.find(_MOA_MARKER)
    if marker < 0:
        return None
    rest = text[marker + len(_MOA_MARKER):].lstrip(" ")
    close = rest.find('"\n')
    if not rest.startswith('"') or close < 1:
        return None
    return rest[1:close].strip() or None


def _tool_selection_turns(text: str, system_texts: Sequence[str]) -> tuple[str, ...] | None:
    # Open WebUI's tool selection ("Available Tools: ..." as the system message) quotes recent
    # turns as ROLE: """content""" lines, then the user's message after "Query: ".
    tools_system = any(s.lstrip().lower().startswith(_TOOLS_SYSTEM) for s in system_texts)
    newest_first = text.startswith("Query: History:\n")
    if not (newest_first or text.startswith("History:\n")):
        # With no earlier turn the prompt is just "Query: <message>".
        if tools_system and text.startswith("Query: ") and text[7:].strip():
            return (text[7:].strip(),)
        return None
    split = text.rfind(_QUERY_LINE)
    if split < 0:
        return None
    history = text[text.index("History:\n") + 9:split]
    quoted = [(role, _strip_triple_quotes(body)) for role, body in _role_segments(history)]
    if not quoted and not tools_system:
        return None
    # Older Open WebUI releases ("Query: History: ...") listed the turns newest first and
    # included the message being asked about.
    if newest_first:
        quoted.reverse()
    turns = [body for role, body in quoted if role == "USER" and body and body != _UNREADABLE_TURN]
    turns = turns[-_MAX_QUOTED_TURNS:]
    query = text[split + len(_QUERY_LINE):].strip()
    if query and (not turns or turns[-1] != query):
        turns.append(query)
    return tuple(turns)


def _strip_triple_quotes(body: str) -> str:
    body = body.strip()
    if len(body) >= 6 and body.startswith('"""') and body.endswith('"""'):
        body = body[3:-3]
    return body.strip()


# --- retrieved context ----------------------------------------------------------------------

_SOURCE_TAG = re.compile(r"<source[\s>]", re.IGNORECASE)


def unwrap_retrieved_context(text: str) -> str | None:
    """The user's question inside a RAG prompt, or None when `text` is not one.

    Open WebUI fills its RAG template with the documents inside `<context>` and puts it before
    the user's message (or, with older templates, the question inside `<user_query>`). A
    `<context>` block alone could be something the user pasted, so one more marker is needed:
    the `### Task:` header, a `<user_query>` block, or `<source>` documents.
    """
    lower = text.lower()
    begin = lower.find("<context>")
    # The documents may quote the tags themselves: the block runs to the last closing tag.
    end = lower.rfind("</context>")
    if begin < 0 or end < begin:
        return None
    documents = text[begin + len("<context>"):end]
    after = end + len("</context>")
    query = _block(text, lower, "<user_query>", "</user_query>", after)
    if not (_TASK_HEADER.match(text) or query is not None or _SOURCE_TAG.search(documents)):
        return None
    if query is not None and query[0].strip():
        return query[0].strip()
    # Open WebUI's current template has no query slot: the user's message follows the block.
    rest = text[query[1] if query is not None else after:].strip()
    return rest or None
