"""The server command (`python api_server.py`): gunicorn's gevent workers, configured from
`AppConfig`, or Flask's development server with `--dev`.

Each request is a greenlet: a long stream holds one greenlet, not a thread, and a worker's
requests take turns on one OS thread instead of handing Python's GIL to each other. On the
benchmark machine that is 1.2 to 1.3 times the requests per second of the `gthread` worker for
the same CPU (bench/README.md). The process must be patched for gevent before anything else is
imported (`api_server.py` does it first thing); long native calls (local model generation and
loading) run on gevent's thread pool (`modules/blocking.py`).

Workers start fast and hand over without a gap: the master imports the app and loads the
packaged encoder's model before it forks (`modules/ops/preload.py`), so a worker that replaces a dead
one, or a new one after SIGHUP, serves after 0.2 to 0.4 s; and on SIGHUP the old workers are
stopped only once the new ones serve (`modules/ops/worker_handover.py`).

Metrics from several workers: each worker is its own process, so prometheus-client runs in
multiprocess mode. Before any worker starts, the master sets $PROMETHEUS_MULTIPROC_DIR (the
operator's folder if set, else a new temporary folder removed at exit) and empties it of an
earlier run's files; when a worker exits, its live gauges are dropped (`child_exit`), while its
counters stay in the totals, as counters must.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

from modules.config_manager import AppConfig, config_from_environment, with_overrides
from modules.errors import ConfigError
from modules.ops.preload import preload_for_workers

# prometheus-client's own variable (modules/ops/metrics.py reads it). Named here, not imported from
# there: the master imports the app only once the variable is set (preload_for_workers).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LeMoE: an Ollama/OpenAI-compatible router of expert models.")
    parser.add_argument("--config", help="config.json to use (default: $LEMOE_CONFIG or config/config.json)")
    parser.add_argument("--host", help="address to listen on (overrides server.host)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides server.port)")
    parser.add_argument("--workers", type=int, help="gunicorn worker processes (overrides server.workers)")
    parser.add_argument("--dev", action="store_true", help="use Flask's development server instead of gunicorn")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.config:
            os.environ["LEMOE_CONFIG"] = os.path.abspath(args.config)
        config = with_overrides(config_from_environment(), host=args.host, port=args.port, workers=args.workers)
    except ConfigError as exc:
        # One problem fits on the line it names; several get a line each.
        separator = "\n" if "\n" in str(exc) else " "
        print(f"LeMoE: invalid configuration:{separator}{exc}", file=sys.stderr)
        return 2
    if args.dev:
        from api_server import create_app

        create_app(config).run(host=config.server.host, port=config.server.port, threaded=True)
        return 0
    try:
        serve_with_gunicorn(config)
    except ConfigError as exc:
        print(f"LeMoE: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return 0


class _LeMoEGunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: AppConfig) -> None:
        self._config = config
        super().__init__()

    def load_config(self) -> None:
        server = self._config.server
        settings: dict[str, Any] = {
            "bind": f"{server.host}:{server.port}",
            "workers": server.workers,
            # gunicorn's gevent worker, answering its own errors (header too large, ...) in the
            # client's protocol instead of HTML.
            "worker_class": "modules.ops.gevent_worker.LeMoEGeventWorker",
            "limit_request_line": server.max_request_line_bytes,
            "limit_request_fields": server.max_header_fields,
            "limit_request_field_size": server.max_header_field_bytes,
            # Requests (and so open streams) one worker serves at once; more wait to be accepted.
            "worker_connections": server.threads,
            # The worker heartbeats from its own greenlet, so this only kills a hung worker,
            # never a long stream.
            "timeout": 120,
            "graceful_timeout": 10,
            "keepalive": 5,
            # gunicorn's control socket lives at one path per user; several servers on one
            # machine (replicas, tests) would fight over it, and LeMoE does not use it.
            "control_socket_disable": True,
            "child_exit": _forget_dead_worker,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from api_server import create_app

        return create_app(self._config)

    def run(self) -> None:
        # BaseApplication.run, with the arbiter that keeps old workers until new ones serve.
        from modules.ops.worker_handover import HandoverArbiter

        try:
            HandoverArbiter(self).run()
        except RuntimeError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.exit(1)


def _forget_dead_worker(server: Any, worker: Any) -> None:
    # Imported here, in the master, only once $PROMETHEUS_MULTIPROC_DIR is set.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def prepare_metrics_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[Path, bool]:
    """The folder for the workers' metric files, set in `environ` and emptied of stale files.

    Returns the folder and whether it was created here (and so should be removed at exit).
    A configured folder that cannot be used is a `ConfigError` naming the variable. Must run
    before prometheus_client is imported in this process: it reads the variable once.
    """
    configured = environ.get(MULTIPROC_ENV)
    if configured:
        folder = Path(configured)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Counts of an earlier run would otherwise be added to this one's.
            for stale in folder.glob("*.db"):
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigError(f"${MULTIPROC_ENV}={configured[:80]!r}: {exc.strerror or exc}") from None
        return folder, False
    folder = Path(tempfile.mkdtemp(prefix="lemoe-metrics-"))
    environ[MULTIPROC_ENV] = str(folder)
    return folder, True


def serve_with_gunicorn(config: AppConfig) -> None:
    folder, created = prepare_metrics_dir()
    master = os.getpid()
    try:
        preload_for_workers(config)
        _LeMoEGunicorn(config).run()
    finally:
        # Workers are forked inside run() and leave through here too (SystemExit): only the
        # master may remove the folder the other workers still write to.
        if created and os.getpid() == master:
            shutil.rmtree(folder, ignore_errors=True)
