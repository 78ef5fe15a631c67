"""One configured logger for the whole app, and the sanitiser for user text in log lines."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import re
from pathlib import Path

from modules.config_manager import ServerConfig, resolve_inside

LOGGER_NAME = "lemoe"
_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
# ANSI escape sequences (CSI, OSC and two-character escapes), then any remaining C0/C1 controls.
_ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def sanitize(text: str, max_len: int = 200) -> str:
    """Make user text safe for one log line: no ANSI, no control characters, bounded length.

    Newlines become spaces so a prompt cannot forge a log line of its own.
    """
    text = _ANSI_RE.sub("", text)
    text = _CONTROL_RE.sub(" ", text)
    if len(text) > max_len:
        text = text[: max_len - 1] + "…"
    return text


_listener: logging.handlers.QueueListener | None = None


def setup_logging(server: ServerConfig, project_dir: Path) -> logging.Logger:
    """Configure the `lemoe` logger once per process (idempotent, safe under test re-use).

    Request threads only put records on a queue; one listener thread formats and writes them,
    so a slow disk or terminal never adds to a request's latency.
    """
    global _listener
    stop_logging()
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(server.log_level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(_FORMAT)
    outputs: list[logging.Handler] = [logging.StreamHandler()]
    if server.log_file:
        path = resolve_inside(project_dir, server.log_file, "log_file")
        path.parent.mkdir(parents=True, exist_ok=True)
        outputs.append(logging.FileHandler(path, encoding="utf-8"))
    for output in outputs:
        output.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    logger.addHandler(logging.handlers.QueueHandler(records))
    _listener = logging.handlers.QueueListener(records, *outputs, respect_handler_level=False)
    _listener.start()
    return logger


def stop_logging() -> None:
    """Flush the queued records and stop the writer thread (at exit, or before re-configuring)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        for output in _listener.handlers:
            output.close()
        _listener = None


atexit.register(stop_logging)


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
