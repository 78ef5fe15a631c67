"""The deployment files, checked as far as this machine can without a Docker engine or a cluster.

- Dockerfiles: every file they copy exists, they expose 11435 and declare the three volumes,
  and the files the default image copies are enough to start the server (started for real
  from a copy of exactly those files).
- compose.yaml and the Kubernetes manifest parse as YAML and wire up what the README says;
  the configuration files they ship load through the project's own validator.
- nginx.conf parses (crossplane, nginx's grammar) and has the directives streaming needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import crossplane
import pytest
import requests
import yaml

from modules.config_manager import ServerConfig, load_config
from tests.live_server import live_server

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.debian", "Dockerfile.cuda")
VOLUMES = {"/app/config", "/app/models", "/app/data"}
K8S = REPO / "deploy" / "k8s" / "lemoe.yaml"


# --- Dockerfiles --------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def copy_sources(path: Path) -> list[str]:
    """What the Dockerfile copies from the build context (the repository root)."""
    sources: list[str] = []
    for keyword, args in dockerfile_instructions(path):
        if keyword != "COPY":
            continue
        words = args.split()
        if any(w.startswith("--from=") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources += words[:-1]
    return sources


def args_of(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions(path) if kw == keyword]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_only_files_that_exist(name: str) -> None:
    sources = copy_sources(DOCKER / name)
    assert {"setup.sh", "start.sh", "api_server.py", "modules/", "config/"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"{name} copies {source}, which is not in the repository"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_exposes_the_port_and_declares_the_volumes(name: str) -> None:
    path = DOCKER / name
    assert args_of(path, "EXPOSE") == ["11435"]
    (volumes,) = args_of(path, "VOLUME")
    assert set(json.loads(volumes)) == VOLUMES
    assert args_of(path, "CMD") == ['["./start.sh"]']
    # A non-root user, and the health check on the liveness path.
    assert args_of(path, "USER") == ["lemoe"]
    (health,) = args_of(path, "HEALTHCHECK")
    assert "/health" in health


def test_images_are_built_on_the_advertised_bases() -> None:
    slim = args_of(DOCKER / "Dockerfile", "ARG")
    assert any(a.startswith("PYTHON_IMAGE=python:3.11-slim") for a in slim)
    debian = args_of(DOCKER / "Dockerfile.debian", "ARG")
    assert any(a.startswith("PYTHON_IMAGE=python:3.11-bookworm") for a in debian)
    cuda = DOCKER / "Dockerfile.cuda"
    assert all(f.startswith("nvidia/cuda:") for f in (a.split()[0] for a in args_of(cuda, "FROM")))
    (env_block,) = [a for a in args_of(cuda, "ENV") if "CMAKE_ARGS" in a]
    assert "-DGGML_CUDA=on" in env_block


def test_the_files_the_default_image_copies_are_enough_to_serve(tmp_path: Path) -> None:
    """Lay out /app as docker/Dockerfile does (minus the venv) and start the server from it."""
    app = tmp_path / "app"
    app.mkdir()
    for source in copy_sources(DOCKER / "Dockerfile"):
        target = app / source.rstrip("/")
        if source.endswith("/"):
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / source, target)
    for folder in ("logs", "data", "models"):
        (app / folder).mkdir(exist_ok=True)
    # The copy's own api_server.py and shipped config, and none of this environment but a PATH.
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    with live_server(None, app, app_dir=app, args=("--host", "127.0.0.1"), env=env, inherit_env=False,
                     ready_path="/api/tags") as server:
        tags = requests.get(server.url + "/api/tags", timeout=10)
        names = {m["name"] for m in tags.json()["models"]}
        assert {"lemoe:latest", "fallback:latest", "programador:latest"} <= names
        # Served from the copy, not from the checkout.
        assert (app / "logs" / "lemoe.log").exists()


# --- compose --------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to docker/) for the `./x:/y[:ro]` volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        mounts[container] = host
    return mounts


def test_compose_runs_replicas_behind_nginx_with_redis() -> None:
    services = compose()["services"]
    assert set(services) == {"lemoe", "nginx", "redis"}
    lemoe, nginx, redis = services["lemoe"], services["nginx"], services["redis"]
    assert lemoe["deploy"]["replicas"] >= 2
    # Only nginx is published; the replicas are reached through it.
    assert nginx["ports"] == ["11435:11435"] and "ports" not in lemoe
    assert lemoe["expose"] == ["11435"]
    assert lemoe["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in redis
    build = lemoe["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()


def test_compose_mounts_exist_and_cover_config_and_models() -> None:
    services = compose()["services"]
    lemoe_mounts = bind_mounts(services["lemoe"])
    assert lemoe_mounts["/app/config"] == "./config" and lemoe_mounts["/app/models"] == "models"
    assert "models" in compose()["volumes"]
    nginx_mounts = bind_mounts(services["nginx"])
    assert nginx_mounts["/etc/nginx/nginx.conf"] == "./nginx.conf"
    for mounts in (lemoe_mounts, nginx_mounts):
        for host in mounts.values():
            if host.startswith("./"):
                assert (DOCKER / host).exists(), f"compose mounts {host}, which does not exist"


def load_shipped_config(tmp_path: Path, config_json: str, experts_json: str) -> Any:
    (tmp_path / "config").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "config" / "config.json").write_text(config_json)
    (tmp_path / "config" / "experts.json").write_text(experts_json)
    return load_config(tmp_path / "config" / "config.json", tmp_path)


def test_compose_config_shares_rate_limits_through_redis(tmp_path: Path) -> None:
    config = load_shipped_config(tmp_path, (DOCKER / "config" / "config.json").read_text(),
                                 (DOCKER / "config" / "experts.json").read_text())
    assert config.rate_limit.storage_uri == "redis://redis:6379"
    # nginx is the one proxy in front: its X-Forwarded-For is the client's address.
    assert config.rate_limit.trusted_proxies == 1
    assert config.server.host == "0.0.0.0" and config.server.port == 11435
    assert config.server.log_file == ""
    # Same experts as the checkout's defaults, only reached on the Docker host.
    default = load_config(REPO / "config" / "config.json", REPO)
    assert [e.label for e in config.experts] == [e.label for e in default.experts]
    assert {e.url for e in config.experts if e.url} == {"http://host.docker.internal:11434"}


# --- nginx ----------------------------------------------------------------------------------------

def nginx_blocks() -> list[dict[str, Any]]:
    parsed = crossplane.parse(str(DOCKER / "nginx.conf"), combine=True)
    assert parsed["status"] == "ok", parsed["errors"]
    return parsed["config"][0]["parsed"]


def find(blocks: list[dict[str, Any]], name: str, args: list[str] | None = None) -> dict[str, Any]:
    """The first directive `name` (with `args`, if given) among `blocks`, searched depth first."""
    for block in blocks:
        if block["directive"] == name and (args is None or block["args"] == args):
            return block
        found = find(block.get("block", []), name, args) if "block" in block else None
        if found:
            return found
    return {}


def server_block(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The http `server { }` block (not the upstream's `server` line)."""
    return next(d for d in find(blocks, "http")["block"] if d["directive"] == "server")


def test_nginx_proxies_to_the_replicas_without_buffering_streams() -> None:
    blocks = nginx_blocks()
    upstream = find(blocks, "upstream", ["lemoe"])
    assert find(upstream["block"], "server")["args"] == ["lemoe:11435"]
    server = server_block(blocks)
    assert find(server["block"], "listen")["args"] == ["11435"]
    location = find(server["block"], "location", ["/"])["block"]
    directive = {d["directive"]: d["args"] for d in location}
    assert directive["proxy_pass"] == ["http://lemoe"]
    assert directive["proxy_buffering"] == ["off"]
    assert directive["proxy_http_version"] == ["1.1"]
    headers = {d["args"][0]: d["args"][1] for d in location if d["directive"] == "proxy_set_header"}
    assert headers["X-Forwarded-For"] == "$remote_addr"
    assert headers["Connection"] == ""
    assert int(directive["proxy_read_timeout"][0].removesuffix("s")) >= 300


def test_nginx_body_cap_matches_the_server_default() -> None:
    server = server_block(nginx_blocks())
    (size,) = find(server["block"], "client_max_body_size")["args"]
    assert size == "1m"
    assert ServerConfig().max_body_bytes == 1024 * 1024


def test_nginx_own_errors_are_json_in_both_protocols() -> None:
    blocks = nginx_blocks()
    for name, status in (("$lemoe_error_413", "413"), ("$lemoe_error_503", "503")):
        mapping = find(blocks, "map", ["$request_uri", name])["block"]
        bodies = {d["directive"]: json.loads(d["args"][0]) for d in mapping}
        assert isinstance(bodies["default"]["error"], str)
        assert set(bodies["~^/v1/"]["error"]) == {"message", "type", "param", "code"}
        location = find(blocks, "location", ["=", f"/_lemoe_{status}"])["block"]
        assert [d["args"] for d in location if d["directive"] == "return"] == [[status, name]]
        assert [d["args"] for d in location if d["directive"] == "default_type"] == [["application/json"]]


# --- Kubernetes -----------------------------------------------------------------------------------

def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_k8s_deployment_probes_ready_and_health() -> None:
    deployment = manifests()[("Deployment", "lemoe")]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 11435}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert VOLUMES <= set(mounts)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/app/config"]]["configMap"]["name"] == "lemoe-config"
    # The image's user; the mounted volumes must be writable for it.
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert pod["spec"]["securityContext"]["fsGroup"] == 10001


def test_k8s_services_select_their_pods() -> None:
    found = manifests()
    for name, port in (("lemoe", 11435), ("lemoe-redis", 6379)):
        service = found[("Service", name)]
        pod_labels = found[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["ports"][0]["port"] == port


def test_k8s_configmap_holds_a_valid_configuration(tmp_path: Path) -> None:
    data = manifests()[("ConfigMap", "lemoe-config")]["data"]
    assert set(data) == {"config.json", "experts.json"}
    config = load_shipped_config(tmp_path, data["config.json"], data["experts.json"])
    assert config.server.host == "0.0.0.0" and config.server.port == 11435
    assert config.rate_limit.storage_uri == "redis://lemoe-redis:6379"
    assert config.fallback_expert.type == "local"


# --- README ---------------------------------------------------------------------------------------

def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_readme_docker_section_matches_the_files() -> None:
    section = readme_section("Docker")
    for needle in ("docker/Dockerfile", "docker/Dockerfile.debian", "docker/Dockerfile.cuda",
                   "docker/compose.yaml", "deploy/k8s/lemoe.yaml", "11435", "redis://redis:6379", *VOLUMES):
        assert needle in section, f"README's Docker section does not mention {needle}"
    for service in compose()["services"]:
        assert f"`{service}`" in section
    assert "not exercised" in section.lower()
