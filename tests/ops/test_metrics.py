"""GET /metrics on a live gunicorn server with two workers, read with prometheus-client's parser.

Requests are spread over both workers (the log line of each routed request carries its worker's
pid), and every scrape, whichever worker answers it, must show the totals of both.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from modules.ops.serve import prepare_metrics_dir
from tests.fakes.fake_upstream import FakeUpstream
from tests.live_server import stop
from tests.ops.conftest import WORKERS, OpsServer, Samples, StartOps, scrape, value

_CLOSE = {"Connection": "close"}  # a new connection each time, so both workers get requests


def post_chat(url: str, path: str, text: str, stream: bool) -> requests.Response:
    body = {"model": "lemoe", "messages": [{"role": "user", "content": text}], "stream": stream}
    response = requests.post(url + path, json=body, headers=_CLOSE, timeout=30)
    assert response.status_code == 200, response.text
    return response


def pids_that_routed(server: OpsServer, marker: str) -> set[str]:
    return set(re.findall(rf"\[(\d+)\] lemoe\.http: route .*{marker}", server.log_text()))


def send_until_both_workers_served(server: OpsServer, marker: str) -> int:
    """Send batches of routed chat requests until both workers answered some; return how many."""
    sent = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            texts = [f"write a python function {marker}"] * 8
            list(pool.map(lambda t: post_chat(server.url, "/api/chat", t, False), texts))
            sent += len(texts)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and len(pids_that_routed(server, marker)) < WORKERS:
                time.sleep(0.05)
            if len(pids_that_routed(server, marker)) >= WORKERS:
                return sent
    raise AssertionError("the requests never reached both workers")


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_every_scrape_counts_the_requests_of_both_workers(ops_server: OpsServer, fake_upstream: FakeUpstream) -> None:
    url = ops_server.url
    before = scrape(url)
    marker = f"m{uuid.uuid4().hex[:8]}"
    coder = send_until_both_workers_served(ops_server, marker)
    for _ in range(3):
        assert "Hello" in post_chat(url, "/v1/chat/completions", "write a poem about the sea", True).text
    for _ in range(2):  # `broken` listens nowhere: the fallback expert answers
        post_chat(url, "/api/chat", "deploy it with kubernetes", False)

    # One file of counts per worker, in the folder serve.py made.
    writers = {int(p.stem.rsplit("_", 1)[-1]) for p in ops_server.metrics_dir().glob("counter_*.db")}
    assert len(writers & ops_server.worker_pids()) >= WORKERS
    for _ in range(6):  # several scrapes, answered by whichever worker accepts each
        after = scrape(url)
        assert delta(after, before, "lemoe_http_requests_total", route="/api/chat", method="POST",
                     status="200") == coder + 2
        assert delta(after, before, "lemoe_http_requests_total", route="/v1/chat/completions", method="POST",
                     status="200") == 3
        assert delta(after, before, "lemoe_route_decisions_total", expert="coder", method="keyword") == coder
        assert delta(after, before, "lemoe_route_decisions_total", expert="writer", method="keyword") == 3
        assert delta(after, before, "lemoe_route_decisions_total", expert="broken", method="keyword") == 2
        assert delta(after, before, "lemoe_route_duration_seconds_count", method="keyword") == coder + 5
        assert delta(after, before, "lemoe_route_duration_seconds_bucket", method="keyword", le="+Inf") == coder + 5
        assert delta(after, before, "lemoe_expert_duration_seconds_count", expert="coder", stream="false") == coder
        assert delta(after, before, "lemoe_expert_duration_seconds_count", expert="writer", stream="true") == 3
        assert delta(after, before, "lemoe_expert_first_event_seconds_count", expert="writer") == 3
        assert delta(after, before, "lemoe_expert_duration_seconds_count", expert="fallback", stream="false") == 2
        assert delta(after, before, "lemoe_fallbacks_total", expert="broken", cause="unavailable") == 2
        assert delta(after, before, "lemoe_expert_first_event_seconds_sum", expert="writer") > 0


def test_fallback_causes_and_first_event_time(ops_server: OpsServer, fake_upstream: FakeUpstream) -> None:
    url = ops_server.url
    fake_upstream.behave("writer-model", delay_first=0.3)
    fake_upstream.behave("flaky-model", delay_first=3)  # past the expert's 1 s timeout
    before = scrape(url)
    post_chat(url, "/v1/chat/completions", "a story about a lighthouse", True)
    post_chat(url, "/api/chat", "what is the weather forecast", True)
    after = scrape(url)
    assert delta(after, before, "lemoe_fallbacks_total", expert="flaky", cause="timeout") == 1
    assert delta(after, before, "lemoe_expert_first_event_seconds_count", expert="fallback") == 1
    # The 0.3 s wait of the writer lands in the buckets above 0.25 s, not below.
    assert delta(after, before, "lemoe_expert_first_event_seconds_bucket", expert="writer", le="0.25") == 0
    assert delta(after, before, "lemoe_expert_first_event_seconds_bucket", expert="writer", le="0.5") == 1


def test_dry_runs_are_timed_but_not_counted_as_decisions(ops_server: OpsServer) -> None:
    url = ops_server.url
    before = scrape(url)
    for _ in range(4):
        body = {"messages": [{"role": "user", "content": "write a poem"}]}
        assert requests.post(url + "/v1/route", json=body, timeout=10).json()["expert"] == "writer"
    requests.get(url + "/no/such/route", timeout=10)
    after = scrape(url)
    assert delta(after, before, "lemoe_route_decisions_total", expert="writer", method="keyword") == 0
    assert delta(after, before, "lemoe_route_duration_seconds_count", method="keyword") == 4
    assert delta(after, before, "lemoe_http_requests_total", route="/v1/route", method="POST", status="200") == 4
    assert delta(after, before, "lemoe_http_requests_total", route="unmatched", method="GET", status="404") == 1


def wait_for_gauge(url: str, wanted: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    seen = -1.0
    while time.monotonic() < deadline:
        seen = value(scrape(url), "lemoe_local_models_loaded")
        if seen == wanted:
            return seen
        time.sleep(0.2)
    return seen


def test_loaded_models_gauge_follows_the_model_pool(ops_server: OpsServer) -> None:
    url = ops_server.url
    assert wait_for_gauge(url, 0, timeout=5) == 0
    # Ollama's load request: an empty chat loads the model without generating.
    response = requests.post(url + "/api/chat", json={"model": "tiny", "messages": []}, timeout=60)
    assert response.status_code == 200 and response.json()["done_reason"] == "load"
    assert wait_for_gauge(url, 1, timeout=3) == 1
    # Idle past model_ttl_seconds, the pool unloads it, in whichever worker held it.
    assert wait_for_gauge(url, 0, timeout=8) == 0


def test_a_dead_worker_keeps_its_counts_and_loses_its_gauge_and_the_folder_goes_at_exit(
        start_ops: StartOps) -> None:
    server = start_ops()
    post_chat(server.url, "/api/chat", "write a python function", False)
    folder = server.metrics_dir()
    before = scrape(server.url)
    victim = min(server.worker_pids())
    assert (folder / f"gauge_livesum_{victim}.db").exists()
    os.kill(victim, signal.SIGKILL)
    # A bound, not a timing: a loaded machine can take seconds to boot the replacement.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (victim in server.worker_pids() or len(server.worker_pids()) < WORKERS):
        time.sleep(0.05)
    # gunicorn replaced the worker; child_exit dropped its live gauge but not its counters.
    assert not (folder / f"gauge_livesum_{victim}.db").exists()
    after = scrape(server.url)
    for name, labels in [("lemoe_route_decisions_total", {"expert": "coder", "method": "keyword"}),
                         ("lemoe_http_requests_total", {"route": "/api/chat", "method": "POST", "status": "200"})]:
        assert value(after, name, **labels) == value(before, name, **labels) == 1
    stop(server.live)
    assert not folder.exists()


def test_the_metrics_folder_is_made_or_emptied_of_an_earlier_runs_counts(tmp_path: Path) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_12345.db").write_bytes(b"old counts")
    (folder / "notes.txt").write_text("not ours")
    environ = {"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    assert prepare_metrics_dir(environ) == (folder, False)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]

    environ = {}
    made, created = prepare_metrics_dir(environ)
    try:
        assert created and made.is_dir() and environ["PROMETHEUS_MULTIPROC_DIR"] == str(made)
    finally:
        made.rmdir()
