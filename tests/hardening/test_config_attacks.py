"""Hostile configuration: SSRF targets in expert URLs, traversal in labels, model paths and
config paths. Each case asserts the exact ConfigError line (file, field, reason)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modules.config_manager import load_config
from modules.errors import ConfigError

FALLBACK = {"id": 0, "label": "fallback", "type": "ollama", "url": "http://127.0.0.1:11434", "model_name": "m"}


def write(project: Path, experts: list[dict[str, Any]], config: dict[str, Any] | None = None) -> Path:
    (project / "config").mkdir(parents=True, exist_ok=True)
    (project / "models").mkdir(exist_ok=True)
    (project / "config" / "experts.json").write_text(json.dumps({"experts": experts}))
    path = project / "config" / "config.json"
    path.write_text(json.dumps(config or {}))
    return path


def config_error(project: Path, experts: list[dict[str, Any]], config: dict[str, Any] | None = None) -> str:
    path = write(project, experts, config)
    with pytest.raises(ConfigError) as info:
        load_config(path, project_dir=project)
    return str(info.value)


def expert(**fields: Any) -> dict[str, Any]:
    return {"id": 1, "label": "coder", "type": "ollama", "url": "http://127.0.0.1:11434", "model_name": "m", **fields}


FORBIDDEN_URLS = {
    "http://169.254.169.254/latest/meta-data": "points at a forbidden address (169.254.169.254)",
    "http://169.254.170.2/v2/credentials": "points at a forbidden address (169.254.170.2)",
    "http://[fe80::1]:11434": "points at a forbidden address (fe80::1)",
    "http://[fe80::a:b%25eth0]:11434": "points at a forbidden address (fe80::a:b%25eth0)",
    "http://[febf::1]": "points at a forbidden address (febf::1)",
    "http://[fd00:ec2::254]/latest": "points at a forbidden address (fd00:ec2::254)",
    "http://[::ffff:169.254.169.254]": "points at a forbidden address (::ffff:a9fe:a9fe)",
    "http://[64:ff9b::a9fe:a9fe]": "points at a forbidden address (64:ff9b::a9fe:a9fe)",
    "http://[2002:a9fe:a9fe::1]": "points at a forbidden address (2002:a9fe:a9fe::1)",
    "http://100.100.100.200/latest": "points at a forbidden address (100.100.100.200)",
    "http://0.0.0.0:11434": "points at a forbidden address (0.0.0.0)",
    "http://[::]:11434": "points at a forbidden address (::)",
    "http://224.0.0.251": "points at a forbidden address (224.0.0.251)",
    # Names the resolver turns into the metadata address without any DNS server.
    "http://2852039166/": "points at a forbidden address (2852039166 resolves to 169.254.169.254)",
    "http://0xa9fea9fe/": "points at a forbidden address (0xa9fea9fe resolves to 169.254.169.254)",
    "http://0251.0376.0251.0376/": "points at a forbidden address (0251.0376.0251.0376 resolves to 169.254.169.254)",
    "http://169.254.43518/": "points at a forbidden address (169.254.43518 resolves to 169.254.169.254)",
    "http://metadata.google.internal/computeMetadata": "points at a cloud metadata service",
    "http://METADATA.google.internal./": "points at a cloud metadata service",
    "http://metadata/": "points at a cloud metadata service",
    "http://instance-data/latest": "points at a cloud metadata service",
    "file:///etc/passwd": "must be an http:// or https:// URL",
    "gopher://127.0.0.1:6379/_FLUSHALL": "must be an http:// or https:// URL",
    "ftp://127.0.0.1/": "must be an http:// or https:// URL",
    "javascript:alert(1)": "must be an http:// or https:// URL",
    "http://": "has no host",
    "http://[::1": "is not a valid URL",
}


@pytest.mark.parametrize("url,reason", FORBIDDEN_URLS.items(), ids=list(FORBIDDEN_URLS))
def test_ssrf_expert_url_is_refused_at_load(tmp_path: Path, url: str, reason: str) -> None:
    message = config_error(tmp_path, [FALLBACK, expert(url=url)])
    assert message == f"{tmp_path / 'config' / 'experts.json'}: experts[1].url: {reason}"


@pytest.mark.parametrize("field", ["url", "api_base"])
def test_ssrf_applies_to_api_base_too(tmp_path: Path, field: str) -> None:
    extra = {"type": "api", "provider": "openai", "url": None} if field == "api_base" else {}
    message = config_error(tmp_path, [FALLBACK, expert(**{**extra, field: "http://2852039166/v1"})])
    reason = "points at a forbidden address (2852039166 resolves to 169.254.169.254)"
    assert message.endswith(f"experts[1].{field}: {reason}")


@pytest.mark.parametrize("url", ["http://127.0.0.1:11434", "http://localhost:11434", "http://[::1]:8000/v1",
                                 "http://10.0.0.5:11434", "http://192.168.1.20:8080", "http://172.16.0.3",
                                 "http://[fd12:3456::1]:11434", "https://ollama.lan:443"])
def test_private_and_loopback_urls_stay_allowed(tmp_path: Path, url: str) -> None:
    config = load_config(write(tmp_path, [FALLBACK, expert(url=url)]), project_dir=tmp_path)
    assert config.experts[1].url == url.rstrip("/")


LABELS = ["../evil", "a/b", "a\\b", "..", "x..y", ".hidden", "", "a" * 65, "name with space", "lemoe", "LeMoE",
          "bell\x07", "ansi\x1b[31m", "nul\x00"]


@pytest.mark.parametrize("label", LABELS, ids=[repr(x) for x in LABELS])
def test_unsafe_label_is_refused(tmp_path: Path, label: str) -> None:
    message = config_error(tmp_path, [FALLBACK, expert(label=label)])
    assert message.startswith(f"{tmp_path / 'config' / 'experts.json'}: experts[1].label: ")
    assert "must be 1-64 characters" in message or "reserved for the router" in message


MODEL_PATHS = {
    "../../etc/passwd": "is outside",
    "models/../../secret.gguf": "is outside",
    "/etc/passwd": "must be relative to models/",
    "pkg:json/../../../../etc/passwd": "is outside",
    "pkg:../x/model.gguf": "must look like pkg:<package>/<file>",
    "pkg:not_installed_pkg_xyz/m.gguf": "package 'not_installed_pkg_xyz' is not installed",
}


@pytest.mark.parametrize("model_path,reason", MODEL_PATHS.items(), ids=list(MODEL_PATHS))
def test_model_path_is_confined(tmp_path: Path, model_path: str, reason: str) -> None:
    local = {"id": 1, "label": "local", "type": "local", "format": "gguf", "model_path": model_path}
    message = config_error(tmp_path, [FALLBACK, local])
    assert message.startswith(f"{tmp_path / 'config' / 'experts.json'}: experts[1].model_path: ")
    assert reason in message


@pytest.mark.parametrize("categories_file", ["../outside.json", "/etc/passwd", "config/../../x.json"])
def test_categories_file_is_confined_to_the_project(tmp_path: Path, categories_file: str) -> None:
    message = config_error(tmp_path, [FALLBACK], {"router": {"categories_file": categories_file}})
    assert message.startswith(f"{tmp_path / 'config' / 'config.json'}: router.categories_file: ")
    assert "is outside" in message


def test_api_key_in_place_of_its_env_name_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, [FALLBACK, expert(type="openai", api_key_env="sk-live-123")])
    assert message.endswith("experts[1].api_key_env: must be the NAME of an environment variable, not a key")


@pytest.mark.parametrize("log_file", ["../escape.log", "/var/log/lemoe.log", "logs/../../escape.log"])
def test_log_file_is_confined_to_the_project(tmp_path: Path, log_file: str) -> None:
    import logging

    from modules.config_manager import ServerConfig
    from modules.logger import LOGGER_NAME, setup_logging

    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        with pytest.raises(ValueError, match="is outside"):
            setup_logging(ServerConfig(log_file=log_file), tmp_path)
    finally:
        # setup_logging reconfigures the process-wide logger: put it back for the other tests.
        logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]
    assert not (tmp_path.parent / "escape.log").exists()
