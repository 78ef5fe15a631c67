"""The embedding wire formats: requests in, answers out, and an upstream's answers read back."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from modules.protocol.embedding_protocol import (
    base64_from_vector,
    embed_request_from_ollama,
    embed_request_from_openai,
    embed_result_from_ollama,
    embed_result_from_openai,
    embeddings_request_from_ollama,
    ollama_embed_body_from_request,
    ollama_embed_json,
    ollama_embeddings_json,
    openai_embed_body_from_request,
    openai_embedding_list_json,
)
from modules.embeddings import EmbedRequest, EmbedResult, fit_dimensions
from modules.errors import ExpertStreamBroken, InvalidRequest

VECTORS = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)


@pytest.mark.parametrize(("raw", "texts"), [("hi", ["hi"]), ("", []), (None, []), (["a", "b"], ["a", "b"]), ([], [])])
def test_ollama_input_forms(raw: Any, texts: list[str]) -> None:
    request = embed_request_from_ollama({"model": "m", "input": raw})
    assert request.texts == texts and request.truncate and request.tokens is None


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "m", "input": [1]}, "invalid input type"),
    ({"model": "m", "input": {"a": 1}}, "invalid input type"),
    ({"model": "m", "input": "x", "truncate": 1}, "truncate must be a boolean"),
    ({"model": "m", "input": "x", "dimensions": "8"}, "dimensions must be a positive integer"),
    ({"model": "m", "input": "x", "dimensions": True}, "dimensions must be a positive integer"),
    ({"model": "m", "input": "x", "options": []}, "options must be an object"),
    ({"model": "m", "input": "x", "keep_alive": "soon"}, "keep_alive must be a duration"),
    ({"input": "x"}, "model is required"),
    (["not", "an", "object"], "request body must be a JSON object"),
])
def test_bad_ollama_bodies(body: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        embed_request_from_ollama(body)


def test_ollama_fields_are_kept() -> None:
    request = embed_request_from_ollama({"model": "m", "input": "x", "truncate": False, "dimensions": 4,
                                         "keep_alive": "1m", "options": {"num_ctx": 512}})
    assert (request.truncate, request.dimensions, request.keep_alive, request.options) == \
        (False, 4, 60.0, {"num_ctx": 512})
    assert embed_request_from_ollama({"model": "m", "input": "x", "dimensions": 0}).dimensions is None


def test_legacy_prompt_and_answer() -> None:
    assert embeddings_request_from_ollama({"model": "m", "prompt": "hi"}).texts == ["hi"]
    assert embeddings_request_from_ollama({"model": "m", "prompt": ""}).texts == []
    with pytest.raises(InvalidRequest, match="prompt must be a string"):
        embeddings_request_from_ollama({"model": "m", "prompt": ["hi"]})
    assert json.loads(ollama_embeddings_json(EmbedResult(VECTORS[:1]))) == {"embedding": pytest.approx([0.6, 0.8, 0.0])}
    assert json.loads(ollama_embeddings_json(EmbedResult(np.zeros((0, 0), dtype=np.float32)))) == {"embedding": []}


def test_ollama_embed_answer_shape() -> None:
    body = json.loads(ollama_embed_json(
        EmbedResult(VECTORS, prompt_tokens=7, total_duration_ns=5, load_duration_ns=1), model='le"moe'))
    assert list(body) == ["model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"]
    assert body["model"] == 'le"moe' and body["embeddings"][1] == [0.0, 0.0, 1.0] and body["prompt_eval_count"] == 7


def test_floats_are_written_as_the_exact_float32_values() -> None:
    rows = np.random.default_rng(7).standard_normal((3, 512)).astype(np.float32) * 1e-3
    text = ollama_embed_json(EmbedResult(rows), model="m")
    assert np.array_equal(np.array(json.loads(text)["embeddings"], dtype=np.float32), rows)
    # At most 9 significant digits a number (sign, point and exponent aside).
    numbers = text[text.index("[[") + 2: text.index("]]")].replace("],[", ",").split(",")
    assert max(len(number) for number in numbers) <= 15


@pytest.mark.parametrize(("raw", "texts", "tokens"), [
    ("hi", ["hi"], None),
    ("", [""], None),
    (["a", "b"], ["a", "b"], None),
    ([1, 2, 3], [], [[1, 2, 3]]),
    ([[1], [2, 3]], [], [[1], [2, 3]]),
])
def test_openai_input_forms(raw: Any, texts: list[str], tokens: list[list[int]] | None) -> None:
    request, encoding = embed_request_from_openai({"model": "m", "input": raw})
    assert (request.texts, request.tokens, encoding) == (texts, tokens, "float")
    assert request.count == len(tokens if tokens is not None else texts)


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "m", "input": []}, "invalid input"),
    ({"model": "m"}, "invalid input"),
    ({"model": "m", "input": ["a", 1]}, "invalid input"),
    ({"model": "m", "input": [[1], []]}, "invalid input"),
    ({"model": "m", "input": [-1]}, "invalid input"),
    ({"model": "m", "input": "x", "encoding_format": "hex"}, "Invalid value for 'encoding_format' = hex"),
    ({"model": 3, "input": "x"}, "Invalid type for 'model'"),
    ({"model": "m", "input": "x", "dimensions": -1}, "Invalid value for 'dimensions'"),
])
def test_bad_openai_bodies(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        embed_request_from_openai(body)


def test_openai_answer_in_float_and_little_endian_base64() -> None:
    result = EmbedResult(VECTORS, prompt_tokens=3)
    floats = json.loads(openai_embedding_list_json(result, model="lemoe", encoding_format="float"))
    assert list(floats) == ["object", "data", "model", "usage"] and floats["data"][1]["embedding"] == [0, 0, 1]
    assert floats["object"] == "list" and floats["model"] == "lemoe"
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["data"][0]["object"] == "embedding"
    b64 = json.loads(openai_embedding_list_json(result, model="lemoe", encoding_format="base64"))["data"][0]["embedding"]
    assert base64.b64decode(b64) == np.array([0.6, 0.8, 0.0], dtype="<f4").tobytes()


def test_upstream_bodies() -> None:
    request = EmbedRequest(model="x", texts=["a"], dimensions=4, keep_alive=30.0, options={"num_ctx": 8})
    assert ollama_embed_body_from_request(request, "nomic") == {
        "model": "nomic", "input": ["a"], "truncate": True, "dimensions": 4, "keep_alive": 30.0,
        "options": {"num_ctx": 8}}
    tokens = EmbedRequest(model="x", texts=[], tokens=[[1, 2]])
    assert openai_embed_body_from_request(tokens, "te3") == {"model": "te3", "input": [[1, 2]],
                                                             "encoding_format": "float"}


def test_upstream_answers_are_read_in_index_order_whatever_the_encoding() -> None:
    body = {"data": [{"index": 1, "embedding": base64_from_vector(VECTORS[1])},
                     {"index": 0, "embedding": [0.6, 0.8, 0.0]}], "usage": {"prompt_tokens": 4}}
    result = embed_result_from_openai(body, 2)
    assert np.allclose(result.vectors, VECTORS) and result.prompt_tokens == 4
    ollama = embed_result_from_ollama({"embeddings": VECTORS.tolist(), "prompt_eval_count": 2}, 2)
    assert np.allclose(ollama.vectors, VECTORS) and ollama.prompt_tokens == 2


@pytest.mark.parametrize("body", [
    {"embeddings": [[1.0]]},                        # one vector for two inputs
    {"embeddings": [[1.0], [1.0, 2.0]]},            # ragged
    {"embeddings": [["a"], ["b"]]},                 # not numbers
    {"embeddings": [[], []]},                       # empty vectors
    {"error": "model not found"},
    [1, 2],
])
def test_malformed_upstream_answers_are_expert_failures(body: Any) -> None:
    with pytest.raises(ExpertStreamBroken):
        embed_result_from_ollama(body, 2)
    with pytest.raises(ExpertStreamBroken):
        embed_result_from_openai({"data": [{"index": 0, "embedding": "***"}, {"index": 1}]}, 2)


def test_fit_dimensions_cuts_and_renormalises_but_never_pads() -> None:
    fitted = fit_dimensions(np.array([[3.0, 4.0, 12.0]], dtype=np.float32), 2)
    assert np.allclose(fitted, [[0.6, 0.8]])
    assert fit_dimensions(VECTORS, 10) is VECTORS and fit_dimensions(VECTORS, None) is VECTORS
