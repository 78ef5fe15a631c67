"""`api` experts: remote providers (OpenAI, Anthropic, Gemini, Ollama, ...) through LiteLLM.

LiteLLM is heavy (seconds to import) and, by default, fetches its model cost map from the
internet when imported. So it is imported only when an `api` expert is configured, through
`import_litellm`, which first switches it to the cost map shipped in the package.

The API key comes from the environment variable named in `api_key_env`, read once when the
backend is built; it is never in JSON, never logged.

Every answer is streamed from the provider (a non-streaming client request is collected by the
runner), and its chunks are read by the one OpenAI upstream codec (`protocol/openai_upstream.py`)
into `ChatEvent`s: text, reasoning, whole tool calls (assembled from their fragments), and a
final `Done` with the usage the provider reported.

LiteLLM's exceptions are translated in one place, `expert_error_from_litellm`, by the ordered
table `litellm_error_table`: timeouts -> `ExpertTimeout`; authentication, connection and API
errors -> `ExpertUnavailable`; anything once the answer has started -> `ExpertStreamBroken`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from contextlib import closing
from types import ModuleType
from typing import Any, NoReturn

from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
)
from modules.config_manager import ExpertConfig, ServerConfig
from modules.protocol.embedding_protocol import embed_result_from_openai
from modules.embeddings import EmbedRequest, EmbedResult
from modules.errors import (
    ExpertAnswerTooLarge,
    ExpertError,
    ExpertStreamBroken,
    ExpertTimeout,
    ExpertUnavailable,
)
from modules.protocol.openai_protocol import effort_from_think
from modules.protocol.openai_upstream import OpenAIStreamReader, openai_messages_from_request

# LiteLLM reads this at import: "True" means the cost map bundled in the package, no download.
LOCAL_COST_MAP_ENV = "LITELLM_LOCAL_MODEL_COST_MAP"

# The sampling options LiteLLM passes on, under Ollama's names, and the ones OpenAI names otherwise.
_PARAMETERS = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty", "repeat_penalty")
_OPENAI_NAMES = {"repeat_penalty": "repetition_penalty"}


def import_litellm() -> ModuleType:
    """LiteLLM, imported on first use with its import-time network access switched off."""
    # Set unconditionally: a user's "False" would make every start-up try to reach the internet.
    os.environ[LOCAL_COST_MAP_ENV] = "True"
    import litellm

    # Its "Give Feedback / Get Help" banner goes to stdout on every exception.
    litellm.suppress_debug_info = True
    return litellm


def litellm_error_table(litellm: ModuleType) -> tuple[tuple[type[BaseException], type[ExpertError]], ...]:
    """(exception class, ExpertError subclass) pairs, most specific first; the first match wins.

    LiteLLM's exceptions subclass openai-python's (`Timeout` is an `APITimeoutError`, which is an
    `APIConnectionError`), so a timeout must be looked up before the connection errors. A few
    LiteLLM exceptions (budget, guardrail, PII) do not, and are listed by name.
    """
    import httpx
    import openai

    exc = litellm.exceptions
    return (
        (exc.MidStreamFallbackError, ExpertStreamBroken),
        (exc.Timeout, ExpertTimeout),
        (openai.APITimeoutError, ExpertTimeout),
        (httpx.TimeoutException, ExpertTimeout),
        (exc.AuthenticationError, ExpertUnavailable),
        (exc.PermissionDeniedError, ExpertUnavailable),
        (exc.APIConnectionError, ExpertUnavailable),
        (exc.RateLimitError, ExpertUnavailable),
        (exc.ServiceUnavailableError, ExpertUnavailable),
        (exc.InternalServerError, ExpertUnavailable),
        (exc.BadRequestError, ExpertUnavailable),
        (exc.NotFoundError, ExpertUnavailable),
        (exc.APIError, ExpertUnavailable),
        (openai.OpenAIError, ExpertUnavailable),
        (exc.BudgetExceededError, ExpertUnavailable),
        (exc.GuardrailRaisedException, ExpertUnavailable),
        (exc.BlockedPiiEntityError, ExpertUnavailable),
        (exc.ModelNotMappedError, ExpertUnavailable),
        (exc.ModifyResponseException, ExpertUnavailable),
        (exc.SensitiveDataRouteException, ExpertUnavailable),
        (httpx.HTTPError, ExpertUnavailable),
    )


def expert_error_from_litellm(
    exc: BaseException, table: tuple[tuple[type[BaseException], type[ExpertError]], ...], *, started: bool
) -> ExpertError | None:
    """The ExpertError for a LiteLLM exception, or None when it is not one of LiteLLM's.

    Once part of the answer has gone out (`started`), any provider failure breaks the stream:
    the fallback expert can no longer take over silently.
    """
    for kind, failure in table:
        if isinstance(exc, kind):
            failure = ExpertStreamBroken if started else failure
            return failure(f"{type(exc).__name__}: {_message_of(exc)}")
    return None


def _message_of(exc: BaseException) -> str:
    # Some LiteLLM exceptions build their text from attributes a partly-built one lacks; a
    # failure while describing a failure must not replace it.
    try:
        return str(exc)
    except Exception:
        return "(no message)"


def litellm_model_name(expert: ExpertConfig) -> str:
    """`provider/model_name`, LiteLLM's way of naming a provider; just the model when none is set."""
    return f"{expert.provider}/{expert.model_name}" if expert.provider else str(expert.model_name)


def api_key_from_environment(expert: ExpertConfig) -> str | None:
    """The expert's key from the env var it names; raises ExpertUnavailable when that is unset."""
    if not expert.api_key_env:
        return None
    key = os.environ.get(expert.api_key_env, "").strip()
    if not key:
        raise ExpertUnavailable(f"environment variable {expert.api_key_env} is not set")
    return key


class ApiBackend:
    """A `Backend` that answers through `litellm.completion(..., stream=True)`."""

    def __init__(self, expert: ExpertConfig, server: ServerConfig, api_key: str | None, litellm: ModuleType) -> None:
        self.expert = expert
        self.model = litellm_model_name(expert)
        self._api_key = api_key
        self._litellm = litellm
        self._errors = litellm_error_table(litellm)
        self._timeout = expert.timeout or server.read_timeout
        self._max_answer_bytes = server.max_upstream_answer_bytes

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatEvent]:
        arguments = litellm_arguments_from_request(request)
        started = time.perf_counter_ns()
        try:
            response = self._litellm.completion(
                model=self.model,
                api_key=self._api_key,
                api_base=self.expert.api_base,
                stream=True,
                stream_options={"include_usage": True},
                timeout=self._timeout,
                # LeMoE's answer to a failure is the fallback expert, not a retry that doubles
                # the client's wait; and options a provider lacks are dropped, not fatal.
                max_retries=0,
                drop_params=True,
                **arguments,
            )
        except Exception as exc:
            self._raise_mapped(exc, started=False)
        yield from self._events(response, started)

    def embed(self, request: EmbedRequest) -> EmbedResult:
        """Vectors through `litellm.embedding` (an OpenAI-shaped answer, whatever the provider)."""
        arguments: dict[str, Any] = {}
        if request.dimensions is not None:
            arguments["dimensions"] = request.dimensions
        started = time.perf_counter_ns()
        try:
            response = self._litellm.embedding(
                model=self.model,
                input=request.tokens if request.tokens is not None else request.texts,
                api_key=self._api_key,
                api_base=self.expert.api_base,
                timeout=self._timeout,
                max_retries=0,
                drop_params=True,
                **arguments,
            )
        except Exception as exc:
            self._raise_mapped(exc, started=False)
        raw = response.model_dump() if hasattr(response, "model_dump") else dict(response)
        result = embed_result_from_openai(raw, request.count)
        return dataclasses.replace(result, total_duration_ns=time.perf_counter_ns() - started)

    def close(self) -> None:
        # LiteLLM keeps its own shared HTTP clients; nothing per backend to release.
        pass

    def _events(self, response: Any, started_ns: int) -> Iterator[ChatEvent]:
        reader = OpenAIStreamReader()
        sent = False
        size = 0
        first_at: int | None = None
        with closing(response):
            chunks = iter(response)
            while True:
                try:
                    chunk = next(chunks, None)
                except Exception as exc:
                    self._raise_mapped(exc, started=sent)
                if chunk is None:
                    break
                first_at = first_at or time.perf_counter_ns()
                for event in reader.feed(chunk.model_dump() if hasattr(chunk, "model_dump") else dict(chunk)):
                    # LiteLLM reads the provider's bytes itself, so the bound the HTTP backends
                    # put on an answer's bytes is put here on what it carries: an endless answer
                    # from a provider must not hold a worker and its memory without end.
                    size += _event_size(event)
                    if size > self._max_answer_bytes:
                        raise ExpertAnswerTooLarge(f"answer longer than {self._max_answer_bytes} bytes")
                    sent = True
                    yield event
        for event in reader.end():
            yield _timed(event, started_ns, first_at) if isinstance(event, Done) else event

    def _raise_mapped(self, exc: Exception, *, started: bool) -> NoReturn:
        mapped = expert_error_from_litellm(exc, self._errors, started=started)
        if mapped is None:
            # Not LiteLLM's: a bug of ours, which the runner logs with its traceback.
            raise exc
        raise mapped from exc


def _event_size(event: ChatEvent) -> int:
    """About the bytes an event carries (its text, or a tool call's arguments as JSON)."""
    if isinstance(event, (TextDelta, ThinkingDelta)):
        return len(event.text.encode())
    if isinstance(event, ToolCallDelta):
        return len(json.dumps(event.call.arguments)) + len(event.call.name)
    return 0


def _timed(done: Done, started_ns: int, first_at: int | None) -> Done:
    """The reader's `Done` with the answer's timings added to the usage the provider reported."""
    done_at = time.perf_counter_ns()
    first_at = first_at or done_at
    return dataclasses.replace(done, usage=dataclasses.replace(
        done.usage,
        total_duration_ns=done_at - started_ns,
        prompt_eval_duration_ns=first_at - started_ns,
        eval_duration_ns=done_at - first_at,
    ))


def litellm_arguments_from_request(request: ChatRequest) -> dict[str, Any]:
    """`litellm.completion` arguments (besides model, key and transport) for a request.

    Options use Ollama's names (num_predict -> max_tokens, repeat_penalty -> repetition_penalty,
    ...); unknown ones are ignored, as Ollama does. They are typed already (`ChatRequest.generation`):
    a wrong type was refused when the request was parsed.
    """
    options = request.generation
    sampling = options.sampling()
    arguments: dict[str, Any] = {"messages": litellm_messages_from_request(request)}
    arguments.update({_OPENAI_NAMES.get(name, name): sampling[name] for name in _PARAMETERS if name in sampling})
    if options.token_limit is not None:
        arguments["max_tokens"] = options.token_limit
    if options.stop:
        arguments["stop"] = list(options.stop)
    if request.tools:
        arguments["tools"] = request.tools
    json_format = request.json_format
    if json_format is not None and json_format.schema is None:
        arguments["response_format"] = {"type": "json_object"}
    elif json_format is not None:
        arguments["response_format"] = {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": json_format.schema},
        }
    # LiteLLM maps reasoning_effort onto each provider's own switch (Ollama's think, Anthropic's
    # thinking budget, ...) and, with drop_params, leaves it out where a provider has none.
    effort = effort_from_think(request.think)
    if effort is not None:
        arguments["reasoning_effort"] = effort
    return arguments


def litellm_messages_from_request(request: ChatRequest) -> list[dict[str, Any]]:
    """OpenAI-shaped messages as an OpenAI server takes them, with the tool's name on tool
    results too; a completion prompt becomes one user turn."""
    return openai_messages_from_request(request, tool_names=True)
