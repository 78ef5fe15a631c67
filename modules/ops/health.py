"""The probes: `GET /health` (the process answers) and `GET /ready` (it can serve chat requests).

Both are outside the rate limit and the API keys (rate_limit.PROBE_PATHS, api_keys.OPEN_PATHS),
and both are cheap enough to be polled every few seconds: readiness never loads a model, never
generates and never calls a remote server. "Ready" means the router is built and the fallback
expert, the one that answers when everything else fails, is usable:
- its backend was built (a missing library or API key leaves a stand-in that always fails);
- for a local expert, its model file (or ONNX folder) is there.
A remote fallback expert that is down is not detected here: that would turn every probe into a
request to it, and the runner already answers 503 in the client's protocol when it fails.
"""

from __future__ import annotations

from flask import Response

from modules.backend_registry import is_unavailable
from modules.config_manager import resolve_local_model_path
from modules.services import Services, json_response, services


def health() -> Response:
    return json_response({"status": "ok"})


def ready() -> Response:
    svc = services()
    problem = readiness_problem(svc)
    if problem is not None:
        return json_response({"status": "unavailable", "reason": problem}, 503)
    return json_response({"status": "ready", "experts": len(svc.config.experts)})


def readiness_problem(svc: Services) -> str | None:
    """Why the server cannot serve chat requests yet, in words fit for a client; None when it can."""
    if svc.router is None:
        return "the router is not loaded"
    return fallback_problem(svc)


def fallback_problem(svc: Services) -> str | None:
    expert = svc.config.fallback_expert
    backend = svc.runner.backend_for(expert)
    if is_unavailable(backend):
        # The reason itself (paths, library errors) is in the start-up log, not for clients.
        return f"fallback expert '{expert.label}' could not be set up (see the server log)"
    if expert.type == "local" and expert.model_path:
        try:
            path = resolve_local_model_path(expert.model_path, svc.config.project_dir,
                                            svc.config.local_models.models_dir)
        except ValueError:
            return f"the model of fallback expert '{expert.label}' cannot be found"
        if not path.exists():
            return f"the model file of fallback expert '{expert.label}' is missing"
    return None
