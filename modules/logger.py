"""One configured logger for the whole app, and the sanitiser for user text in log lines."""

from __future__ import annotations

import logging
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


def setup_logging(server: ServerConfig, project_dir: Path) -> logging.Logger:
    """Configure the `lemoe` logger once per process (idempotent, safe under test re-use).

    Handlers write synchronously: a record is on disk when the request that logged it has been
    answered, which operators (and tests) reading the log rely on. One INFO line per request
    keeps the cost small.
    """
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
        logger.addHandler(output)
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
