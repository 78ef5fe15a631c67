"""The embedding wire formats of both APIs, both directions, as pure converters.

Server side: parse `/api/embed`, `/api/embeddings` (Ollama's older form) and `/v1/embeddings`
bodies into an `EmbedRequest`, and write an `EmbedResult` back in each one's shape.
Client side: the bodies an Ollama or OpenAI-compatible embedding expert is sent, and their
answers read back into an `EmbedResult`.

Kept apart from ollama_protocol.py and openai_protocol.py (both about chat, and long already);
the rules follow Ollama's `server/routes.go` (`EmbedHandler`, `EmbeddingsHandler`),
`server/routes_openai.go`/`middleware/openai.go` (`EmbeddingsMiddleware`), `openai/openai.go`
(`ToEmbeddingList`) and openai-python's `CreateEmbeddingResponse` (PROTOCOL.md 1.8 and 2.7).
No Flask here.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from modules.embeddings import EmbedRequest, EmbedResult
from modules.errors import ExpertStreamBroken, InvalidRequest
from modules.protocol.ollama_protocol import keep_alive_seconds, model_from_body, require_object
from modules.protocol.openai_protocol import invalid_type
from modules.protocol.openai_protocol import require_object as openai_require_object

# Little-endian float32, what `encoding_format: "base64"` carries and openai-python decodes.
_FLOAT32_LE = np.dtype("<f4")
_ENCODING_FORMATS = ("float", "base64")


# ---------------------------------------------------------------------------------------------
# Server side: Ollama
# ---------------------------------------------------------------------------------------------


def embed_request_from_ollama(body: object) -> EmbedRequest:
    """A `/api/embed` body: `input` is a string or a list of strings; none (or "") embeds nothing."""
    fields = require_object(body)
    raw = fields.get("input")
    if raw is None:
        texts: list[str] = []
    elif isinstance(raw, str):
        # Ollama's empty request only loads the model: "" asks for no vector at all.
        texts = [raw] if raw else []
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        texts = list(raw)
    else:
        raise InvalidRequest("invalid input type")
    truncate = fields.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise InvalidRequest("truncate must be a boolean")
    return EmbedRequest(
        model=model_from_body(fields),
        texts=texts,
        truncate=truncate is not False,
        dimensions=_dimensions(fields.get("dimensions"), "dimensions must be a positive integer"),
        keep_alive=keep_alive_seconds(fields.get("keep_alive")),
        options=_ollama_options(fields),
    )


def embeddings_request_from_ollama(body: object) -> EmbedRequest:
    """A legacy `/api/embeddings` body: one `prompt`; an empty one embeds nothing."""
    fields = require_object(body)
    prompt = fields.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string")
    return EmbedRequest(
        model=model_from_body(fields),
        texts=[prompt] if prompt else [],
        keep_alive=keep_alive_seconds(fields.get("keep_alive")),
        options=_ollama_options(fields),
    )


def ollama_embed_json(result: EmbedResult, *, model: str) -> str:
    """The `/api/embed` answer as JSON text (vectors written by `_float32_rows`)."""
    return (f'{{"model":{_json(model)},"embeddings":{_float32_rows(result.vectors)},'
            f'"total_duration":{result.total_duration_ns},"load_duration":{result.load_duration_ns},'
            f'"prompt_eval_count":{result.prompt_tokens}}}')


def ollama_embeddings_json(result: EmbedResult) -> str:
    # ollama-python requires `embedding`; Ollama answers an empty prompt with an empty one.
    row = _float32_rows(result.vectors[:1])[1:-1] if len(result.vectors) else "[]"
    return f'{{"embedding":{row}}}'


def _ollama_options(fields: dict[str, Any]) -> dict[str, Any]:
    options = fields.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidRequest("options must be an object")
    return options


def _dimensions(value: object, message: str) -> int | None:
    # Ollama treats 0 as "all of them"; OpenAI refuses it, and so do we below 0.
    if value is None or value == 0 and not isinstance(value, bool):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(message)
    return value


# ---------------------------------------------------------------------------------------------
# Server side: OpenAI
# ---------------------------------------------------------------------------------------------


def embed_request_from_openai(body: object) -> tuple[EmbedRequest, str]:
    """A `/v1/embeddings` body and its `encoding_format` ("float" or "base64").

    `input` is a string, a list of strings, a token array or a list of token arrays; an empty
    list (or none) is refused, as Ollama's OpenAI layer does.
    """
    body = openai_require_object(body, "body")
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if not isinstance(encoding, str) or encoding.lower() not in _ENCODING_FORMATS:
        raise InvalidRequest(f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64'].")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    texts, tokens = _openai_input(body.get("input"))
    dimensions = _dimensions(body.get("dimensions"), "Invalid value for 'dimensions': expected a positive integer.")
    return EmbedRequest(model=model or None, texts=texts, tokens=tokens, dimensions=dimensions), encoding.lower()


def _openai_input(raw: object) -> tuple[list[str], list[list[int]] | None]:
    if isinstance(raw, str):
        return [raw], None
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("invalid input")
    if all(isinstance(item, str) for item in raw):
        return list(raw), None
    if all(_is_token(item) for item in raw):
        return [], [list(raw)]
    if all(isinstance(item, list) and item and all(_is_token(t) for t in item) for item in raw):
        return [], [list(item) for item in raw]
    raise InvalidRequest("invalid input: expected a string, a list of strings, or token arrays")


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def openai_embedding_list_json(result: EmbedResult, *, model: str, encoding_format: str) -> str:
    """The `/v1/embeddings` answer as JSON text: rows as float arrays or base64 strings."""
    if encoding_format == "base64":
        rows = [f'"{base64_from_vector(row)}"' for row in result.vectors]
    else:
        rows = [_float32_row(row) for row in result.vectors.tolist()]
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{row}}}' for i, row in enumerate(rows))
    tokens = result.prompt_tokens
    return (f'{{"object":"list","data":[{data}],"model":{_json(model)},'
            f'"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}')


def base64_from_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype=_FLOAT32_LE).tobytes()).decode("ascii")


def _float32_rows(vectors: np.ndarray) -> str:
    return "[" + ",".join(_float32_row(row) for row in vectors.tolist()) + "]"


def _float32_row(row: list[float]) -> str:
    # Nine significant digits give back exactly the float32 each value is (what Ollama's Go
    # encoder writes); Python's own float repr spends 17 on the float64 it widened to: a third
    # more bytes, and twice the time to write them (0.24 ms against 0.12 ms for 512 dimensions).
    return "[" + ",".join(f"{x:.9g}" for x in row) + "]"


def _json(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Client side: an embedding expert upstream
# ---------------------------------------------------------------------------------------------


def ollama_embed_body_from_request(request: EmbedRequest, model_name: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model_name, "input": request.texts, "truncate": request.truncate}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    if request.keep_alive is not None:
        body["keep_alive"] = request.keep_alive
    if request.options:
        body["options"] = request.options
    return body


def embed_result_from_ollama(body: object, count: int) -> EmbedResult:
    """An upstream `/api/embed` answer; `ExpertStreamBroken` when it is not one for `count` inputs."""
    if not isinstance(body, dict):
        raise ExpertStreamBroken("the embedding answer is not a JSON object")
    return EmbedResult(
        vectors=_matrix(body.get("embeddings"), count),
        prompt_tokens=_count(body.get("prompt_eval_count")),
        total_duration_ns=_count(body.get("total_duration")),
        load_duration_ns=_count(body.get("load_duration")),
    )


def openai_embed_body_from_request(request: EmbedRequest, model_name: str) -> dict[str, Any]:
    # Floats: every OpenAI-compatible server sends them; not all of them do base64.
    body: dict[str, Any] = {
        "model": model_name,
        "input": request.tokens if request.tokens is not None else request.texts,
        "encoding_format": "float",
    }
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return body


def embed_result_from_openai(body: object, count: int) -> EmbedResult:
    """An upstream `/v1/embeddings` answer (float or base64 rows, in any order of `index`)."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ExpertStreamBroken("the embedding answer has no data list")
    items = body["data"]
    try:
        ordered = sorted(items, key=lambda item: int(item.get("index", 0)))
        rows = [_row_from_openai(item.get("embedding")) for item in ordered]
    except (AttributeError, TypeError, ValueError) as exc:
        raise ExpertStreamBroken(f"the embedding answer is malformed ({type(exc).__name__})") from None
    usage = body.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    return EmbedResult(vectors=_matrix(rows, count), prompt_tokens=_count(usage.get("prompt_tokens")))


def _row_from_openai(value: object) -> object:
    if isinstance(value, str):
        try:
            return np.frombuffer(base64.b64decode(value, validate=True), dtype=_FLOAT32_LE).tolist()
        except (binascii.Error, ValueError):
            raise ValueError("bad base64 embedding") from None
    return value


def _matrix(rows: object, count: int) -> np.ndarray:
    if not isinstance(rows, list) or len(rows) != count:
        raise ExpertStreamBroken(f"the embedding answer has {_length(rows)} vectors for {count} inputs")
    if count == 0:
        return np.zeros((0, 0), dtype=np.float32)
    try:
        matrix = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise ExpertStreamBroken("the embedding answer holds vectors that are not lists of numbers") from None
    if matrix.ndim != 2 or matrix.shape[1] == 0 or not np.isfinite(matrix).all():
        raise ExpertStreamBroken("the embedding answer holds empty, ragged or non-finite vectors")
    return matrix


def _length(value: object) -> str:
    return str(len(value)) if isinstance(value, list) else "no"


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
