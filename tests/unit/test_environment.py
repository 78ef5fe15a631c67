"""Environment variables that stand in for config fields: applied when good, and a one-line
error naming the variable when not (checked through the real server command too)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from modules.config_manager import config_from_environment
from modules.errors import ConfigError
from tests.contract.conftest import REPO


def test_good_values_override_the_file() -> None:
    config = config_from_environment({"LEMOE_HOST": "127.0.0.2", "LEMOE_PORT": " 8080 ", "LEMOE_CLIENT_TIMEOUT": "2.5",
                                      "LEMOE_ENCODER_PASS": "NumPy"})
    assert (config.server.host, config.server.port, config.server.client_timeout) == ("127.0.0.2", 8080, 2.5)


def test_unset_or_empty_values_leave_the_file_alone() -> None:
    config = config_from_environment({"LEMOE_PORT": "", "LEMOE_CLIENT_TIMEOUT": "  "})
    assert config.server.port == 11435 and config.server.client_timeout == 30


BAD = [("LEMOE_PORT", "abc"), ("LEMOE_PORT", "0"), ("LEMOE_PORT", "70000"), ("LEMOE_PORT", "80.5"),
       ("LEMOE_CLIENT_TIMEOUT", "soon"), ("LEMOE_CLIENT_TIMEOUT", "0"), ("LEMOE_CLIENT_TIMEOUT", "-1"),
       ("LEMOE_CLIENT_TIMEOUT", "nan"), ("LEMOE_CLIENT_TIMEOUT", "1e9"), ("LEMOE_ENCODER_PASS", "numpi")]


@pytest.mark.parametrize(("variable", "value"), BAD)
def test_a_bad_value_is_an_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_environment({variable: value})
    message = str(info.value)
    assert message.startswith(f"${variable}={value!r}: ") and "\n" not in message


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LEMOE_", "PROMETHEUS_"))}
    # On a port another socket listens on: a server that got as far as binding fails there
    # instead of serving.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        return subprocess.run([sys.executable, str(REPO / "api_server.py"), "--host", "127.0.0.1", "--port", port],
                              cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("variable", "value", "reason"), [
    ("LEMOE_PORT", "abc", "Input should be a valid integer"),
    ("LEMOE_CLIENT_TIMEOUT", "soon", "Input should be a valid number"),
    ("LEMOE_ENCODER_PASS", "numpi", "must be unset or one of numpy"),
    ("PROMETHEUS_MULTIPROC_DIR", "/proc/lemoe-metrics", "No such file or directory"),
])
def test_the_server_command_stops_with_one_line_naming_the_variable(variable: str, value: str, reason: str) -> None:
    done = _serve({variable: value})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"LeMoE: invalid configuration: ${variable}={value!r}: ")
    assert reason in lines[0]
