"""Embeddings through the real server with real clients: ollama's `embed()`/`embeddings()`,
openai's `embeddings.create` (float and base64), langchain-ollama's `OllamaEmbeddings`, and
Open WebUI's RAG calls as its own source makes them.

`lemoe_server` has no embedding expert: the packaged encoder answers (the out-of-the-box case).
`embed_server` adds embedding experts on the loopback fake upstream (whose vectors the tests can
predict, `fake_vector`), one on a closed port with declared dimensions (the local encoder may
stand in) and one without (it may not).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np
import ollama
import openai
import pytest
import requests

from tests.contract.conftest import write_test_project
from tests.fakes.fake_upstream import FakeUpstream, fake_vector, reserve_closed_port
from tests.live_server import LiveServer, live_server

TEXTS = ["How do I sort a list in Python?", "¿Cómo ordeno una lista en Python?", "The weather is sunny today."]
USE_DIMENSIONS = 512


def unit(vector: list[float]) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float64)
    return array / np.linalg.norm(array)


def cosine(a: list[float], b: list[float]) -> float:
    return float(unit(a) @ unit(b))


@pytest.fixture(scope="module")
def embed_server(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    project = tmp_path_factory.mktemp("project-embed")
    with reserve_closed_port() as closed_port:
        closed = f"http://127.0.0.1:{closed_port}"
        config_path = write_test_project(project, fake_upstream.url, closed)
        experts_path = project / "config" / "experts.json"
        experts = json.loads(experts_path.read_text())

        def embedder(i: int, label: str, backend: str, url: str, **extra: object) -> dict:
            return {"id": i, "label": label, "type": backend, "url": url, "model_name": f"{label}-model", **extra}

        experts["experts"] += [
            embedder(20, "vec-ollama", "ollama", fake_upstream.url, kind="embedding", dimensions=8),
            # Declared by capability rather than kind.
            embedder(21, "vec-openai", "openai", fake_upstream.url, capabilities=["embedding"]),
            embedder(22, "vec-down", "ollama", closed, kind="embedding", dimensions=64),
            embedder(23, "vec-down-unsized", "openai", closed, kind="embedding"),
        ]
        experts_path.write_text(json.dumps(experts))
        with live_server(config_path, project) as server:
            yield server


# --- out of the box: the packaged encoder ---------------------------------------------------------


def test_ollama_embed_gives_unit_vectors_of_the_packaged_encoder_in_input_order(lemoe_server: LiveServer) -> None:
    client = ollama.Client(host=lemoe_server.url)
    batch = client.embed(model="lemoe", input=TEXTS)
    assert batch.model == "lemoe" and len(batch.embeddings) == len(TEXTS)
    assert all(len(v) == USE_DIMENSIONS for v in batch.embeddings)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-3 for v in batch.embeddings)
    assert batch.prompt_eval_count and batch.total_duration
    # Each row is its own text's vector: order kept, same as embedding it alone.
    for text, row in zip(TEXTS, batch.embeddings):
        assert cosine(client.embed(model="use-multilingual", input=text).embeddings[0], row) > 0.9999
    # A multilingual encoder: the Spanish question is closer to the English one than the weather is.
    assert cosine(batch.embeddings[0], batch.embeddings[1]) > cosine(batch.embeddings[0], batch.embeddings[2]) + 0.2


def test_ollama_legacy_embeddings_matches_embed(lemoe_server: LiveServer) -> None:
    client = ollama.Client(host=lemoe_server.url)
    legacy = client.embeddings(model="lemoe", prompt=TEXTS[0]).embedding
    assert len(legacy) == USE_DIMENSIONS
    assert cosine(legacy, client.embed(model="lemoe", input=TEXTS[0]).embeddings[0]) > 0.9999
    assert client.embeddings(model="lemoe", prompt="").embedding == []


def test_openai_client_default_base64_and_float_agree(lemoe_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=lemoe_server.url + "/v1", api_key="unused", max_retries=0)
    raw = client.embeddings.with_raw_response.create(model="lemoe", input=TEXTS)
    # openai-python asks for base64 when the caller names no format (resources/embeddings.py).
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"
    assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)
    decoded = raw.parse()
    floats = client.embeddings.create(model="lemoe", input=TEXTS, encoding_format="float")
    assert [d.index for d in decoded.data] == [0, 1, 2] and decoded.object == "list"
    for a, b in zip(decoded.data, floats.data):
        assert len(a.embedding) == USE_DIMENSIONS and np.allclose(a.embedding, b.embedding, atol=1e-6)
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
    single = client.embeddings.create(model="lemoe", input=TEXTS[2])
    assert len(single.data) == 1 and cosine(single.data[0].embedding, floats.data[2].embedding) > 0.9999


def test_the_same_text_gets_the_same_vector_on_every_route(lemoe_server: LiveServer) -> None:
    url = lemoe_server.url
    via_embed = requests.post(url + "/api/embed", json={"model": "lemoe", "input": TEXTS[1]}, timeout=30).json()
    via_legacy = requests.post(url + "/api/embeddings", json={"model": "lemoe", "prompt": TEXTS[1]}, timeout=30).json()
    via_openai = requests.post(url + "/v1/embeddings", json={"model": "lemoe", "input": TEXTS[1]}, timeout=30).json()
    via_b64 = requests.post(url + "/v1/embeddings", json={"input": [TEXTS[1]], "encoding_format": "base64"},
                            timeout=30).json()
    b64 = np.frombuffer(base64.b64decode(via_b64["data"][0]["embedding"]), dtype="<f4").tolist()
    vectors = [via_embed["embeddings"][0], via_legacy["embedding"], via_openai["data"][0]["embedding"], b64]
    assert all(cosine(vectors[0], v) > 0.99999 for v in vectors[1:])


def test_dimensions_keeps_the_first_components_renormalised(lemoe_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=lemoe_server.url + "/v1", api_key="unused", max_retries=0)
    full = client.embeddings.create(model="lemoe", input=TEXTS[0], encoding_format="float").data[0].embedding
    short = client.embeddings.create(model="lemoe", input=TEXTS[0], dimensions=64).data[0].embedding
    assert len(short) == 64 and abs(np.linalg.norm(short) - 1) < 1e-3
    assert cosine(short, full[:64]) > 0.9999
    reply = ollama.Client(host=lemoe_server.url).embed(model="lemoe", input=TEXTS[0], dimensions=32)
    assert len(reply.embeddings[0]) == 32


def test_langchain_ollama_embeddings(lemoe_server: LiveServer) -> None:
    from langchain_ollama import OllamaEmbeddings

    embeddings = OllamaEmbeddings(model="lemoe", base_url=lemoe_server.url)
    documents = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query(TEXTS[0])
    assert len(documents) == 3 and all(len(d) == USE_DIMENSIONS for d in documents)
    assert cosine(query, documents[0]) > 0.9999 and cosine(query, documents[2]) < 0.9


def test_open_webui_rag_calls(lemoe_server: LiveServer) -> None:
    """Open WebUI's RAG, as backend/open_webui/retrieval/utils.py (open-webui/open-webui @0013f5c)
    makes it: `generate_ollama_batch_embeddings` posts {"input": texts, "model": model} (plus the
    RAG_EMBEDDING_PREFIX_FIELD_NAME field when configured) to {url}/api/embed with
    `Authorization: Bearer {key}` (an empty key by default) and reads `embeddings`;
    `generate_openai_batch_embeddings` posts the same body to {url}/embeddings under its /v1 base
    and reads `[elem["embedding"] for elem in data["data"]]`."""
    headers = {"Content-Type": "application/json", "Authorization": "Bearer "}
    body = {"input": TEXTS, "model": "use-multilingual", "prefix": "query: "}
    ollama_reply = requests.post(f"{lemoe_server.url}/api/embed", headers=headers, json=body, timeout=30)
    ollama_reply.raise_for_status()
    openai_reply = requests.post(f"{lemoe_server.url}/v1/embeddings", headers=headers,
                                 json={"input": TEXTS, "model": "lemoe"}, timeout=30)
    openai_reply.raise_for_status()
    via_ollama = ollama_reply.json()["embeddings"]
    via_openai = [elem["embedding"] for elem in openai_reply.json()["data"]]
    assert len(via_ollama) == len(via_openai) == 3
    assert all(cosine(a, b) > 0.99999 for a, b in zip(via_ollama, via_openai))


def test_embedding_models_are_listed_with_the_embedding_capability(lemoe_server: LiveServer) -> None:
    tags = {m["name"]: m for m in requests.get(lemoe_server.url + "/api/tags", timeout=10).json()["models"]}
    assert tags["use-multilingual:latest"]["capabilities"] == ["embedding"]
    assert all("embedding" not in m["capabilities"] for name, m in tags.items() if name != "use-multilingual:latest")
    shown = ollama.Client(host=lemoe_server.url).show("use-multilingual")
    assert shown.capabilities == ["embedding"]
    assert shown.modelinfo is not None and shown.modelinfo["use.embedding_length"] == USE_DIMENSIONS
    listed = {m.id for m in openai.OpenAI(base_url=lemoe_server.url + "/v1", api_key="x").models.list()}
    assert "use-multilingual:latest" in listed


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/api/embed", {"model": "lemoe", "input": [1, 2]}, "invalid input type"),
    ("/api/embed", {"model": "lemoe", "input": "x", "truncate": "yes"}, "truncate must be a boolean"),
    ("/api/embed", {"input": "x"}, "model is required"),
    ("/api/embed", {"model": "lemoe", "input": "x", "dimensions": -3}, "dimensions must be a positive integer"),
    ("/api/embed", {"model": "coder", "input": "x"}, '"coder" does not support embeddings'),
    ("/api/embed", {"model": "lemoe", "input": "x" * 9000, "truncate": False}, "exceeds the context length"),
    ("/api/embeddings", {"model": "lemoe", "prompt": 3}, "prompt must be a string"),
    ("/api/chat", {"model": "use-multilingual", "messages": [{"role": "user", "content": "hi"}], "stream": False},
     '"use-multilingual" does not support chat'),
])
def test_bad_ollama_requests_are_400_in_ollama_shape(lemoe_server: LiveServer, path: str, body: dict,
                                                      message: str) -> None:
    reply = requests.post(lemoe_server.url + path, json=body, timeout=30)
    assert reply.status_code == 400 and reply.headers["Content-Type"].startswith("application/json")
    assert message in reply.json()["error"]


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "lemoe", "input": []}, "invalid input"),
    ({"model": "lemoe"}, "invalid input"),
    ({"model": "lemoe", "input": "x", "encoding_format": "int8"}, "Invalid value for 'encoding_format'"),
    ({"model": "lemoe", "input": [[1, 2], [3]]}, "takes text, not token arrays"),
    ({"model": "lemoe", "input": ["a", 1]}, "invalid input"),
])
def test_bad_openai_requests_are_400_openai_errors(lemoe_server: LiveServer, body: dict, message: str) -> None:
    client = openai.OpenAI(base_url=lemoe_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.with_raw_response.create(**body) if "input" in body else \
            client.post("/embeddings", body=body, cast_to=object)
    assert message in info.value.message and info.value.body["type"] == "invalid_request_error"


def test_a_long_text_is_cut_to_its_beginning_by_default(lemoe_server: LiveServer) -> None:
    head = "Python lists can be sorted with sorted() or list.sort(). " * 150  # 8,550 characters
    client = ollama.Client(host=lemoe_server.url)
    long_vector = client.embed(model="lemoe", input=head + "Completely different ending " * 100).embeddings[0]
    assert cosine(long_vector, client.embed(model="lemoe", input=head[:8192]).embeddings[0]) > 0.9999


# --- embedding experts ----------------------------------------------------------------------------


def test_an_ollama_embedding_expert_answers_its_name(embed_server: LiveServer, fake_upstream: FakeUpstream) -> None:
    client = ollama.Client(host=embed_server.url)
    reply = client.embed(model="vec-ollama", input=TEXTS[:2], keep_alive="5m")
    assert reply.embeddings == [pytest.approx(fake_vector(t, 8), abs=1e-6) for t in TEXTS[:2]]
    sent = fake_upstream.requests_to("/api/embed")[-1].json
    assert sent["model"] == "vec-ollama-model" and sent["input"] == TEXTS[:2] and sent["keep_alive"] == 300


def test_an_openai_embedding_expert_rows_come_back_in_input_order(embed_server: LiveServer,
                                                                  fake_upstream: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.embeddings.with_raw_response.create(model="vec-openai", input=TEXTS)
    assert reply.headers["X-LeMoE-Expert"] == "vec-openai"
    got = [d.embedding for d in reply.parse().data]
    assert got == [pytest.approx(fake_vector(t, 8), abs=1e-6) for t in TEXTS]
    tokens = client.embeddings.create(model="vec-openai", input=[[101, 102], [7]])
    assert len(tokens.data) == 2
    assert fake_upstream.requests_to("/v1/embeddings")[-1].json["input"] == [[101, 102], [7]]


def test_lemoe_picks_the_first_embedding_expert(embed_server: LiveServer) -> None:
    reply = requests.post(embed_server.url + "/api/embed", json={"model": "lemoe", "input": "hi"}, timeout=30)
    assert reply.headers["X-LeMoE-Expert"] == "vec-ollama"
    assert reply.json()["embeddings"][0] == pytest.approx(fake_vector("hi", 8), abs=1e-6)
    tags = {m["name"]: m["capabilities"] for m in requests.get(embed_server.url + "/api/tags", timeout=10).json()["models"]}
    assert tags["vec-ollama:latest"] == tags["vec-openai:latest"] == ["embedding"]


def test_a_failed_expert_with_known_dimensions_falls_back_silently(embed_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.embeddings.with_raw_response.create(model="vec-down", input=TEXTS[0])
    assert reply.status_code == 200 and reply.headers["X-LeMoE-Expert"] == "use-multilingual"
    vector = reply.parse().data[0].embedding
    assert len(vector) == 64 and abs(np.linalg.norm(vector) - 1) < 1e-3
    assert "[Auto-Correction] embedding expert 'vec-down'" in embed_server.log_text()


def test_a_failed_expert_of_unknown_size_is_a_503_not_vectors_of_another_size(embed_server: LiveServer,
                                                                              fake_upstream: FakeUpstream) -> None:
    reply = requests.post(embed_server.url + "/api/embed", json={"model": "vec-down-unsized", "input": "x"}, timeout=30)
    assert reply.status_code == 503 and "vectors of this size" in reply.json()["error"]
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model="vec-down-unsized", input="x")
    assert info.value.status_code == 503 and "Traceback" not in info.value.response.text
    # An upstream error status is a failure like a refused connection.
    fake_upstream.behave("vec-ollama-model", fail_status=500)
    failed = requests.post(embed_server.url + "/api/embed", json={"model": "vec-ollama", "input": "x"}, timeout=30)
    assert failed.status_code == 200 and failed.headers["X-LeMoE-Expert"] == "use-multilingual"
    assert len(failed.json()["embeddings"][0]) == 8
