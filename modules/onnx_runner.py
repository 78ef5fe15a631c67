"""Local ONNX experts: onnxruntime-genai models borrowed from the model pool.

An ONNX expert's `model_path` names a folder under models/ in onnxruntime-genai's layout
(`genai_config.json`, the `.onnx` decoder, `tokenizer.json` / `tokenizer_config.json`), as the
genai model builder writes it. One model is loaded per folder and shared by every expert naming
it; as with GGUF, one answer at a time is generated per model, under the model's lock.
(That lease and lock are `local_backend.PooledLocalBackend`'s, shared with GGUF.)

The answer is streamed token by token: the prompt is rendered with the model's own chat template
(a plain "role: content" layout when it has none), then the generator is stepped one token at a
time and each token is decoded through a tokenizer stream, which holds back the bytes of a
character split over several tokens. Stop strings are cut here, since genai has no such option;
`format` (JSON or a JSON schema) is enforced with genai's guidance. Tool definitions reach the
chat template, but tool calls are not parsed out of the text.

Every onnxruntime-genai exception (it raises RuntimeError for nearly everything) is translated to
an `ExpertError` in `map_onnx_errors`: `ExpertUnavailable` when the model cannot be loaded,
`ExpertStreamBroken` when generation fails.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime_genai as og  # type: ignore[import-untyped]

from modules.blocking import run_blocking
from modules.chat_types import ChatEvent, ChatRequest, Done, TextDelta, Usage
from modules.errors import (
    ExpertError,
    ExpertStreamBroken,
    ExpertUnavailable,
    InvalidRequest,
)
from modules.generation_options import GenerationOptions, JsonFormat, json_format_from
from modules.local_backend import PooledLocalBackend, map_library_errors
from modules.protocol.openai_upstream import openai_messages_from_request

# What onnxruntime-genai raises on bad folders, bad options or failed runs.
ONNX_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError, MemoryError)
GENAI_CONFIG = "genai_config.json"

# The sampling options genai has, under Ollama's names; the ones it names otherwise, and the ones
# it wants as ints (it takes the others as floats).
_SEARCH_OPTIONS = ("temperature", "top_p", "top_k", "seed", "repeat_penalty")
_GENAI_NAMES = {"seed": "random_seed", "repeat_penalty": "repetition_penalty"}
_INTEGER_SEARCH = ("top_k", "seed")


@dataclass(eq=False)
class LoadedOnnx:
    """What the pool keeps for one ONNX model folder."""

    model: og.Model
    tokenizer: og.Tokenizer
    size_bytes: int
    context_length: int
    eos_token_ids: frozenset[int]
    # False when the tokenizer has no chat template; prompts then use a plain layout.
    has_chat_template: bool
    lock: threading.Lock = field(default_factory=threading.Lock)


def map_onnx_errors(failure: type[ExpertError], what: str) -> AbstractContextManager[None]:
    """Re-raise an onnxruntime-genai exception as `failure`; the message is for the log only."""
    return map_library_errors(ONNX_ERRORS, failure, what)


def load_onnx(model_dir: Path) -> LoadedOnnx:
    """Load an onnxruntime-genai model folder (raises the library's own exceptions)."""
    config_path = model_dir / GENAI_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {GENAI_CONFIG}")
    genai_config = json.loads(config_path.read_text(encoding="utf-8"))
    model = run_blocking(og.Model, str(model_dir))
    tokenizer = og.Tokenizer(model)
    return LoadedOnnx(
        model=model,
        tokenizer=tokenizer,
        size_bytes=sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()),
        context_length=int(genai_config["model"]["context_length"]),
        eos_token_ids=frozenset(int(t) for t in tokenizer.eos_token_ids),
        has_chat_template=_has_chat_template(tokenizer),
    )


def _has_chat_template(tokenizer: og.Tokenizer) -> bool:
    # genai offers no way to ask; rendering a one-line conversation tells.
    try:
        tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "x"}]), add_generation_prompt=True)
    except RuntimeError:
        return False
    return True


@dataclass(frozen=True)
class _Plan:
    """One request's generation settings in genai's terms, worked out before the model is leased."""

    search: dict[str, Any]
    guidance: tuple[str, str] | None
    stops: list[str]
    num_predict: int | None


class OnnxBackend(PooledLocalBackend[LoadedOnnx, _Plan]):
    """A `Backend` that answers with a local ONNX model through onnxruntime-genai.

    Its `model_path` is the model's folder.
    """

    library_errors = ONNX_ERRORS

    def _plan(self, request: ChatRequest) -> _Plan:
        options = request.generation
        return _Plan(
            search=search_options_from_options(options),
            guidance=guidance_from_format(request.json_format),
            stops=stops_from_options(options),
            num_predict=num_predict_from_options(options),
        )

    def _load(self) -> LoadedOnnx:
        return load_onnx(self.model_path)

    def _generate(
        self, model: LoadedOnnx, request: ChatRequest, plan: _Plan, started_ns: int, load_ns: int
    ) -> Iterator[ChatEvent]:
        return _generate(model, request, plan, started_ns, load_ns)


def _generate(
    model: LoadedOnnx, request: ChatRequest, plan: _Plan, started_ns: int, load_ns: int
) -> Iterator[ChatEvent]:
    """Stream one answer from a model whose lock the caller holds."""
    with map_onnx_errors(ExpertStreamBroken, "starting generation"):
        prompt_ids = model.tokenizer.encode(prompt_from_request(model, request))
        max_length = max_length_from_num_predict(plan.num_predict, len(prompt_ids), model.context_length)
        params = og.GeneratorParams(model.model)
        params.set_search_options(**plan.search, max_length=max_length)
        if plan.guidance is not None:
            params.set_guidance(*plan.guidance)
        generator = og.Generator(model.model, params)
        eval_started = time.perf_counter_ns()
        run_blocking(generator.append_tokens, prompt_ids)
        decoder = model.tokenizer.create_stream()
    stopper = StopScanner(plan.stops)
    sampled = 0
    finish = "length"
    first_token_at: int | None = None
    while True:
        with map_onnx_errors(ExpertStreamBroken, "generating"):
            if generator.is_done():
                break
            run_blocking(generator.generate_next_token)
            token = int(generator.get_next_tokens()[0])
            text = decoder.decode(token) if token not in model.eos_token_ids else ""
        first_token_at = first_token_at or time.perf_counter_ns()
        sampled += 1
        if token in model.eos_token_ids:
            finish = "stop"
            break
        visible = stopper.feed(text)
        if visible:
            yield TextDelta(visible)
        if stopper.stopped:
            finish = "stop"
            break
    rest = stopper.flush()
    if rest:
        yield TextDelta(rest)
    done_at = time.perf_counter_ns()
    first_token_at = first_token_at or done_at
    yield Done(
        done_reason="stop" if finish == "stop" else "length",
        usage=Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=sampled,
            total_duration_ns=done_at - started_ns,
            load_duration_ns=load_ns,
            prompt_eval_duration_ns=first_token_at - eval_started,
            eval_duration_ns=done_at - first_token_at,
        ),
    )


def prompt_from_request(model: LoadedOnnx, request: ChatRequest) -> str:
    """The text the model reads: the chat template applied, or a raw completion prompt as is."""
    if request.kind == "completion" and request.raw:
        if not request.prompt:
            raise InvalidRequest("empty prompt")
        return request.prompt
    messages = onnx_messages_from_request(request)
    if not model.has_chat_template:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    tools = json.dumps(request.tools) if request.tools else None
    return str(model.tokenizer.apply_chat_template(json.dumps(messages), tools=tools, add_generation_prompt=True))


def onnx_messages_from_request(request: ChatRequest) -> list[dict[str, Any]]:
    """The conversation as chat-template messages; a (non-raw) completion becomes a user turn.
    Tool-call arguments stay objects: the template serialises them itself."""
    return openai_messages_from_request(request, string_content=True, tool_names=True, arguments="object")


def search_options_from_options(options: GenerationOptions | Mapping[str, Any]) -> dict[str, Any]:
    """genai search options from generation options (unknown names are ignored, as Ollama does).

    A mapping of Ollama-named options is parsed first, raising `InvalidRequest`; a request's
    arrive typed. A temperature of 0 means greedy.
    """
    sampling = GenerationOptions.of(options).sampling()
    search: dict[str, Any] = {}
    for name in _SEARCH_OPTIONS:
        if name in sampling:
            value = sampling[name]
            search[_GENAI_NAMES.get(name, name)] = int(value) if name in _INTEGER_SEARCH else float(value)
    if "temperature" in search:
        search["do_sample"] = search["temperature"] > 0
        if not search["do_sample"]:
            del search["temperature"]
    return search


def stops_from_options(options: GenerationOptions | Mapping[str, Any]) -> list[str]:
    return list(GenerationOptions.of(options).stop)


def num_predict_from_options(options: GenerationOptions | Mapping[str, Any]) -> int | None:
    """Ollama's num_predict as a token limit; None (also for -1 and -2) means fill the context."""
    return GenerationOptions.of(options).token_limit


def max_length_from_num_predict(num_predict: int | None, prompt_tokens: int, context_length: int) -> int:
    """genai's max_length, which counts the prompt and the answer together."""
    if prompt_tokens >= context_length:
        # This expert cannot read the conversation at all; the fallback expert may.
        raise ExpertUnavailable(f"prompt of {prompt_tokens} tokens does not fit a context of {context_length}")
    if num_predict is None:
        return context_length
    return min(prompt_tokens + num_predict, context_length)


def guidance_from_format(fmt: JsonFormat | str | dict[str, Any] | None) -> tuple[str, str] | None:
    """genai guidance (kind, data) for Ollama's `format`: "json" or a JSON schema object."""
    json_format = json_format_from(fmt)
    if json_format is None:
        return None
    return ("json_schema", json.dumps(json_format.schema if json_format.schema is not None else {"type": "object"}))


class StopScanner:
    """Cuts streamed text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that can be shown now."""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            visible, self._pending, self.stopped = self._pending[: min(hits)], "", True
            return visible
        keep = self._held_back_length()
        cut = len(self._pending) - keep
        visible, self._pending = self._pending[:cut], self._pending[cut:]
        return visible

    def flush(self) -> str:
        """What was held back, once the answer has ended without a stop string."""
        rest, self._pending = self._pending, ""
        return rest

    def _held_back_length(self) -> int:
        # The longest tail of the pending text that some stop string starts with.
        for size in range(min(len(self._pending), max((len(s) for s in self._stops), default=0)), 0, -1):
            tail = self._pending[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
