"""The one way the tests run the real server: `python api_server.py [--config C] --port P [args]`.

`launch(config_path, project, ...)` starts it on a free loopback port, with $LEMOE_PROJECT_DIR
set to `project` and its stdout and stderr appended to `project/server.out`, and returns once
GET `ready_path` answers 200; `stop(server)` ends it; `live_server(...)` is both, as a context
manager. What a test needs beyond that is a parameter: `args` (`--workers 2`, `--dev`,
`--host ...`), `env` (a value of None unsets the variable), `inherit_env=False` for an
environment of `env` alone, `app_dir` for a copy of the application other than this checkout,
`ready_path` and `timeout` for the readiness probe. `start` and `wait_until_serving` are the two
halves of `launch`, for starting several servers before waiting on any.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
# The server's own log, relative to the project (what the test configs set as server.log_file).
LOG_FILE = "logs/lemoe.log"
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    project: Path
    # The process's stdout and stderr (gunicorn's own lines, tracebacks of a failed start).
    out_path: Path
    # The server's log file (server.log_file).
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def out_text(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        stop(self)


def start(config_path: Path | None, project: Path, *, args: Sequence[str] = (),
          env: Mapping[str, str | None] | None = None, inherit_env: bool = True, app_dir: Path = REPO,
          log_file: str = LOG_FILE) -> LiveServer:
    """The server process, started; not yet waited on (see `wait_until_serving`)."""
    port = free_port()
    full_env: dict[str, str] = dict(os.environ) if inherit_env else {}
    full_env["LEMOE_PROJECT_DIR"] = str(project)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    command = [sys.executable, str(app_dir / "api_server.py")]
    if config_path is not None:
        command += ["--config", str(config_path)]
    command += ["--port", str(port), *args]
    out_path = project / "server.out"
    # Appended to: a project started again (a restart test) keeps the first run's output.
    with open(out_path, "ab") as out:
        process = subprocess.Popen(command, cwd=app_dir, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    return LiveServer(url=f"http://127.0.0.1:{port}", process=process, project=project, out_path=out_path,
                      log_path=project / log_file)


def wait_until_serving(server: LiveServer, *, ready_path: str = "/", timeout: float = START_TIMEOUT) -> None:
    """Return once GET `ready_path` answers 200; raise (with the process's output) if the process
    exits first or `timeout` seconds pass (the process is then killed)."""
    # The port accepts connections before a booting worker answers (it may be importing LiteLLM
    # or loading an encoder): a refused connection or a read timeout both mean "not yet".
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.out_text()}")
        try:
            if requests.get(server.url + ready_path, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.process.kill()
    server.process.wait(timeout=5)
    raise RuntimeError(f"server did not start within {timeout}s:\n{server.out_text()}")


def launch(config_path: Path | None, project: Path, *, args: Sequence[str] = (),
           env: Mapping[str, str | None] | None = None, inherit_env: bool = True, app_dir: Path = REPO,
           log_file: str = LOG_FILE, ready_path: str = "/", timeout: float = START_TIMEOUT) -> LiveServer:
    """A server started (see `start`) and answering at `ready_path`."""
    server = start(config_path, project, args=args, env=env, inherit_env=inherit_env, app_dir=app_dir,
                   log_file=log_file)
    wait_until_serving(server, ready_path=ready_path, timeout=timeout)
    return server


def stop(server: LiveServer) -> None:
    """Terminate (gunicorn stops its workers and runs its exit hooks); kill after 15 s."""
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)


@contextmanager
def live_server(config_path: Path | None, project: Path, **options: Any) -> Iterator[LiveServer]:
    """`launch(config_path, project, **options)`, stopped on exit."""
    server = launch(config_path, project, **options)
    try:
        yield server
    finally:
        stop(server)
