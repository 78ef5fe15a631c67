"""Routing off the event loop: under gevent, building a router and making a decision run on the
thread pool, so the worker's other greenlets keep running meanwhile (modules/blocking.py,
router_factory.OffLoopRouter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from modules.decision_cache import DecisionCache, router_name
from modules.router_factory import OffLoopRouter
from tests.contract.conftest import REPO
from tests.hardening.conftest import default_experts, write_project

# Run in a child: patching this test process for gevent would change every other test.
PATCHED_CHILD = r"""
import io, sys, time
from modules.blocking import patch_for_gevent
patch_for_gevent()
import gevent
from gevent import monkey
from flask import Flask

import api_server
from modules import http_views as views
from modules import router_factory
from modules.chat_types import RouteDecision
from modules.config_manager import load_config
from modules.protocol.openai_protocol import chat_request_from_openai

native_sleep = monkey.get_original("time", "sleep")  # stands for CPU work in C that never yields
ticks = []

def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

def ticks_between(started, ended):
    return sum(started < tick < ended for tick in ticks)

def request(text):
    return chat_request_from_openai({"model": "lemoe", "messages": [{"role": "user", "content": text}]})

class SlowRouter:
    calls = []

    def route(self, user_texts):
        native_sleep(0.3)
        self.calls.append(list(user_texts))
        return RouteDecision(1, "coder", 1.0, "keyword")

def slow_build(config):
    native_sleep(0.3)
    return SlowRouter()

app = Flask("off-loop")
config = load_config(sys.argv[1], sys.argv[2])
real_build = router_factory.build_router
router_factory.build_router = slow_build
t = gevent.spawn(ticker)
gevent.sleep(0.05)

# Building the services (start-up, and every config reload) leaves the loop running.
started = time.monotonic()
svc = api_server.build_services(config)
assert ticks_between(started, time.monotonic()) >= 5, "the loop stopped while the router was built"

# So does a routing decision, through the view's own path.
with app.app_context():
    started = time.monotonic()
    decision = views.decide_route(svc, request("something only the slow router can place"))
    assert ticks_between(started, time.monotonic()) >= 5, "the loop stopped while the router decided"
assert SlowRouter.calls == [["something only the slow router can place"]], SlowRouter.calls

# The real embedding router, 16 long messages at once on the pool's threads (whose shared
# encoder passes wait on each other): every decision is the one the router makes alone.
router_factory.build_router = real_build
svc = api_server.build_services(config)
texts = [("Please review this code carefully. " * 40) + f" Item {i}: write a python function." for i in range(8)]
texts += [("Once upon a time there was a quiet sea. " * 40) + f" Verse {i}: write a poem." for i in range(8)]

def decide(text):
    return svc.router.route([text])  # what decide_route asks (above); capabilities aside

greenlets = [gevent.spawn(decide, text) for text in texts]
gevent.joinall(greenlets, raise_error=True)
inner = svc.router.router.router
for text, greenlet in zip(texts, greenlets):
    alone = inner.route([text])
    assert (greenlet.value.label, round(greenlet.value.score, 5)) == (alone.label, round(alone.score, 5)), text[-40:]
assert {"coder", "writer"} <= {g.value.label for g in greenlets}, [g.value.label for g in greenlets]
t.kill()
print("ok")
"""


def test_under_gevent_building_a_router_and_deciding_leave_other_greenlets_running(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"
    config = write_project(tmp_path, {"router": {"model_path": "use-multilingual"}}, default_experts(url, url))
    done = subprocess.run([sys.executable, "-c", PATCHED_CHILD, str(config), str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]


class Fixed:
    def route(self, user_texts: object) -> str:
        return "decided"


def test_without_gevent_the_off_loop_router_is_a_plain_call_and_keeps_its_name() -> None:
    router = OffLoopRouter(Fixed())  # type: ignore[arg-type]
    assert router.route(["hello"]) == "decided"
    assert router_name(DecisionCache(router, 8)) == "Fixed"  # type: ignore[arg-type]
