"""Generation options as typed values, checked in one place: where a request is parsed.

A `ChatRequest` carries its options as a mapping under Ollama's names (Ollama and OpenAI
upstreams forward it as it is, knobs LeMoE does not know included), and reads them through
`GenerationOptions.from_options`, which it runs once as it is built. So a bad value is refused
by the protocol adapter that builds the request, as a 400 in the client's protocol, before any
routing; backends only translate typed values into their engine's arguments. A backend that
refused an option itself would raise from inside the runner, which counts expert failures and
falls back: a client's mistake would bench a healthy expert and be answered by another one.

The same check guards the experts' default options at configuration load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modules.errors import InvalidRequest

__all__ = ["GenerationOptions", "JsonFormat", "json_format_from"]

# Options taken as any JSON number, under Ollama's names.
_NUMBERS = (
    "temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip
# Options taken as whole numbers; 128.0 counts as 128, as Ollama's Go option loader has it.
_INTEGERS = ("top_k", "seed", "num_predict", "num_ctx")
_SAMPLING = (*_NUMBERS, "top_k", "seed")


@dataclass(frozen=True)
class GenerationOptions:
    """The options backends act on. None means "not set": the engine's or expert's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Tokens to generate at most; Ollama's -1 (no limit) and -2 (fill the context) are kept
    # as they are, for each backend to map onto its own engine.
    num_predict: int | None = None
    num_ctx: int | None = None
    # Empty strings are dropped: they would stop every answer at once.
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Checked on construction, so that no GenerationOptions can hold a value of the wrong
        # type, however it was made; whole numbers and stop lists are normalised on the way.
        for name in _NUMBERS:
            _number(name, getattr(self, name))
        for name in _INTEGERS:
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        object.__setattr__(self, "stop", _stops(self.stop))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> GenerationOptions:
        """Typed options from Ollama-named ones; unknown names are ignored, as Ollama does.

        Raises `InvalidRequest` for a value of the wrong type.
        """
        # Ollama takes a lone stop string as a list of one.
        return cls(**{name: options.get(name) for name in (*_NUMBERS, *_INTEGERS)}, stop=_stops(options.get("stop")))

    @classmethod
    def of(cls, options: GenerationOptions | Mapping[str, Any]) -> GenerationOptions:
        """`options` as they are when typed already, else `from_options(options)`."""
        return options if isinstance(options, GenerationOptions) else cls.from_options(options)

    @property
    def token_limit(self) -> int | None:
        """The client's limit on generated tokens; None when there is none (num_predict unset,
        or Ollama's -1 "no limit" and -2 "fill the context", which 0 joins)."""
        return self.num_predict if self.num_predict is not None and self.num_predict > 0 else None

    def sampling(self) -> dict[str, float | int]:
        """The sampling options that are set, by Ollama name (num_predict, num_ctx and stop aside)."""
        return {name: value for name in _SAMPLING if (value := getattr(self, name)) is not None}


@dataclass(frozen=True)
class JsonFormat:
    """Ollama's `format`: the answer must be JSON, and match `schema` when there is one."""

    schema: dict[str, Any] | None = None


def json_format_from(fmt: JsonFormat | str | dict[str, Any] | None) -> JsonFormat | None:
    """`ChatRequest.format` ("json", a JSON schema object, or nothing) as a typed value; a typed
    one is returned as it is."""
    if isinstance(fmt, JsonFormat):
        return fmt
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return JsonFormat()
    if isinstance(fmt, dict):
        return JsonFormat(schema=fmt)
    raise InvalidRequest('format must be "json" or a JSON schema object')


def _number(name: str, value: object) -> None:
    # bool is an int in Python, but `true` is not a temperature.
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InvalidRequest(f"option '{name}' must be a number")


def _integer(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"option '{name}' must be a number")
    if isinstance(value, float) and not value.is_integer():
        raise InvalidRequest(f"option '{name}' must be a whole number")
    return int(value)


def _stops(value: object) -> tuple[str, ...]:
    if isinstance(value, tuple):
        value = list(value)
    if not value:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("option 'stop' must be a string or a list of strings")
    return tuple(s for s in stops if s)
