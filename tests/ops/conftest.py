"""Live LeMoE servers for the operations tests: gunicorn with two workers, a project folder each.

The experts are the hardening set (all on the loopback fake upstream, the fallback too, plus one
at a closed port) and a local GGUF expert, `tiny`, on the packaged SmolLM2 model, so the
loaded-models gauge has something to count. $PROMETHEUS_MULTIPROC_DIR is left unset, as in
production, so the server makes (and at exit removes) its own folder for the workers' metric files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.contract.conftest import SMOLLM
from tests.fakes.fake_upstream import FakeUpstream
from tests.hardening.conftest import default_experts, write_project
from tests.live_server import LiveServer, live_server

WORKERS = 2
# Short, so a loaded model is unloaded (and the gauge falls) within seconds; the reaper then
# runs every second.
MODEL_TTL_SECONDS = 3


@dataclass
class OpsServer:
    live: LiveServer
    project: Path

    @property
    def url(self) -> str:
        return self.live.url

    def worker_pids(self) -> set[int]:
        master = self.live.process.pid
        return {int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()}

    def metrics_dir(self) -> Path:
        """The folder serve.py made for the metric files: the one with files of this server's workers."""
        pids = self.worker_pids()
        for folder in Path(tempfile.gettempdir()).glob("lemoe-metrics-*"):
            if any(int(f.stem.rsplit("_", 1)[-1]) in pids for f in folder.glob("*.db")):
                return folder
        raise AssertionError("no metrics folder holds files of this server's workers")

    @property
    def experts_path(self) -> Path:
        return self.project / "config" / "experts.json"

    @property
    def config_path(self) -> Path:
        return self.project / "config" / "config.json"

    def log_text(self) -> str:
        return self.live.log_text()


StartOps = Callable[..., OpsServer]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def ops_experts(upstream_url: str, closed_url: str) -> list[dict[str, Any]]:
    tiny = {"id": 6, "label": "tiny", "description": "A tiny local model.", "keywords": ["tinytest"],
            "type": "local", "format": "gguf", "model_path": SMOLLM}
    return [*default_experts(upstream_url, closed_url), tiny]


@pytest.fixture(scope="session")
def start_ops(fake_upstream: FakeUpstream, closed_url: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartOps]:
    """start_ops(config=None, experts=None, workers=2) -> a running server, stopped at the end."""
    with ExitStack() as servers:

        def start(config: dict[str, Any] | None = None, experts: list[dict[str, Any]] | None = None,
                  workers: int = WORKERS) -> OpsServer:
            base = {"local_models": {"model_ttl_seconds": MODEL_TTL_SECONDS, "n_ctx": 512, "n_threads": 1}}
            project = tmp_path_factory.mktemp("ops")
            config_path = write_project(project, {**base, **(config or {})},
                                        experts or ops_experts(fake_upstream.url, closed_url))
            # $PROMETHEUS_MULTIPROC_DIR unset, as in production (see above).
            live = servers.enter_context(live_server(config_path, project, args=("--workers", str(workers)),
                                                     env={"PROMETHEUS_MULTIPROC_DIR": None}))
            return OpsServer(live, project)

        yield start


@pytest.fixture(scope="session")
def ops_server(start_ops: StartOps) -> OpsServer:
    """One two-worker server shared by the metrics and page tests (they only compare deltas)."""
    return start_ops()


def scrape(url: str) -> Samples:
    """Every sample of GET /metrics, parsed by prometheus-client's own text parser."""
    response = requests.get(url + "/metrics", timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (0 when it does not exist yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
