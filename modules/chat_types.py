"""The one internal shape of a chat request and its answer, shared by both APIs.

The OpenAI and Ollama adapters translate their wire formats into these values and back;
routers read `ChatRequest.messages`; backends take a `ChatRequest` and yield `ChatEvent`s.
Nothing here knows about HTTP or JSON field names of either protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from modules.generation_options import GenerationOptions, JsonFormat, json_format_from

Role = Literal["system", "user", "assistant", "tool"]
# "chat" carries messages; "completion" carries a bare prompt (/api/generate, /v1/completions).
RequestKind = Literal["chat", "completion"]
DoneReason = Literal["stop", "length", "tool_calls", "load", "unload"]


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asks the client to run."""

    name: str
    # Always a parsed object internally; the OpenAI adapter serialises it to a JSON string.
    arguments: dict[str, Any]
    # OpenAI call id ("call_..."); Ollama may omit it, the OpenAI adapter then makes one up.
    id: str | None = None
    # Position among the calls of one answer; OpenAI stream chunks require it.
    index: int = 0


@dataclass
class Message:
    """One conversation turn."""

    role: Role
    # Plain text. OpenAI content-part arrays are flattened into this by the adapter.
    content: str = ""
    # Raw base64 images (no `data:` prefix), as Ollama wants them.
    images: list[str] = field(default_factory=list)
    # Calls made by an assistant turn.
    tool_calls: list[ToolCall] = field(default_factory=list)
    # For role "tool": which call this is the answer to (OpenAI) and the tool's name (Ollama).
    tool_call_id: str | None = None
    tool_name: str | None = None
    # Reasoning text of an earlier assistant turn, passed back by some clients.
    thinking: str | None = None


@dataclass
class ChatRequest:
    """A request after parsing, whatever protocol it came in."""

    # Model name as the client sent it (None or "lemoe" means: let the router choose).
    model: str | None
    messages: list[Message]
    # Stream the answer token by token. Each adapter applies its own default.
    stream: bool = False
    # Generation options under Ollama's names (num_predict, temperature, top_p, top_k, stop,
    # seed, num_ctx, repeat_penalty, presence_penalty, frequency_penalty, ...). The OpenAI
    # adapter maps its fields onto these, as Ollama's own OpenAI layer does.
    options: dict[str, Any] = field(default_factory=dict)
    # OpenAI-style tool definitions, passed through untouched to the expert.
    tools: list[dict[str, Any]] | None = None
    # "json" or a JSON Schema object: constrain the answer's format.
    format: str | dict[str, Any] | None = None
    # Reasoning switch: True/False or "low" | "medium" | "high" | "max".
    think: bool | str | None = None
    # Seconds to keep a local model loaded after this request; 0 unloads, negative keeps forever.
    keep_alive: float | None = None
    kind: RequestKind = "chat"
    # For kind "completion": the prompt, the text after the cursor (FIM) and raw mode.
    prompt: str | None = None
    suffix: str | None = None
    raw: bool = False
    # The OpenAI adapter asks for a trailing usage chunk (`stream_options.include_usage`).
    include_usage: bool = False

    def __post_init__(self) -> None:
        # The protocol adapters build requests inside their parsers, so a bad option or format
        # is refused here as the client's 400, never later by a backend inside the runner.
        self.generation  # noqa: B018 - read for its check
        self.json_format  # noqa: B018 - read for its check

    @property
    def generation(self) -> GenerationOptions:
        """`options` as typed values. Read from the mapping each time, not stored beside it, so
        that the two can never disagree (the runner merges an expert's defaults into it)."""
        return GenerationOptions.from_options(self.options)

    @property
    def json_format(self) -> JsonFormat | None:
        """`format` as a typed value: None for a free-form answer."""
        return json_format_from(self.format)

    def user_texts(self) -> list[str]:
        """The text of every user turn, oldest first (what routers look at)."""
        if self.kind == "completion":
            return [self.prompt or ""]
        return [m.content for m in self.messages if m.role == "user"]


def name_tool_results(messages: list[Message]) -> None:
    """Give tool results the name of the call they answer (by call id), as Ollama's native API
    wants it; the OpenAI, Anthropic and Responses APIs only send the id back."""
    names: dict[str, str] = {}
    for msg in messages:
        for call in msg.tool_calls:
            if call.id:
                names[call.id] = call.name
        if msg.role == "tool" and msg.tool_name is None and msg.tool_call_id in names:
            msg.tool_name = names[msg.tool_call_id]


@dataclass(frozen=True)
class Usage:
    """Token counts and timings of one answer (durations in nanoseconds, as Ollama reports)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_duration_ns: int = 0
    load_duration_ns: int = 0
    prompt_eval_duration_ns: int = 0
    eval_duration_ns: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer text."""

    text: str


@dataclass(frozen=True)
class ThinkingDelta:
    """A piece of reasoning text (Ollama `thinking`, OpenAI `reasoning_content`)."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One complete tool call. Backends assemble streamed fragments before yielding it."""

    call: ToolCall


@dataclass(frozen=True)
class Done:
    """The end of an answer: why it stopped and what it cost."""

    done_reason: DoneReason = "stop"
    usage: Usage = field(default_factory=Usage)


ChatEvent = Union[TextDelta, ThinkingDelta, ToolCallDelta, Done]


@dataclass(frozen=True)
class Answer:
    """A whole non-streamed answer: what the protocol adapters build their one JSON body from."""

    text: str
    thinking: str
    calls: list[ToolCall]
    done: Done


def close_events(events: Iterable[ChatEvent]) -> None:
    """Close an event source if it can be: closing promptly stops the expert when the client went
    away mid-stream, instead of when the garbage collector gets to it."""
    close = getattr(events, "close", None)
    if close is not None:
        close()


def collect_answer(events: Iterable[ChatEvent]) -> Answer:
    """Join one answer's events, up to its `Done` (a default one if the events end without it)."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    done = Done()
    for event in events:
        if isinstance(event, TextDelta):
            texts.append(event.text)
        elif isinstance(event, ThinkingDelta):
            thoughts.append(event.text)
        elif isinstance(event, ToolCallDelta):
            calls.append(event.call)
        elif isinstance(event, Done):
            done = event
            break
    return Answer("".join(texts), "".join(thoughts), calls, done)

# "utility" and "autocomplete": a client's task prompt or an editor's inline completion went to
# the expert configured for it (router.utility_expert / router.autocomplete_expert).
# "capability": the router's choice could not take the request (images, tools, length, ...), so
# another expert was chosen (modules/capabilities.py).
RouteMethod = Literal[
    "embedding", "classification", "cascade", "keyword", "fallback", "direct", "utility", "autocomplete",
    "capability",
]


@dataclass(frozen=True)
class RouteDecision:
    """Which expert a request goes to, and why."""

    expert_id: int
    label: str
    # Confidence of the deciding step in [0, 1] (1.0 for a direct request).
    score: float
    method: RouteMethod
    # Every expert's score from the deciding step, by label.
    scores: dict[str, float] = field(default_factory=dict)
    # The text the router looked at when it used earlier messages (cascade), else None.
    context_used: str | None = None


@dataclass(frozen=True)
class ModelCard:
    """What the model listings (/api/tags, /api/show, /v1/models) say about one model name."""

    # Name with its tag, e.g. "programador:latest" (clients such as Open WebUI need the tag).
    name: str
    # Short family name for `details.family` (e.g. "lemoe" for the router, "llama" for a GGUF).
    family: str
    # "gguf", "onnx" or "remote".
    format: str
    # e.g. "135M", or "unknown" for remote experts.
    parameter_size: str
    # e.g. "Q4_1", or "unknown".
    quantization_level: str
    # Bytes on disk (local models) or a small non-zero placeholder for remote ones.
    size: int
    # 64 hex characters, stable for the same configuration.
    digest: str
    # Seconds since the epoch: when the configuration (or model file) last changed.
    modified_at: float
    context_length: int
    # Ollama capability names: "completion", "tools", "insert", ...
    capabilities: tuple[str, ...] = ("completion", "tools")
    # The expert's description, for /api/show's modelfile comment.
    description: str = ""
    # Length of the vectors of an embedding model, when known (/api/show's model_info).
    embedding_length: int | None = None


def clip_message(text: str, max_chars: int) -> str:
    """Keep the head and tail of an over-long message, where its instruction usually is
    ("Translate this: ..." or "... what does this code do?")."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "\n" + text[-half:]
