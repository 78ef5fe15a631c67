"""Config hot reload: an edit to config.json or the experts file takes effect without a restart.

Each worker process polls the two files once a second with `os.stat` (modification time, size,
inode). Polling, not inotify: Kubernetes updates a mounted ConfigMap by pointing a `..data`
symlink at a new folder, which never writes to the watched path itself, but `os.stat` follows
the symlinks and sees another inode. The paths are watched as configured, not resolved, since
the folder a ConfigMap symlink points at today is deleted at the next update.

On a change the files are loaded again with `load_config`, the one validator:
- invalid (bad JSON, an unknown field, a duplicate expert, ...): the running configuration stays,
  and the log says which file and field, as at start-up;
- valid: new services (router, runner and its backends, model catalog) are built around the same
  model pool, so loaded local models survive, and swapped in with one assignment. A request
  reads the services once when it starts, so it finishes on the set it started with.

A worker also compares the files with its configuration once when it starts (`catch_up`): the
gunicorn master loads the configuration once and forks every worker with that copy, so a worker
booted after an edit, or one gunicorn starts to replace a dead worker, would otherwise serve the
configuration of the server's start.

The old runner is closed once a request that picked it up just before the swap has had time to
get its first answer (connect + read timeout). Closing it does not cut streams still running on
it: an HTTP expert's close only drops its idle pooled connections, a streaming response keeps its
own connection until it ends, and local experts' models belong to the pool, which is kept.

Some settings are read once when the server starts: `server.host`, `port`, `workers`,
`threads`, `client_timeout`, `log_file`, and the `rate_limit`, `auth` and `cors` sections. A
change to them is logged as "needs restart" and the running values stay in effect.
`max_body_bytes`, `max_image_body_bytes` and `log_level` apply at once; timeouts and the cool-down apply through the new
runner (which starts with a clean failure record).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask

from modules.guards.body_limit import IMAGE_LIMIT_KEY, image_body_limit
from modules.config_manager import AppConfig, load_config
from modules.embedding_runner import EmbeddingRunner
from modules.errors import ConfigError
from modules.expert_runner import ExpertRunner
from modules.services import Services
from modules.logger import get_logger
from modules.ops.metrics import record_config_reload

log = get_logger("reload")

POLL_SECONDS = 1.0
_SERVICES = "lemoe"
# Read once at start-up; a change needs a restart.
RESTART_SERVER_FIELDS = ("host", "port", "workers", "threads", "client_timeout", "log_file",
                         "max_request_line_bytes", "max_header_fields", "max_header_field_bytes", "preload_encoder")
RESTART_SECTIONS = ("rate_limit", "auth", "cors")

Rebuild = Callable[[AppConfig, Services], Services]
FileStamp = tuple[int, int, int, int] | None


def watched_paths(config: AppConfig) -> tuple[Path, Path]:
    """config.json and the experts file, as configured: symlinks are followed at each stat."""
    return config.config_path, config.project_dir / config.router.categories_file


def stamp_files(paths: tuple[Path, ...]) -> tuple[FileStamp, ...]:
    """What `os.stat` says about each file (None when it is missing)."""
    stamps: list[FileStamp] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
    return tuple(stamps)


def restart_settings(config: AppConfig) -> dict[str, Any]:
    """The settings a running server cannot change, by dotted name."""
    settings: dict[str, Any] = {f"server.{f}": getattr(config.server, f) for f in RESTART_SERVER_FIELDS}
    settings.update({section: getattr(config, section).model_dump() for section in RESTART_SECTIONS})
    return settings


def changes_needing_restart(before: AppConfig, after: AppConfig) -> list[str]:
    old, new = restart_settings(before), restart_settings(after)
    return [name for name in old if old[name] != new[name]]


def config_with_running_settings(fresh: AppConfig, running: AppConfig) -> AppConfig:
    """`fresh`, with the start-up-only settings the server actually runs with (command-line
    overrides included), so the services never claim a port or a limit that is not in effect."""
    server = fresh.server.model_copy(update={f: getattr(running.server, f) for f in RESTART_SERVER_FIELDS})
    return fresh.model_copy(update={"server": server, **{s: getattr(running, s) for s in RESTART_SECTIONS}})


def retire_grace_seconds(config: AppConfig) -> float:
    """How long a request that took the old services may still be waiting for its first answer."""
    read = max([config.server.read_timeout, *(e.timeout or 0 for e in config.experts)])
    return config.server.connect_timeout + read


class ConfigWatcher:
    """Reloads one app's configuration when its files change (`check`), polled by `start`."""

    def __init__(self, app: Flask, rebuild: Rebuild, clock: Callable[[], float] = time.monotonic) -> None:
        # Weak, so that the polling thread does not keep an app alive that its owner dropped.
        self._app = weakref.ref(app)
        self._rebuild = rebuild
        self._clock = clock
        config = self._services(app).config
        self._paths = watched_paths(config)
        self._stamps = stamp_files(self._paths)
        # The configuration as the files said it at the last load, before command-line
        # overrides: an edit of a start-up-only setting is told from an override against it.
        self._file_config: AppConfig | None = None
        # Runners of replaced services (chat and embeddings), closed once their answers are done.
        self._retired: list[tuple[float, ExpertRunner | EmbeddingRunner]] = []
        self._lock = threading.Lock()

    def start(self, interval: float = POLL_SECONDS) -> None:
        threading.Thread(target=self._poll, args=(interval,), name="lemoe-config-watcher", daemon=True).start()

    def catch_up(self) -> bool | None:
        """Load the files once and serve them if they differ from the running configuration.

        The gunicorn master loads the configuration once and forks workers with that copy, so
        a worker started after an edit (a late boot, a replacement for a dead worker) would
        otherwise serve the configuration of the server's start. Runs first in the polling
        thread, off the start-up path. Returns like `check`.
        """
        with self._lock:
            app = self._app()
            if app is None:
                return None
            running = self._services(app)
            # Stamped before loading: an edit that lands meanwhile is seen by the next check.
            self._stamps = stamp_files(self._paths)
            try:
                fresh = load_config(running.config.config_path, running.config.project_dir)
            except ConfigError as exc:
                log.error("the configuration files are invalid; still serving the configuration loaded at "
                          "start-up:\n%s", exc)
                self._file_config = running.config
                record_config_reload(app, ok=False)
                return False
            self._file_config = fresh
            if config_with_running_settings(fresh, running.config) == running.config:
                return None
            return self._swap(app, running, fresh)

    def check(self) -> bool | None:
        """Reload if a watched file changed: True reloaded, False refused (invalid), None unchanged."""
        with self._lock:
            self._close_retired(everything=False)
            stamps = stamp_files(self._paths)
            if stamps == self._stamps:
                return None
            self._stamps = stamps
            if None in stamps:
                missing = [str(p) for p, s in zip(self._paths, stamps, strict=True) if s is None]
                log.warning("config file missing: %s; still serving the previous configuration", ", ".join(missing))
                return False
            return self._reload()

    def _poll(self, interval: float) -> None:
        try:
            self.catch_up()
        except Exception:
            log.exception("config watcher start failed")
        while self._app() is not None:
            time.sleep(interval)
            try:
                self.check()
            except Exception:  # the watcher must outlive one bad round; the server keeps serving
                log.exception("config watcher round failed")
        with self._lock:
            self._close_retired(everything=True)

    def _reload(self) -> bool:
        app = self._app()
        if app is None:
            return False
        running = self._services(app)
        try:
            fresh = load_config(running.config.config_path, running.config.project_dir)
        except ConfigError as exc:
            log.error("configuration change refused, still serving the previous configuration:\n%s", exc)
            record_config_reload(app, ok=False)
            return False
        self._warn_restart_only_changes(running.config, fresh)
        return self._swap(app, running, fresh)

    def _swap(self, app: Flask, running: Services, fresh: AppConfig) -> bool:
        config = config_with_running_settings(fresh, running.config)
        try:
            new = self._rebuild(config, running)
        except Exception:
            log.exception("building the services of the changed configuration failed; still serving the previous one")
            record_config_reload(app, ok=False)
            return False
        app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
        app.config[IMAGE_LIMIT_KEY] = image_body_limit(config.server.max_body_bytes,
                                                       config.server.max_image_body_bytes)
        get_logger().setLevel(config.server.log_level)
        app.extensions[_SERVICES] = new
        paths = watched_paths(config)
        if paths != self._paths:  # the experts file moved (router.categories_file)
            self._paths, self._stamps = paths, stamp_files(paths)
        retire_at = self._clock() + retire_grace_seconds(running.config)
        self._retired += [(retire_at, running.runner), (retire_at, running.embeddings)]
        record_config_reload(app, ok=True)
        log.info("configuration reloaded from %s and %s: %d experts (%s)", *self._paths, len(config.experts),
                 ", ".join(e.label for e in config.experts))
        return True

    def _warn_restart_only_changes(self, running: AppConfig, fresh: AppConfig) -> None:
        changed = changes_needing_restart(self._file_config or running, fresh)
        self._file_config = fresh
        if changed:
            log.warning("%s changed in %s: needs restart (the running values stay in effect until then)",
                        ", ".join(changed), fresh.config_path)

    def _close_retired(self, everything: bool) -> None:
        now = self._clock()
        due = [r for at, r in self._retired if everything or at <= now]
        self._retired = [(at, r) for at, r in self._retired if not (everything or at <= now)]
        for runner in due:
            try:
                runner.close()
            except Exception:
                log.exception("closing the previous configuration's experts failed")

    @staticmethod
    def _services(app: Flask) -> Services:
        return app.extensions[_SERVICES]  # type: ignore[no-any-return]


def watch_config(app: Flask, rebuild: Rebuild, interval: float = POLL_SECONDS) -> ConfigWatcher:
    """Reload `app`'s configuration whenever its files change, from a daemon thread."""
    watcher = ConfigWatcher(app, rebuild)
    watcher.start(interval)
    return watcher
