"""Prometheus metrics: what the gateway does, counted where it happens, served at `GET /metrics`.

    lemoe_http_requests_total{route,method,status}   every answer; `route` is the URL rule
                                                      (`/v1/models/<path:model_id>`), `unmatched`
                                                      for unknown URLs
    lemoe_route_decisions_total{expert,method}        routing decisions of chat requests (the
                                                      `/v1/route` dry runs are not counted)
    lemoe_route_duration_seconds{method}              time the router took (dry runs included)
    lemoe_expert_duration_seconds{expert,stream}      start of an answer to its end (a stream ends
                                                      when its last chunk is out or the client left)
    lemoe_expert_first_event_seconds{expert}          streams: time to the first event (first token),
                                                      a fallback's included
    lemoe_fallbacks_total{expert,cause}               answers the fallback expert gave instead of
                                                      `expert`; cause: timeout, unavailable,
                                                      stream_broken, cooldown or other
    lemoe_local_models_loaded                         local models in memory, summed over workers
    lemoe_config_reloads_total{result}                hot reloads: ok or invalid

Under gunicorn every worker is its own process, so the counts use prometheus-client's
multiprocess mode: each worker writes its values to memory-mapped files in
$PROMETHEUS_MULTIPROC_DIR (serve.py creates that folder and forgets dead workers' gauges), and a
scrape, whichever worker answers it, adds up the files of all workers. Without the variable (the
development server, tests in one process) each app counts in its own registry.

prometheus_client is imported inside the functions below, never when this module is imported: it
chooses in-memory or file-backed values once, on its first import, from $PROMETHEUS_MULTIPROC_DIR,
and the gunicorn master sets that variable only after api_server (and so this module) is loaded.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, Response, current_app, request

from modules.chat_types import RouteDecision
from modules.config_manager import ExpertConfig
from modules.logger import get_logger

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from modules.expert_runner import ExpertRun

log = get_logger("metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_EXTENSION = "lemoe_metrics"
# Routing is pure CPU over short texts: tens of microseconds, up to milliseconds for long ones.
_ROUTE_BUCKETS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
_FIRST_EVENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_EXPERT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# How often each worker reports how many local models it holds (the pool has no load hook).
_MODEL_SAMPLE_SECONDS = 1.0
# Fallback causes are free text ("ExpertTimeout: read timed out after 3s"); labels must be few.
_CAUSE_LABELS = {"ExpertTimeout": "timeout", "ExpertUnavailable": "unavailable",
                 "ExpertStreamBroken": "stream_broken", "in cool-down": "cooldown"}


@dataclass
class Metrics:
    """One app's metric objects; `registry` is None in multiprocess mode (the files are the registry)."""

    registry: CollectorRegistry | None
    requests: Counter
    route_decisions: Counter
    route_seconds: Histogram
    expert_seconds: Histogram
    first_event_seconds: Histogram
    fallbacks: Counter
    local_models: Gauge
    config_reloads: Counter


def is_multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def build_metrics(multiprocess: bool) -> Metrics:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = None if multiprocess else CollectorRegistry(auto_describe=True)
    return Metrics(
        registry=registry,
        requests=Counter("lemoe_http_requests", "HTTP requests answered, by route template and status.",
                         ["route", "method", "status"], registry=registry),
        route_decisions=Counter("lemoe_route_decisions", "Routing decisions of chat requests.",
                                ["expert", "method"], registry=registry),
        route_seconds=Histogram("lemoe_route_duration_seconds", "Time the router took to decide.",
                                ["method"], buckets=_ROUTE_BUCKETS, registry=registry),
        expert_seconds=Histogram("lemoe_expert_duration_seconds", "Time from the start of an answer to its end.",
                                 ["expert", "stream"], buckets=_EXPERT_BUCKETS, registry=registry),
        first_event_seconds=Histogram("lemoe_expert_first_event_seconds",
                                      "Streams: time until the expert's first event (first token).",
                                      ["expert"], buckets=_FIRST_EVENT_BUCKETS, registry=registry),
        fallbacks=Counter("lemoe_fallbacks", "Answers the fallback expert gave instead of the chosen expert.",
                          ["expert", "cause"], registry=registry),
        local_models=Gauge("lemoe_local_models_loaded", "Local models loaded in memory.",
                           registry=registry, multiprocess_mode="livesum"),
        config_reloads=Counter("lemoe_config_reloads", "Configuration hot reloads, by result.",
                               ["result"], registry=registry),
    )


def init_metrics(app: Flask) -> Metrics:
    """Count every request of `app`, sample its model pool, and keep the metrics on the app."""
    multiprocess = is_multiprocess()
    if multiprocess:
        _check_value_class()
    metrics = build_metrics(multiprocess)
    app.extensions[_EXTENSION] = metrics
    app.after_request(_count_request)
    _start_model_sampler(app, metrics)
    return metrics


def metrics_of(app: Flask) -> Metrics | None:
    return app.extensions.get(_EXTENSION)


def _current() -> Metrics | None:
    return current_app.extensions.get(_EXTENSION)


def _check_value_class() -> None:
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        log.error("prometheus_client was imported before $%s was set: each worker will report only its "
                  "own counts", MULTIPROC_ENV)


# --- recording (called from the views) -----------------------------------------------------------

def _count_request(response: Response) -> Response:
    metrics = _current()
    if metrics is not None:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
    return response


def record_route(decision: RouteDecision, seconds: float, *, dry_run: bool = False) -> None:
    """A routing decision and how long it took; a dry run (`/v1/route`) only adds to the timing."""
    metrics = _current()
    if metrics is None:
        return
    metrics.route_seconds.labels(decision.method).observe(seconds)
    if not dry_run:
        metrics.route_decisions.labels(decision.label, decision.method).inc()


def observe_stream(requested: ExpertConfig, run: ExpertRun, started: float) -> Callable[[], None]:
    """Record a started stream (first event, fallback) and return its closer, which also records
    the stream's duration. Called in the request; the closer runs after it, when the stream ends."""
    metrics = _current()
    if metrics is None:
        return run.close
    now = time.perf_counter()
    metrics.first_event_seconds.labels(run.expert.label).observe(now - started)
    if run.fallback_cause is not None:
        metrics.fallbacks.labels(requested.label, fallback_cause_label(run.fallback_cause)).inc()
    duration = metrics.expert_seconds.labels(run.expert.label, "true")

    def close() -> None:
        try:
            run.close()
        finally:
            duration.observe(time.perf_counter() - started)

    return close


def observe_answer(requested: ExpertConfig, answered_by: ExpertConfig, cause: str | None, started: float) -> None:
    """Record a whole (non-streamed) answer: its duration and, if it fell back, why."""
    metrics = _current()
    if metrics is None:
        return
    metrics.expert_seconds.labels(answered_by.label, "false").observe(time.perf_counter() - started)
    if cause is not None:
        metrics.fallbacks.labels(requested.label, fallback_cause_label(cause)).inc()


def record_config_reload(app: Flask, ok: bool) -> None:
    metrics = metrics_of(app)
    if metrics is not None:
        metrics.config_reloads.labels("ok" if ok else "invalid").inc()


def fallback_cause_label(cause: str) -> str:
    """'ExpertTimeout: read timed out after 3s' -> 'timeout'; 'in cool-down' -> 'cooldown'."""
    return _CAUSE_LABELS.get(cause.split(":", 1)[0].strip(), "other")


def _start_model_sampler(app: Flask, metrics: Metrics) -> None:
    # A weak reference, so that an app dropped by its owner (tests build many) ends the thread.
    app_ref = weakref.ref(app)

    def sample() -> None:
        while True:
            app = app_ref()
            if app is None:
                return
            services = app.extensions.get("lemoe")
            del app
            if services is not None:
                try:
                    metrics.local_models.set(len(services.pool.loaded()))
                except Exception:  # a metric must never take a worker down
                    log.exception("sampling the loaded models failed")
            time.sleep(_MODEL_SAMPLE_SECONDS)

    threading.Thread(target=sample, name="lemoe-metrics-sampler", daemon=True).start()


# --- reading -------------------------------------------------------------------------------------

def _registry_for_reading(metrics: Metrics) -> CollectorRegistry:
    if metrics.registry is not None:
        return metrics.registry
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def exposition_from_metrics(metrics: Metrics) -> tuple[bytes, str]:
    """The Prometheus text format of every metric (all workers' in multiprocess mode), and its type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(_registry_for_reading(metrics)), CONTENT_TYPE_LATEST


def route_counts(metrics: Metrics) -> dict[str, dict[str, int]]:
    """Routing decisions so far (all workers), by expert label, then by method."""
    counts: dict[str, dict[str, int]] = {}
    for family in _registry_for_reading(metrics).collect():
        if family.name != "lemoe_route_decisions":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                by_method = counts.setdefault(sample.labels["expert"], {})
                by_method[sample.labels["method"]] = by_method.get(sample.labels["method"], 0) + int(sample.value)
    return counts


def serve_metrics() -> Response:
    metrics = _current()
    if metrics is None:
        return Response("metrics are off\n", status=404, content_type="text/plain; charset=utf-8")
    body, content_type = exposition_from_metrics(metrics)
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})
