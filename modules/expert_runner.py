"""Run a request on an expert, and on the fallback expert when the first one fails.

The runner only knows the `Backend` interface. It owns the failure semantics:
- a failure before the first event (streaming) or anywhere (non-streaming) re-runs the request on
  the fallback expert, silently for the client, with an `[Auto-Correction]` log line;
- a failure after events have gone out is logged and re-raised, so the protocol layer can end
  the stream with an error event in the client's protocol;
- when even the fallback expert fails, `ServiceUnavailable` (503) is raised, and so it is when
  the fallback expert cannot take the request (images for a text-only model, tools, a prompt
  longer than its context): a refusal in the client's protocol, not a wrong answer;
- a `RequestError` a backend raises (the client's mistake, e.g. an option it cannot take) is
  no failure: it reaches the client as it is, with no fallback and no strike;
- an expert that keeps failing is benched (`ExpertHealth`): while its cool-down lasts, its
  requests go straight to the fallback expert.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

from modules.backend import Backend
from modules.capabilities import abilities_of, lacking_fallback_message, request_needs
from modules.chat_types import ChatEvent, ChatRequest, Done, Message
from modules.config_manager import AppConfig, ExpertConfig
from modules.errors import ExpertError, ExpertUnavailable, RequestError, ServiceUnavailable
from modules.expert_health import ExpertHealth
from modules.logger import get_logger
from modules.model_pool import ModelPool

log = get_logger("runner")


@dataclass
class ExpertRun:
    """A started answer: who is answering, and the events (the first one already fetched)."""

    expert: ExpertConfig
    events: Iterator[ChatEvent]
    # Set when the chosen expert failed and the fallback expert answers instead.
    fallback_cause: str | None = None

    def close(self) -> None:
        """Stop the expert's work (the client went away or the answer is complete)."""
        close = getattr(self.events, "close", None)
        if close is not None:
            close()


class _Prepended(Iterator[ChatEvent]):
    """An already-fetched first event followed by the rest; `close()` reaches the backend even
    when nothing was consumed yet (a generator that never started ignores close())."""

    def __init__(self, first: ChatEvent, rest: Iterator[ChatEvent]) -> None:
        self._first: ChatEvent | None = first
        self._rest = rest

    def __next__(self) -> ChatEvent:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return next(self._rest)

    def close(self) -> None:
        self._first = None
        close = getattr(self._rest, "close", None)
        if close is not None:
            close()


class ExpertRunner:
    def __init__(self, config: AppConfig, backends: dict[int, Backend], health: ExpertHealth | None = None) -> None:
        self._config = config
        self._backends = backends
        self._fallback = config.fallback_expert
        self._fallback_abilities = abilities_of(self._fallback, config.local_models)
        self._health = health or ExpertHealth(config.server.expert_failures_before_cooldown,
                                              config.server.expert_cooldown_seconds)

    def start(self, expert: ExpertConfig, request: ChatRequest) -> ExpertRun:
        """Start a streamed answer; falls back if `expert` fails before its first event."""
        cause = self._benched_cause(expert, request)
        if cause is None:
            try:
                return ExpertRun(expert, self._primed(expert, request))
            except ExpertError as exc:
                cause = self._auto_correct(expert, exc, request)
        try:
            return ExpertRun(self._fallback, self._primed(self._fallback, request), fallback_cause=cause)
        except ExpertError as exc:
            log.error("fallback expert '%s' failed too: %s", self._fallback.label, exc)
            raise ServiceUnavailable("no expert is available to answer right now", retry_after=5) from exc

    def collect(self, expert: ExpertConfig, request: ChatRequest) -> tuple[ExpertConfig, list[ChatEvent], str | None]:
        """Run to completion (non-streaming); any failure re-runs the whole request on the fallback."""
        cause = self._benched_cause(expert, request)
        if cause is None:
            try:
                return expert, list(self._watched(expert, request)), None
            except ExpertError as exc:
                cause = self._auto_correct(expert, exc, request)
        try:
            return self._fallback, list(self._watched(self._fallback, request)), cause
        except ExpertError as exc:
            log.error("fallback expert '%s' failed too: %s", self._fallback.label, exc)
            raise ServiceUnavailable("no expert is available to answer right now", retry_after=5) from exc

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()

    def backend_for(self, expert: ExpertConfig) -> Backend:
        """The backend serving `expert` (for load/unload probes, which run no answer)."""
        return self._backends[expert.id]

    def _primed(self, expert: ExpertConfig, request: ChatRequest) -> Iterator[ChatEvent]:
        events = self._watched(expert, request)
        first = next(events, None)
        if first is None:
            raise ExpertUnavailable("the expert ended its answer without any event")
        return _Prepended(first, events)

    def _watched(self, expert: ExpertConfig, request: ChatRequest) -> Iterator[ChatEvent]:
        """Run `expert` and pass its events through; log failures and timing; insist on a final
        Done; keep the expert's health record. A client that goes away (GeneratorExit) is
        neither a failure nor a success."""
        started = time.monotonic()
        done = False
        events: Iterator[ChatEvent] | None = None
        try:
            # Called in here so that a backend failing as it starts counts like any other failure.
            events = self.backend_for(expert).stream_chat(request_for_expert(expert, request))
            for event in events:
                done = isinstance(event, Done)
                yield event
            if not done:
                raise ExpertUnavailable("the expert's answer ended without a final event")
        except ExpertError as exc:
            log.warning("expert '%s' failed after %.2fs: %s", expert.label, time.monotonic() - started, exc)
            self._record_failure(expert, exc)
            raise
        except RequestError:
            # The client's mistake (a bad option, say): the expert is not at fault, and another
            # expert would refuse it too, so it goes back to the client as it is.
            raise
        except Exception as exc:  # a backend bug must look like a failed expert, not a 500
            log.exception("expert '%s' raised unexpectedly", expert.label)
            failure = ExpertUnavailable(f"unexpected {type(exc).__name__}")
            self._record_failure(expert, failure)
            raise failure from exc
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        if expert.id != self._fallback.id:
            self._health.record_success(expert.label)
        log.debug("expert '%s' answered in %.2fs", expert.label, time.monotonic() - started)

    def _record_failure(self, expert: ExpertConfig, exc: ExpertError) -> None:
        # The fallback is never benched: with it gone there would be nobody left to answer.
        if expert.id != self._fallback.id:
            self._health.record_failure(expert.label, f"{type(exc).__name__}: {exc}")

    def _benched_cause(self, expert: ExpertConfig, request: ChatRequest) -> str | None:
        """Why `expert` is skipped without being tried (it is in its cool-down), else None."""
        if expert.id == self._fallback.id or not self._health.is_benched(expert.label):
            return None
        self._require_capable_fallback(expert, "is in cool-down", request)
        log.info("[Auto-Correction] expert '%s' is in cool-down; answering with fallback '%s'",
                 expert.label, self._fallback.label)
        return "in cool-down"

    def _auto_correct(self, expert: ExpertConfig, exc: ExpertError, request: ChatRequest) -> str:
        cause = f"{type(exc).__name__}: {exc}"
        if expert.id == self._fallback.id:
            log.error("fallback expert '%s' failed: %s", expert.label, cause)
            raise ServiceUnavailable("no expert is available to answer right now", retry_after=5) from exc
        self._require_capable_fallback(expert, f"failed ({cause})", request, exc)
        log.warning("[Auto-Correction] expert '%s' failed (%s); answering with fallback '%s'",
                    expert.label, cause, self._fallback.label)
        return cause

    def _require_capable_fallback(self, expert: ExpertConfig, why: str, request: ChatRequest,
                                  exc: ExpertError | None = None) -> None:
        """Refuse to fall back to a fallback expert that cannot take `request`."""
        missing = self._fallback_abilities.missing(request_needs(request))
        if not missing:
            return
        log.warning("expert '%s' %s and fallback '%s' cannot take this request (lacks %s); refusing it",
                    expert.label, why, self._fallback.label, ", ".join(missing))
        raise ServiceUnavailable(lacking_fallback_message(missing), retry_after=5) from exc


def request_for_expert(expert: ExpertConfig, request: ChatRequest) -> ChatRequest:
    """Apply the expert's defaults: its options under the request's own, its system prompt when
    the conversation has none."""
    if not expert.options and not expert.system_prompt:
        return request
    options = {**expert.options, **request.options}
    messages = request.messages
    if expert.system_prompt and not any(m.role == "system" for m in messages):
        messages = [Message(role="system", content=expert.system_prompt), *messages]
    return dataclasses.replace(request, options=options, messages=messages)


def build_runner(config: AppConfig, pool: ModelPool) -> ExpertRunner:
    from modules.backend_registry import build_backends

    return ExpertRunner(config, build_backends(config, pool))

