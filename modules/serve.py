"""Serve the app with gunicorn's threaded workers, configured from `AppConfig`.

Long streams hold a thread each, so the `gthread` worker is used: a sync worker would block
every other request behind one slow answer.
"""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from modules.config_manager import AppConfig


class _LeMoEGunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, config: AppConfig) -> None:
        self._config = config
        super().__init__()

    def load_config(self) -> None:
        server = self._config.server
        settings: dict[str, Any] = {
            "bind": f"{server.host}:{server.port}",
            "workers": server.workers,
            "worker_class": "gthread",
            "threads": server.threads,
            # gthread workers heartbeat from their main loop, so this only kills a hung worker,
            # never a long stream.
            "timeout": 120,
            "graceful_timeout": 10,
            "keepalive": 5,
            # gunicorn's control socket lives at one path per user; several servers on one
            # machine (replicas, tests) would fight over it, and LeMoE does not use it.
            "control_socket_disable": True,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from api_server import create_app

        return create_app(self._config)


def serve_with_gunicorn(config: AppConfig) -> None:
    _LeMoEGunicorn(config).run()
