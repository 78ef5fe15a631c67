"""Local models (real packaged GGUF, a tiny ONNX model built here) and LiteLLM `api` experts,
through a live LeMoE server (gunicorn) driven over HTTP with the real clients.

Two servers: one with four GGUF experts (hard links to the packaged SmolLM2 file under the
project's models/, so they are four models to the pool) and a limit of 3 loaded models, plus an
ONNX expert and `api` experts pointed at the loopback fake upstream; and one with a 2-second
time to live, for idle unloading and statistics across a restart.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from modules.config_manager import resolve_local_model_path
from tests.contract.conftest import SMOLLM
from tests.fakes.fake_upstream import FakeUpstream
from tests.fakes.tiny_onnx_model import ANSWER, build_tiny_onnx_model
from tests.live_server import REPO, LiveServer, launch

GGUF_EXPERTS = ["gguf1", "gguf2", "gguf3", "gguf4"]
CLOUD_KEY_ENV = "LEMOE_TEST_CLOUD_API_KEY"
MISSING_KEY_ENV = "LEMOE_TEST_MISSING_API_KEY"
# Raw counting: the model keeps counting instead of ending its answer early.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def _stats(server: LiveServer) -> dict[str, Any]:
    return json.loads((server.project / "data" / "model_stats.json").read_text())["models"]  # type: ignore[no-any-return]


def _project(root: Path, upstream: FakeUpstream, experts: list[dict[str, Any]], local: dict[str, Any]) -> Path:
    (root / "config").mkdir(parents=True)
    models = root / "models"
    models.mkdir()
    packaged = resolve_local_model_path(SMOLLM, REPO, "models")
    for label in GGUF_EXPERTS:
        os.link(packaged, models / f"{label}.gguf")
    build_tiny_onnx_model(models / "tiny")
    fallback = {"id": 0, "label": "fallback", "type": "ollama", "url": upstream.url, "model_name": "fallback-model"}
    (root / "config" / "experts.json").write_text(json.dumps({"experts": [fallback, *experts]}, indent=1))
    config = {
        "server": {"host": "127.0.0.1", "threads": 16, "read_timeout": 10, "log_file": "logs/lemoe.log"},
        "router": {"model_path": ""},
        # These tests send many quick requests from one address; rate limiting is tested elsewhere.
        "rate_limit": {"per_minute": 0},
        "local_models": {"n_ctx": 1024, "n_threads": 2, **local},
    }
    path = root / "config" / "config.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def _start(project: Path) -> LiveServer:
    # The worker imports LiteLLM while building the app: a slow first answer.
    return launch(project / "config" / "config.json", project, env={CLOUD_KEY_ENV: "sk-cloud", MISSING_KEY_ENV: None},
                  timeout=90)


def _local(i: int, label: str, fmt: str, path: str) -> dict[str, Any]:
    return {"id": i, "label": label, "type": "local", "format": fmt, "model_path": path, "keywords": [label]}


def _api(i: int, label: str, provider: str, model: str, api_base: str, key_env: str | None = None) -> dict[str, Any]:
    expert = {"id": i, "label": label, "type": "api", "provider": provider, "model_name": model,
              "api_base": api_base, "keywords": [label]}
    if key_env:
        expert["api_key_env"] = key_env
    return expert


@pytest.fixture(scope="module")
def pool_server(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    experts = [_local(i + 1, label, "gguf", f"{label}.gguf") for i, label in enumerate(GGUF_EXPERTS)]
    experts += [
        _local(5, "tiny", "onnx", "models/tiny"),
        _api(6, "cloud", "openai", "cloud-model", fake_upstream.url + "/v1", CLOUD_KEY_ENV),
        _api(7, "cloudollama", "ollama_chat", "ollama-cloud", fake_upstream.url),
        _api(8, "nokey", "openai", "nokey-model", fake_upstream.url + "/v1", MISSING_KEY_ENV),
        _api(9, "cloudbroken", "openai", "broken-cloud", fake_upstream.url + "/v1", CLOUD_KEY_ENV),
    ]
    root = tmp_path_factory.mktemp("pool-project")
    _project(root, fake_upstream, experts, {"max_loaded_models": 3, "model_ttl_seconds": 300})
    server = _start(root)
    yield server
    server.stop()


@pytest.fixture
def pool(pool_server: LiveServer) -> LiveServer:
    """The pool server with nothing loaded (each test starts from an empty pool)."""
    for label in [*GGUF_EXPERTS, "tiny"]:
        _post(pool_server, "/api/generate", {"model": label, "prompt": "", "keep_alive": 0})
    assert _loaded(pool_server) == []
    return pool_server


def _post(server: LiveServer, path: str, body: dict[str, Any], timeout: float = 120) -> requests.Response:
    response = requests.post(server.url + path, json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response


def _generate(server: LiveServer, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": COUNTING, "raw": True, "stream": False,
            "options": {"num_predict": 2, "temperature": 0}, **extra}
    return _post(server, "/api/generate", body).json()  # type: ignore[no-any-return]


def _ps(server: LiveServer) -> list[dict[str, Any]]:
    response = requests.get(server.url + "/api/ps", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    return response.json()["models"]  # type: ignore[no-any-return]


def _loaded(server: LiveServer) -> list[str]:
    return sorted(m["model"].removesuffix(":latest") for m in _ps(server))


def _expires_in(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["expires_at"]).timestamp() - time.time()


# --- GGUF: streaming, LRU, in-flight, keep_alive -------------------------------------------------

def test_gguf_expert_streams_and_shows_in_ps_with_its_expiry(pool: LiveServer) -> None:
    body = {"model": "gguf1", "messages": [{"role": "user", "content": "Say hello."}], "stream": True,
            "options": {"num_predict": 12}}
    with requests.post(pool.url + "/api/chat", json=body, stream=True, timeout=120) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert response.headers["X-LeMoE-Expert"] == "gguf1"
    assert len(lines) >= 3 and lines[-1]["done"] is True
    assert sum(1 for line in lines[:-1] if line["message"]["content"]) >= 2
    assert lines[-1]["eval_count"] > 0 and lines[-1]["load_duration"] > 0
    [entry] = _ps(pool)
    assert entry["model"] == "gguf1:latest" and entry["size"] > 50_000_000
    assert 290 < _expires_in(entry) <= 300


def test_lru_eviction_with_four_experts_and_a_limit_of_three(pool: LiveServer) -> None:
    for label in GGUF_EXPERTS:
        _generate(pool, label)
    assert _loaded(pool) == ["gguf2", "gguf3", "gguf4"]
    # gguf2 is now the least recently used.
    _generate(pool, "gguf1")
    assert _loaded(pool) == ["gguf1", "gguf3", "gguf4"]
    _generate(pool, "gguf3")
    _generate(pool, "gguf2")
    assert _loaded(pool) == ["gguf1", "gguf2", "gguf3"]


def test_no_eviction_while_a_stream_is_in_flight(pool: LiveServer) -> None:
    arrivals: list[tuple[float, dict[str, Any]]] = []
    first_line = threading.Event()

    def stream_long_answer() -> None:
        body = {"model": "gguf1", "prompt": COUNTING, "raw": True, "stream": True,
                "options": {"num_predict": 400, "temperature": 0}}
        with requests.post(pool.url + "/api/generate", json=body, stream=True, timeout=300) as response:
            for line in response.iter_lines():
                if line:
                    arrivals.append((time.monotonic(), json.loads(line)))
                    first_line.set()

    reader = threading.Thread(target=stream_long_answer)
    reader.start()
    try:
        assert first_line.wait(60)
        # gguf1 is loaded and generating: the oldest model, but in use.
        for label in ["gguf2", "gguf3", "gguf4"]:
            _generate(pool, label)
        others_done = time.monotonic()
        during = _loaded(pool)
    finally:
        reader.join(300)
    done_at, last = arrivals[-1]
    assert last["done"] is True and last["eval_count"] > 100
    assert "".join(line["response"] for _, line in arrivals).count(",") > 50
    # The long answer was still running when the fourth model needed room ...
    assert done_at > others_done
    # ... so the least recently used idle model went instead of the one in use.
    assert during == ["gguf1", "gguf3", "gguf4"]
    assert _loaded(pool) == ["gguf1", "gguf3", "gguf4"]


def test_keep_alive_zero_unloads_after_the_answer(pool: LiveServer) -> None:
    _generate(pool, "gguf1", keep_alive=0)
    assert _loaded(pool) == []


def test_keep_alive_forever_and_as_a_duration(pool: LiveServer) -> None:
    _generate(pool, "gguf1", keep_alive=-1)
    _generate(pool, "gguf2", keep_alive="10m")
    entries = {m["model"]: m for m in _ps(pool)}
    forever = datetime.fromisoformat(entries["gguf1:latest"]["expires_at"])
    assert forever.year > 2200 and forever.tzinfo is not None
    assert 590 < _expires_in(entries["gguf2:latest"]) <= 600


def test_load_and_unload_probes_steer_the_pool(pool: LiveServer) -> None:
    loaded = _post(pool, "/api/chat", {"model": "gguf3", "messages": []}).json()
    assert loaded["done_reason"] == "load"
    assert _loaded(pool) == ["gguf3"]
    _post(pool, "/api/generate", {"model": "tiny", "prompt": "", "keep_alive": "1h"})
    assert _loaded(pool) == ["gguf3", "tiny"]
    tiny = next(m for m in _ps(pool) if m["model"] == "tiny:latest")
    assert 3590 < _expires_in(tiny) <= 3600
    unloaded = _post(pool, "/api/generate", {"model": "gguf3", "prompt": "", "keep_alive": 0}).json()
    assert unloaded["done_reason"] == "unload"
    assert _loaded(pool) == ["tiny"]


def test_usage_statistics_are_written_to_data(pool: LiveServer) -> None:
    before = _stats(pool) if (pool.project / "data" / "model_stats.json").exists() else {}
    key = str((pool.project / "models" / "gguf4.gguf").resolve())
    old = before.get(key, {"loads": 0, "requests": 0, "completion_tokens": 0})
    _generate(pool, "gguf4")
    _generate(pool, "gguf4")
    after = _stats(pool)[key]
    assert after["loads"] == old["loads"] + 1
    assert after["requests"] == old["requests"] + 2
    assert after["completion_tokens"] >= old["completion_tokens"] + 2
    assert abs(after["last_used"] - time.time()) < 60


# --- ONNX --------------------------------------------------------------------------------------

def test_onnx_expert_through_ollama_chat_streaming_and_not(pool: LiveServer) -> None:
    messages = [{"role": "user", "content": "hello"}]
    with requests.post(pool.url + "/api/chat", json={"model": "tiny", "messages": messages}, stream=True,
                       timeout=60) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert response.headers["X-LeMoE-Expert"] == "tiny"
    pieces = [line["message"]["content"] for line in lines if not line["done"]]
    assert "".join(pieces) == ANSWER and len(pieces) == len(ANSWER)
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == len(ANSWER) + 1
    whole = _post(pool, "/api/chat", {"model": "tiny", "messages": messages, "stream": False}).json()
    assert whole["message"]["content"] == ANSWER
    assert _loaded(pool) == ["tiny"]


def test_onnx_expert_through_openai_chat_completions(pool: LiveServer) -> None:
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "hello"}]
    completion = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    assert completion.choices[0].message.content == ANSWER[:3]
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    stream = client.chat.completions.create(model="tiny", messages=messages, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == ANSWER and len(pieces) > 1


# --- api (LiteLLM) -------------------------------------------------------------------------------

def test_api_expert_answers_through_both_apis(pool: LiveServer, fake_upstream: FakeUpstream) -> None:
    body = {"model": "cloud", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    answer = _post(pool, "/api/chat", body)
    assert answer.headers["X-LeMoE-Expert"] == "cloud"
    assert answer.json()["message"]["content"] == "Hello from cloud-model"
    assert fake_upstream.requests_to("/v1/chat/completions")[-1].headers["Authorization"] == "Bearer sk-cloud"
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(model="cloud", messages=messages, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == ["Hello", " from", " cloud-model"]


def test_api_expert_on_the_ollama_chat_provider_streams(pool: LiveServer) -> None:
    body = {"model": "cloudollama", "messages": [{"role": "user", "content": "hi"}]}
    with requests.post(pool.url + "/api/chat", json=body, stream=True, timeout=60) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert response.headers["X-LeMoE-Expert"] == "cloudollama"
    assert [line["message"]["content"] for line in lines if not line["done"]] == ["Hello", " from", " ollama-cloud"]
    assert lines[-1]["prompt_eval_count"] == 5 and lines[-1]["eval_count"] == 3


def test_an_api_expert_without_its_key_falls_back(pool: LiveServer) -> None:
    assert f"environment variable {MISSING_KEY_ENV} is not set" in pool.log_text()
    for stream in (False, True):
        body = {"model": "nokey", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        response = _post(pool, "/api/chat", body)
        assert response.headers["X-LeMoE-Expert"] == "fallback"
        text = response.text if stream else response.json()["message"]["content"]
        assert "fallback-model" in text
    assert "sk-" not in pool.log_text()


def test_a_failing_api_provider_falls_back(pool: LiveServer, fake_upstream: FakeUpstream) -> None:
    fake_upstream.behave("broken-cloud", fail_status=500)
    client = openai.OpenAI(base_url=pool.url + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    completion = client.chat.completions.create(model="cloudbroken", messages=messages)
    assert completion.choices[0].message.content == "Hello from fallback-model"
    assert len(fake_upstream.requests_to("/v1/chat/completions")) == 1
    assert "[Auto-Correction]" in pool.log_text()


# --- a client's bad option ---------------------------------------------------------------------

def test_a_bad_option_is_the_clients_400_not_a_failure_of_the_expert(pool: LiveServer, fake_upstream: FakeUpstream) -> None:
    corrections = pool.log_text().count("[Auto-Correction]")
    upstream_calls = len(fake_upstream.requests_to("/v1/chat/completions"))
    messages = [{"role": "user", "content": "hi"}]
    for model in ("gguf1", "tiny", "cloud"):
        for options in ({"temperature": "hot"}, {"stop": [1]}, {"num_predict": 2.5}):
            response = requests.post(pool.url + "/api/chat", json={"model": model, "messages": messages,
                                                                   "options": options}, timeout=30)
            assert response.status_code == 400, response.text
            assert response.json()["error"]
        response = requests.post(pool.url + "/v1/chat/completions", json={"model": model, "messages": messages,
                                                                          "temperature": "hot"}, timeout=30)
        assert response.status_code == 400, response.text
        assert "temperature" in response.json()["error"]["message"]
    # Nothing was loaded or called for them, no expert was replaced or benched.
    assert _loaded(pool) == []
    assert len(fake_upstream.requests_to("/v1/chat/completions")) == upstream_calls
    assert pool.log_text().count("[Auto-Correction]") == corrections
    answer = _post(pool, "/api/chat", {"model": "cloud", "messages": messages, "stream": False})
    assert answer.headers["X-LeMoE-Expert"] == "cloud"


# --- time to live, and statistics across a restart -----------------------------------------------

@pytest.fixture(scope="module")
def ttl_project(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ttl-project")
    experts = [_local(1, "gguf1", "gguf", "gguf1.gguf"), _local(2, "tiny", "onnx", "tiny")]
    _project(root, fake_upstream, experts, {"max_loaded_models": 3, "model_ttl_seconds": 2})
    return root


def test_idle_models_are_unloaded_after_their_time_to_live(ttl_project: Path) -> None:
    server = _start(ttl_project)
    try:
        _generate(server, "gguf1")
        _post(server, "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        entries = _ps(server)
        assert sorted(m["model"] for m in entries) == ["gguf1:latest", "tiny:latest"]
        assert all(0 < _expires_in(m) <= 2 for m in entries)
        key = str((ttl_project / "models" / "gguf1.gguf").resolve())
        deadline = time.monotonic() + 15
        # The reaper drops the model first and writes its statistics just after: wait for both.
        while (_loaded(server) or _stats(server)[key]["unloads"] < 1) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _loaded(server) == []
        assert _stats(server)[key]["unloads"] >= 1
    finally:
        server.stop()


def test_statistics_survive_a_restart(ttl_project: Path) -> None:
    key = str((ttl_project / "models" / "tiny").resolve())
    first = _start(ttl_project)
    try:
        _post(first, "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        counted = _stats(first)[key]
    finally:
        first.stop()
    assert counted["requests"] >= 1 and counted["loads"] >= 1
    second = _start(ttl_project)
    try:
        assert _stats(second)[key] == counted  # nothing lost or reset by the restart
        _post(second, "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        assert _stats(second)[key]["requests"] == counted["requests"] + 1
    finally:
        second.stop()


def test_expiry_times_are_rfc3339_with_a_timezone(pool: LiveServer) -> None:
    _generate(pool, "gguf1")
    [entry] = _ps(pool)
    assert datetime.fromisoformat(entry["expires_at"]).tzinfo is not None
    assert datetime.fromisoformat(entry["expires_at"]) > datetime.now(UTC)
