"""Local GGUF experts: llama-cpp-python models borrowed from the model pool.

One `Llama` object is loaded per model file and shared by every expert that names the file
(the pool key is the resolved path). A `Llama` is not thread-safe, so the pool holds it in a
`LoadedLlama` together with a lock, and one answer at a time is generated per model; other
requests for the same model wait their turn, as Ollama does with one parallel slot.
The lease, the lock and Ollama's load/unload probes are the `local_backend.PooledLocalBackend`
skeleton it shares with ONNX; this module loads the file, builds the prompt and streams tokens.

Every llama-cpp, OS or Jinja exception is translated to an `ExpertError` in `map_llama_errors`:
`ExpertUnavailable` when the model cannot be loaded, `ExpertStreamBroken` when generation fails.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp
from llama_cpp.llama_chat_format import (
    Jinja2ChatFormatter,
    LlamaChatCompletionHandlerNotFoundException,
)
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from modules.blocking import run_blocking
from modules.chat_types import (
    ChatEvent,
    ChatRequest,
    Done,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from modules.config_manager import LocalModelsConfig
from modules.errors import ExpertError, ExpertStreamBroken
from modules.generation_options import GenerationOptions, JsonFormat, json_format_from
from modules.local_backend import PooledLocalBackend, map_library_errors
from modules.protocol.openai_upstream import OpenAIStreamReader, openai_messages_from_request
from modules.think_tags import ThinkTagSplitter

# What llama-cpp-python (and the Jinja chat templates it renders) raise on bad files, bad
# prompts or failed decodes. Anything else is a bug of ours and should surface as one.
LLAMA_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    RuntimeError,
    LookupError,
    MemoryError,
    jinja2.TemplateError,
    LlamaChatCompletionHandlerNotFoundException,
)

# llama-cpp silences the C library during a load by pointing the process-wide fds 1 and 2 at
# /dev/null and back. Two loads doing that at once can leave stderr pointed at /dev/null for
# good, so loads are serialised across the whole process.
_LOAD_LOCK = threading.Lock()

# Sampling options llama-cpp wants as ints; it takes the others as floats.
_INTEGER_SAMPLING = ("top_k", "seed")


@dataclass(eq=False)
class LoadedLlama:
    """What the pool keeps for one GGUF file: the model, its lock and its prompt template."""

    llm: llama_cpp.Llama
    size_bytes: int
    # Renders the chat template the same way llama-cpp does, to count prompt tokens.
    formatter: Jinja2ChatFormatter | None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    def close(self) -> None:
        self.llm.close()


def map_llama_errors(failure: type[ExpertError], what: str) -> AbstractContextManager[None]:
    """Re-raise a library exception as `failure`; the message is for the log only."""
    return map_library_errors(LLAMA_ERRORS, failure, what)


def load_llama(model_path: Path, local: LocalModelsConfig) -> LoadedLlama:
    """Load a GGUF file (raises the library's own exceptions; callers map them)."""
    with _LOAD_LOCK:
        llm = run_blocking(
            partial(
                llama_cpp.Llama,
                model_path=str(model_path),
                n_ctx=local.n_ctx,
                n_threads=local.n_threads or None,
                verbose=False,
            )
        )
    return LoadedLlama(llm=llm, size_bytes=model_path.stat().st_size, formatter=_formatter_for(llm))


def _formatter_for(llm: llama_cpp.Llama) -> Jinja2ChatFormatter | None:
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def token_text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="ignore") if token >= 0 else ""

    return Jinja2ChatFormatter(
        template=template, eos_token=token_text(llm.token_eos()), bos_token=token_text(llm.token_bos())
    )


class GGUFBackend(PooledLocalBackend[LoadedLlama, dict[str, Any]]):
    """A `Backend` that answers with a local GGUF model through llama-cpp-python."""

    library_errors = LLAMA_ERRORS

    def _plan(self, request: ChatRequest) -> dict[str, Any]:
        return llama_kwargs_from_options(request.generation, self._local.n_ctx)

    def _load(self) -> LoadedLlama:
        return load_llama(self.model_path, self._local)

    def _generate(
        self, model: LoadedLlama, request: ChatRequest, plan: dict[str, Any], started_ns: int, load_ns: int
    ) -> Iterator[ChatEvent]:
        return _generate(model, request, plan, started_ns, load_ns)


def _generate(
    model: LoadedLlama, request: ChatRequest, kwargs: dict[str, Any], started: int, load_ns: int
) -> Iterator[ChatEvent]:
    """Stream one answer from a model whose lock the caller holds."""
    llm = model.llm
    with map_llama_errors(ExpertStreamBroken, "starting generation"):
        raw_prompt = raw_prompt_tokens(llm, request.prompt or "", request.suffix) if _is_raw(request) else None
        prompt_tokens = len(raw_prompt) if raw_prompt is not None else _count_chat_prompt_tokens(model, request)
        eval_started = time.perf_counter_ns()
        chunks = _start_stream(llm, request, kwargs, raw_prompt)
    first_chunk_at: int | None = None
    reader = OpenAIStreamReader()
    answer = _LocalAnswer()
    with closing(chunks):
        while True:
            with map_llama_errors(ExpertStreamBroken, "generating"):
                chunk = run_blocking(next, chunks, None)
            if chunk is None:
                break
            first_chunk_at = first_chunk_at or time.perf_counter_ns()
            yield from answer.take(reader.feed(chunk))
    yield from answer.take(reader.end())
    yield from answer.finish()
    done_at = time.perf_counter_ns()
    first_chunk_at = first_chunk_at or done_at
    output = "".join(answer.text_parts) + "".join(json.dumps(c.arguments) for c in answer.calls)
    with map_llama_errors(ExpertStreamBroken, "counting tokens"):
        # Without a template in the file the prompt count is an estimate; don't build on it.
        exact_prompt = raw_prompt is not None or model.formatter is not None
        completion_tokens = _count_sampled_tokens(llm, prompt_tokens if exact_prompt else None, output)
    yield Done(
        done_reason=answer.done.done_reason,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_duration_ns=done_at - started,
            load_duration_ns=load_ns,
            prompt_eval_duration_ns=first_chunk_at - eval_started,
            eval_duration_ns=done_at - first_chunk_at,
        ),
    )


class _LocalAnswer:
    """The codec's events of one local answer, with `<think>` tags split out of the text. Tool
    calls are held until the end, after any text the splitter still holds back; `Done` is kept
    for its reason (the usage is counted here, not read from chunks)."""

    def __init__(self) -> None:
        self.text_parts: list[str] = []
        self.calls: list[ToolCall] = []
        self.done = Done()
        self._inline_thinking = ThinkTagSplitter()

    def take(self, events: list[ChatEvent]) -> Iterator[ChatEvent]:
        for event in events:
            if isinstance(event, TextDelta):
                self.text_parts.append(event.text)
                yield from self._inline_thinking.feed(event.text)
            elif isinstance(event, ToolCallDelta):
                self.calls.append(event.call)
            elif isinstance(event, Done):
                self.done = event
            else:
                yield event

    def finish(self) -> Iterator[ChatEvent]:
        yield from self._inline_thinking.flush()
        for call in self.calls:
            yield ToolCallDelta(call)


def _count_sampled_tokens(llm: llama_cpp.Llama, prompt_tokens: int | None, output: str) -> int:
    """How many tokens the model sampled for this answer (the final end-of-turn one included).

    Tokenizing the output text again can miss the real count by several tokens (multi-byte
    characters, merges). llama-cpp instead ends every generation with exactly one sampled token
    not yet fed back into the context, so the context length tells the true count.
    """
    sampled = int(llm.n_tokens) - prompt_tokens + 1 if prompt_tokens is not None else 0
    if sampled > 0:
        return sampled
    # Without an exact prompt count (or should llama-cpp change that bookkeeping), estimate.
    return len(llm.tokenize(output.encode("utf-8"), add_bos=False, special=False)) if output else 0


def _start_stream(
    llm: llama_cpp.Llama, request: ChatRequest, kwargs: dict[str, Any], raw_prompt: list[int] | None
) -> Generator[Mapping[str, Any], None, None]:
    if raw_prompt is not None:
        grammar = grammar_from_format(request.json_format)
        return _as_stream(llm.create_completion(prompt=raw_prompt, stream=True, grammar=grammar, **kwargs))
    return _as_stream(
        llm.create_chat_completion(
            messages=llama_messages_from_request(request),  # type: ignore[arg-type]
            tools=request.tools or None,  # type: ignore[arg-type]
            response_format=response_format_from_format(request.json_format),  # type: ignore[arg-type]
            stream=True,
            **kwargs,
        )
    )


def _as_stream(result: object) -> Generator[Mapping[str, Any], None, None]:
    # With stream=True llama-cpp returns a generator; closing it is how generation stops early.
    if not isinstance(result, Generator):
        raise RuntimeError(f"llama-cpp returned {type(result).__name__} instead of a stream")
    return result


def _is_raw(request: ChatRequest) -> bool:
    # Raw prompts and fill-in-the-middle skip the chat template, as Ollama does.
    return request.kind == "completion" and (request.raw or bool(request.suffix))


def raw_prompt_tokens(llm: llama_cpp.Llama, prompt: str, suffix: str | None) -> list[int]:
    """The exact tokens of an untemplated completion: BOS if the model wants one, then the
    fill-in-the-middle layout when there is a suffix and the model has FIM tokens.

    Tokenizing here (rather than passing text and llama-cpp's `suffix=`) gives an exact prompt
    count and avoids llama-cpp 0.3's placeholder FIM token ids. A model without FIM tokens
    completes the prefix alone.
    """
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = [llm.token_bos()] if llm.token_bos() >= 0 and llama_cpp.llama_vocab_get_add_bos(vocab) else []
    fim = (
        llama_cpp.llama_vocab_fim_pre(vocab),
        llama_cpp.llama_vocab_fim_suf(vocab),
        llama_cpp.llama_vocab_fim_mid(vocab),
    )
    if suffix and min(fim) >= 0:
        pre, suf, mid = fim
        return [*bos, pre, *_tokens(llm, prompt, special=False), suf, *_tokens(llm, suffix, special=False), mid]
    tokens = [*bos, *_tokens(llm, prompt, special=True)]
    if not tokens:
        raise ValueError("empty prompt")
    return tokens


def _tokens(llm: llama_cpp.Llama, text: str, special: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special) if text else []


def _count_chat_prompt_tokens(model: LoadedLlama, request: ChatRequest) -> int:
    llm = model.llm
    messages = llama_messages_from_request(request)
    if model.formatter is None:
        # No template in the file: llama-cpp falls back to a built-in format; count the text.
        text = "\n".join(str(m.get("content") or "") for m in messages)
        return len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    prompt = model.formatter(messages=messages, tools=request.tools or None).prompt  # type: ignore[arg-type]
    # The template writes its own BOS token, exactly as llama-cpp tokenizes it.
    return len(llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))


def llama_messages_from_request(request: ChatRequest) -> list[dict[str, Any]]:
    """The request as llama-cpp (OpenAI-shaped) chat messages; a completion becomes a user turn.
    Templates index message['content'] directly, so it is always a string."""
    return openai_messages_from_request(request, string_content=True, tool_names=True, arguments="spaced")


def llama_kwargs_from_options(options: GenerationOptions | Mapping[str, Any], n_ctx: int) -> dict[str, Any]:
    """Sampling arguments for llama-cpp from generation options (unknown names are ignored).

    A mapping of Ollama-named options is parsed first, raising `InvalidRequest` as Ollama answers
    400; a request's options arrive typed (`ChatRequest.generation`), checked when it was parsed.
    """
    typed = GenerationOptions.of(options)
    kwargs: dict[str, Any] = {
        name: value if name in _INTEGER_SAMPLING else float(value) for name, value in typed.sampling().items()
    }
    kwargs["max_tokens"] = max_tokens_from_num_predict(typed.num_predict, n_ctx)
    if typed.stop:
        kwargs["stop"] = list(typed.stop)
    return kwargs


def max_tokens_from_num_predict(num_predict: int | None, n_ctx: int) -> int:
    """Ollama's num_predict (None/-1 no limit, -2 fill the context) as a bounded max_tokens."""
    limit = GenerationOptions(num_predict=num_predict).token_limit
    # Without a limit, llama-cpp trims n_ctx further to what fits after the prompt.
    return n_ctx if limit is None else min(limit, n_ctx)


def response_format_from_format(fmt: JsonFormat | str | dict[str, Any] | None) -> dict[str, Any] | None:
    json_format = json_format_from(fmt)
    if json_format is None:
        return None
    if json_format.schema is None:
        return {"type": "json_object"}
    return {"type": "json_object", "schema": json_format.schema}


def grammar_from_format(fmt: JsonFormat | str | dict[str, Any] | None) -> LlamaGrammar | None:
    """The same constraint as `response_format_from_format`, for raw completions."""
    response_format = response_format_from_format(fmt)
    if response_format is None:
        return None
    if "schema" in response_format:
        return LlamaGrammar.from_json_schema(json.dumps(response_format["schema"]), verbose=False)
    return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
