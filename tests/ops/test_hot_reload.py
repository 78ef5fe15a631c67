"""Config hot reload: in one process step by step (`ConfigWatcher.check`), then under a running
gunicorn server with two workers, by editing its experts file."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from api_server import build_services, rebuild_services
from modules.config_manager import load_config, with_overrides
from modules.ops.hot_reload import ConfigWatcher
from modules.services import Services
from tests.fakes.fake_upstream import FakeUpstream
from tests.hardening.conftest import default_experts, remote_expert, write_project
from tests.ops.conftest import StartOps, scrape, value

CHEF_KEYWORDS = ["lasagna", "risotto", "souffle"]


class Records(logging.Handler):
    """The log lines of the `lemoe.reload` logger (the `lemoe` logger does not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def reload_log() -> Iterator[Records]:
    logger = logging.getLogger("lemoe.reload")
    records = Records()
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)


def read_experts(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """As most editors and Kubernetes do: write a new file, then rename it over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(json.dumps(data, indent=2))
    os.replace(fresh, path)


def with_chef(experts: dict[str, Any], url: str) -> dict[str, Any]:
    chef = remote_expert(9, "chef", "ollama", "chef-model", CHEF_KEYWORDS, url)
    return {**experts, "experts": [*experts["experts"], chef]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def project(tmp_path: Path) -> Path:
    experts = default_experts("http://127.0.0.1:9", "http://127.0.0.1:9")
    # An `api` expert whose key is not set: its backend is a stand-in that records close().
    experts.append({"id": 7, "label": "cloud", "type": "api", "model_name": "gpt-4o-mini",
                    "api_key_env": "LEMOE_TEST_KEY_THAT_IS_NEVER_SET", "keywords": ["cloudy"]})
    write_project(tmp_path, {"server": {"log_file": ""}}, experts)
    return tmp_path


def app_for(config_path: Path, project: Path, **overrides: Any) -> tuple[Flask, ConfigWatcher, FakeClock]:
    config = with_overrides(load_config(config_path, project), **overrides)
    app = Flask("reload-test")
    app.extensions["lemoe"] = build_services(config)
    clock = FakeClock()
    watcher = ConfigWatcher(app, rebuild_services, clock=clock)
    assert watcher.catch_up() is None  # the files say what the app runs
    return app, watcher, clock


def services_of(app: Flask) -> Services:
    return app.extensions["lemoe"]  # type: ignore[no-any-return]


def test_an_added_expert_is_routed_and_listed_and_loaded_models_survive(project: Path, reload_log: Records) -> None:
    config_path, experts_path = project / "config" / "config.json", project / "config" / "experts.json"
    app, watcher, _ = app_for(config_path, project)
    before = services_of(app)
    with before.pool.lease("models/kept.gguf", object, keep_alive=-1):
        pass  # a model loaded (and kept) before the edit
    assert watcher.check() is None  # nothing changed yet
    write_json_atomically(experts_path, with_chef(read_experts(experts_path), "http://127.0.0.1:9"))

    assert watcher.check() is True
    after = services_of(app)
    assert after is not before and after.pool is before.pool
    assert [m.key for m in after.pool.loaded()] == ["models/kept.gguf"]
    assert after.catalog.card("chef") is not None and before.catalog.card("chef") is None
    assert after.router.route(["how long do I bake a lasagna"]).label == "chef"
    assert watcher.check() is None
    assert "configuration reloaded" in reload_log.text() and "chef" in reload_log.text()


def test_an_invalid_edit_keeps_the_running_config_and_names_file_and_field(project: Path,
                                                                           reload_log: Records) -> None:
    experts_path = project / "config" / "experts.json"
    app, watcher, _ = app_for(project / "config" / "config.json", project)
    running = services_of(app)
    experts = read_experts(experts_path)
    experts["experts"][1]["colour"] = "blue"
    experts_path.write_text(json.dumps(experts))

    assert watcher.check() is False
    assert services_of(app) is running
    assert f"{experts_path}: experts[1].colour: Extra inputs are not permitted" in reload_log.text()
    assert "still serving the previous configuration" in reload_log.text()
    # Broken JSON, mid-edit: refused the same way, and a fix is picked up.
    experts_path.write_text('{"experts": [')
    assert watcher.check() is False and services_of(app) is running
    assert f"{experts_path}: invalid JSON" in reload_log.text()
    del experts["experts"][1]["colour"]
    write_json_atomically(experts_path, with_chef(experts, "http://127.0.0.1:9"))
    assert watcher.check() is True and services_of(app).catalog.card("chef") is not None


def test_start_up_only_settings_say_needs_restart_and_keep_their_running_values(project: Path,
                                                                                reload_log: Records) -> None:
    config_path = project / "config" / "config.json"
    # The port comes from the command line, as `api_server.py --port` does: not an edit.
    app, watcher, _ = app_for(config_path, project, port=45678)
    config = json.loads(config_path.read_text())
    config["server"]["threads"] = 7
    config["server"]["read_timeout"] = 9.5
    config["server"]["max_body_bytes"] = 4096
    write_json_atomically(config_path, config)

    assert watcher.check() is True
    server = services_of(app).config.server
    assert "server.threads changed" in reload_log.text() and "needs restart" in reload_log.text()
    assert "server.port" not in reload_log.text()
    assert (server.threads, server.port) == (16, 45678)  # what the server runs with
    assert server.read_timeout == 9.5  # applied through the new runner's backends
    assert app.config["MAX_CONTENT_LENGTH"] == 4096


def test_a_configmap_style_symlink_swap_is_noticed(tmp_path: Path) -> None:
    """kubelet: config/experts.json -> ..data/experts.json, ..data -> ..<timestamp>/ (swapped)."""
    project = tmp_path
    write_project(project, {"server": {"log_file": ""}}, default_experts("http://127.0.0.1:9", "http://127.0.0.1:9"))
    config_dir = project / "config"
    first = config_dir / "..2026_01_01_00_00_00.1"
    first.mkdir()
    experts = read_experts(config_dir / "experts.json")
    (first / "experts.json").write_text(json.dumps(experts))
    (config_dir / "experts.json").unlink()
    (config_dir / "..data").symlink_to(first.name)
    (config_dir / "experts.json").symlink_to("..data/experts.json")
    app, watcher, _ = app_for(config_dir / "config.json", project)

    second = config_dir / "..2026_01_01_00_05_00.2"
    second.mkdir()
    (second / "experts.json").write_text(json.dumps(with_chef(experts, "http://127.0.0.1:9")))
    (config_dir / "..data_tmp").symlink_to(second.name)
    os.replace(config_dir / "..data_tmp", config_dir / "..data")
    for stale in first.iterdir():
        stale.unlink()
    first.rmdir()

    assert watcher.check() is True
    assert services_of(app).catalog.card("chef") is not None


def test_a_worker_started_after_an_edit_catches_up_with_the_files(project: Path) -> None:
    """gunicorn forks workers with the configuration the master loaded at start-up."""
    config_path, experts_path = project / "config" / "config.json", project / "config" / "experts.json"
    app = Flask("late-worker")
    app.extensions["lemoe"] = build_services(load_config(config_path, project))
    write_json_atomically(experts_path, with_chef(read_experts(experts_path), "http://127.0.0.1:9"))
    watcher = ConfigWatcher(app, rebuild_services)

    assert watcher.catch_up() is True
    assert services_of(app).catalog.card("chef") is not None
    assert watcher.check() is None


def test_the_old_runner_is_closed_once_requests_that_took_it_had_time_to_start(project: Path) -> None:
    experts_path = project / "config" / "experts.json"
    app, watcher, clock = app_for(project / "config" / "config.json", project)
    old = services_of(app)
    cloud = old.config.expert_by_label("cloud")
    assert cloud is not None
    old_backend = old.runner.backend_for(cloud)
    write_json_atomically(experts_path, with_chef(read_experts(experts_path), "http://127.0.0.1:9"))
    assert watcher.check() is True

    clock.now += old.config.server.connect_timeout + old.config.server.read_timeout - 0.5
    watcher.check()
    assert old_backend.closed is False  # type: ignore[attr-defined]
    clock.now += 1
    watcher.check()
    assert old_backend.closed is True  # type: ignore[attr-defined]
    assert services_of(app).runner.backend_for(cloud).closed is False  # type: ignore[attr-defined]


# --- a running server ----------------------------------------------------------------------------

def tags(url: str) -> set[str]:
    response = requests.get(url + "/api/tags", headers={"Connection": "close"}, timeout=10)
    return {m["name"] for m in response.json()["models"]}


def wait_until_every_answer(url: str, predicate: Any, timeout: float = 10.0) -> None:
    """Until `predicate(tags)` holds for 8 answers in a row (new connections: both workers)."""
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline:
        streak = streak + 1 if predicate(tags(url)) else 0
        if streak >= 8:
            return
        time.sleep(0.05)
    raise AssertionError("the change did not reach every worker in time")


def wait_for_log(server: Any, text: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.log_text().count(text) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} was not logged {count} times:\n{server.log_text()[-3000:]}")


def test_editing_the_experts_file_under_a_running_server(start_ops: StartOps, fake_upstream: FakeUpstream) -> None:
    server = start_ops()
    url = server.url
    experts = read_experts(server.experts_path)
    write_json_atomically(server.experts_path, with_chef(experts, fake_upstream.url))

    # Both workers must have reloaded: answers in a row can all come from the same worker.
    wait_for_log(server, "configuration reloaded", count=2)
    wait_until_every_answer(url, lambda names: "chef:latest" in names)
    chat = {"model": "lemoe", "messages": [{"role": "user", "content": "a risotto for four"}], "stream": False}
    for _ in range(4):
        answer = requests.post(url + "/api/chat", json=chat, headers={"Connection": "close"}, timeout=30)
        assert answer.status_code == 200 and answer.headers["X-LeMoE-Expert"] == "chef"
    assert fake_upstream.last_request.json["model"] == "chef-model"

    # An invalid edit: every worker refuses it, says why, and keeps serving the chef.
    broken = with_chef(experts, fake_upstream.url)
    broken["experts"][-1]["id"] = 1
    server.experts_path.write_text(json.dumps(broken))
    wait_for_log(server, "duplicate expert id 1", count=2)
    assert f"{server.experts_path}: (top level): duplicate expert id 1" in server.log_text()
    wait_until_every_answer(url, lambda names: "chef:latest" in names)
    assert value(scrape(url), "lemoe_config_reloads_total", result="invalid") == 2
    assert value(scrape(url), "lemoe_config_reloads_total", result="ok") == 2

    # A change only a restart can apply is logged as such; the port from the command line is not.
    write_json_atomically(server.experts_path, with_chef(experts, fake_upstream.url))
    wait_for_log(server, "configuration reloaded", count=4)
    config = json.loads(server.config_path.read_text())
    config["server"]["workers"] = 3
    write_json_atomically(server.config_path, config)
    wait_for_log(server, "server.workers changed", count=2)
    assert "needs restart" in server.log_text() and "server.port changed" not in server.log_text()
    # Removing the chef again is picked up too.
    write_json_atomically(server.experts_path, experts)
    wait_until_every_answer(url, lambda names: "chef:latest" not in names)
