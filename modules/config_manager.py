"""Load `config.json` and `experts.json` once, validate them, and hand out typed objects.

This is the only module that opens the configuration files. Every other module receives the
typed objects below as arguments. A bad file stops start-up with a `ConfigError` that names the
file, the field and what is wrong.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modules.errors import ConfigError, InvalidRequest
from modules.generation_options import GenerationOptions

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_DIR / "config" / "config.json"
# The model name that means "let the router choose".
ROUTER_MODEL_NAME = "lemoe"
# Expert labels double as model names and file names: keep them to a safe alphabet.
_LABEL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


def check_model_label(v: str) -> str:
    """A name clients ask for as a model (expert labels, the local encoder's name)."""
    if "/" in v or "\\" in v or ".." in v or not _LABEL_RE.match(v):
        raise ValueError("must be 1-64 characters of letters, digits, '_', '-', '.', without '..'")
    if v.lower() == ROUTER_MODEL_NAME:
        raise ValueError(f"'{ROUTER_MODEL_NAME}' is reserved for the router")
    return v


class _Strict(BaseModel):
    # Unknown keys are refused so that a typo in a field name is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(11435, ge=1, le=65535, description="TCP port (Ollama's is 11434).")
    workers: int = Field(1, ge=1, le=64, description="gunicorn worker processes.")
    threads: int = Field(256, ge=1, le=1024, description="Requests one worker serves at once (one per open stream).")
    preload_encoder: bool = Field(False, description="The gunicorn master loads the encoder's model for its workers.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted.")
    max_image_body_bytes: int = Field(
        10_485_760, ge=1024, description="Largest body of a request that carries images (chat and generate routes).")
    # gunicorn's own limits on the request head (its defaults; its maxima as upper bounds).
    max_request_line_bytes: int = Field(4094, ge=256, le=8190, description="Longest request line (414 past it).")
    max_header_fields: int = Field(100, ge=16, le=32768, description="Most request header fields (431 past it).")
    max_header_field_bytes: int = Field(8190, ge=256, le=65536, description="Longest request header field (431 past it).")
    max_upstream_line_bytes: int = Field(
        1_048_576, ge=1024, description="Longest line or SSE event read from a remote expert.")
    # The wordiest framing (OpenAI SSE, about 250 bytes a token with id, model and fingerprint on
    # every chunk) puts a 128k-token answer, the longest output current models offer, near 32 MB;
    # twice that never cuts a real answer, and bounds what an endless stream costs (and what a
    # non-streamed answer holds in memory).
    max_upstream_answer_bytes: int = Field(
        67_108_864, ge=1024, description="Most bytes read from a remote expert for one answer.")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to a remote expert.")
    read_timeout: float = Field(120.0, gt=0, description="Seconds to wait for an expert's next chunk.")
    client_timeout: float = Field(30.0, gt=0, lt=86400, description="Seconds a client has to send its body or take a chunk.")
    log_file: str = Field("logs/lemoe.log", description="Log file under the project ('' = stderr only).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    expert_failures_before_cooldown: int = Field(3, ge=1, description="Failures in a row that bench an expert.")
    expert_cooldown_seconds: float = Field(30.0, ge=0, description="How long a benched expert is skipped.")

    @model_validator(mode="after")
    def _line_fits_in_answer(self) -> ServerConfig:
        if self.max_upstream_line_bytes > self.max_upstream_answer_bytes:
            raise ValueError("max_upstream_line_bytes must not exceed max_upstream_answer_bytes")
        return self


class RateLimitConfig(_Strict):
    per_minute: int = Field(60, ge=0, description="Requests per minute per client IP (sliding window); 0 = off.")
    storage_uri: str = Field("memory://", description="Where counts live: memory:// or redis://host:port.")
    trusted_proxies: int = Field(0, ge=0, le=10, description="Reverse proxies whose X-Forwarded-For is trusted.")


class AuthConfig(_Strict):
    api_keys_env: str = Field("LEMOE_API_KEYS", description="Env var with comma-separated API keys.")
    api_keys_file: str = Field("", description="File (inside the project) with one API key per line.")


class CorsConfig(_Strict):
    allowed_origins: list[str] = Field(default_factory=list, description="Origins allowed besides Ollama's defaults.")


class ScoringWeights(_Strict):
    max_keyword: float = Field(0.40, ge=0, description="Weight of the best single keyword match.")
    description: float = Field(0.30, ge=0, description="Weight of the description similarity.")
    mean_keyword: float = Field(0.20, ge=0, description="Weight of the mean keyword similarity.")
    top3_vote: float = Field(0.10, ge=0, description="Weight of the top-3 keyword consensus.")


class RouterConfig(_Strict):
    mode: Literal["generic", "model"] = Field("generic", description="generic: experts.json; model: trained classifier.")
    router_type: Literal["embedding", "classification"] = Field("embedding", description="Router kind.")
    model_path: str = Field("use-multilingual", description="Router model: use-multilingual, pkg:, HF id or path; '' = keywords only.")
    categories_file: str = Field("config/experts.json", description="experts.json, inside the project.")
    confidence_threshold: float = Field(0.4, ge=0, le=1, description="Minimum score to accept a route.")
    keyword_fallback: bool = Field(True, description="Use keyword + fuzzy matching as a later step.")
    softmax_temperature: float = Field(0.15, gt=0, description="Softmax sharpness of the hybrid scores.")
    scoring_weights: ScoringWeights = Field(default_factory=ScoringWeights)
    context_messages: int = Field(3, ge=1, le=20, description="User messages joined for the cascade.")
    context_max_chars: int = Field(1600, ge=16, description="Cap on the joined cascade text.")
    decision_cache_size: int = Field(4096, ge=0, description="Routing decisions remembered by exact text (0 = off).")
    scoring: Literal["standardized", "reference"] = Field(
        "standardized", description="Embedding confidence: standardised with a 'none' option, or the reference softmax.")
    oos_score: float = Field(2.0, description="Standardised score of the 'none of these experts' option.")
    standardized_temperature: float = Field(0.25, gt=0, description="Softmax temperature over standardised scores.")
    expert_centering: float = Field(
        0.5, ge=0, le=1, description="Share of the mean score over all experts taken off each expert's score.")
    description_scoring: Literal["whole", "sentences"] = Field(
        "sentences", description="Score a description as one text, or by its closest sentence.")
    switch_confidence: float = Field(
        0.4, ge=0, le=1, description="Probability at which a new turn leaves its conversation's expert.")
    switch_confidence_follow_up: float = Field(
        0.9, ge=0, le=1, description="The same for a turn that points back at the conversation.")
    calibration_file: str = Field("", description="Read-out written by `main.py calibrate` ('' = none).")
    calibrated_oos_gate: float = Field(0.7, ge=0, le=1, description="'none' share that overrides the read-out.")
    utility_expert: str = Field(
        "", description="Expert for client task prompts (titles, tags, ...); '' = route them like their chat.")
    autocomplete_expert: str = Field(
        "", description="Expert for raw/suffix completions (editor autocomplete); '' = route them by prompt.")


class LocalModelsConfig(_Strict):
    models_dir: str = Field("models", description="Folder local model files must live in.")
    max_loaded_models: int = Field(3, ge=1, le=16, description="Local models kept in memory at once.")
    model_ttl_seconds: float = Field(300, ge=0, description="Unload a local model after this idle time.")
    n_ctx: int = Field(2048, ge=128, description="Default context size for GGUF models.")
    n_threads: int = Field(0, ge=0, description="CPU threads for GGUF inference; 0 = all cores.")
    stats_file: str = Field("data/model_stats.json", description="Load/usage statistics, inside the project.")


ExpertType = Literal["local", "ollama", "api", "openai"]
# "chat" experts are routed to and answer chats; "embedding" experts only answer embedding
# requests (/api/embed, /api/embeddings, /v1/embeddings), so the router never sees them.
ExpertKind = Literal["chat", "embedding"]
# Per-expert default generation options, under Ollama's names, with the JSON types they take.
GENERATION_OPTIONS: dict[str, tuple[type, ...]] = {
    "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "min_p": (int, float),
    "num_predict": (int,), "num_ctx": (int,), "seed": (int,), "stop": (list,),
    "repeat_penalty": (int, float), "presence_penalty": (int, float), "frequency_penalty": (int, float),
}
# What an expert can be declared able to do, under Ollama's capability names plus "json" (a
# `format` / `response_format` constraint, which some OpenAI-compatible servers refuse).
# "completion" is implied for every chat expert; it is accepted so that a list copied from
# `ollama show` validates. "embedding" on a chat expert makes it answer embedding requests too;
# on its own it makes the expert an embedding expert (kind "embedding"). See modules/capabilities.py.
ExpertCapability = Literal["completion", "vision", "tools", "thinking", "json", "insert", "embedding"]


class ExpertConfig(_Strict):
    id: int = Field(..., ge=0, description="Unique id; 0 is the fallback expert.")
    label: str = Field(..., description="Unique name; also the model name clients can ask for.")
    kind: ExpertKind = Field("chat", description="chat (routed) or embedding (answers embedding requests only).")
    description: str = Field("", description="What the expert is good at (used by the router).")
    keywords: list[str] = Field(default_factory=list, description="Words that route to this expert.")
    type: ExpertType = Field(..., description="Backend: local, ollama, api (LiteLLM) or openai.")
    # local
    format: Literal["gguf", "onnx"] | None = Field(None, description="local: model file format.")
    model_path: str | None = Field(None, description="local: file under models/ or pkg:<package>/<file>.")
    # ollama / openai / api
    url: str | None = Field(None, description="ollama/openai: base URL of the server.")
    model_name: str | None = Field(None, description="Model name on the remote server.")
    provider: str | None = Field(None, description="api: LiteLLM provider (openai, anthropic, ...).")
    api_key_env: str | None = Field(None, description="Name of the env var holding the API key.")
    api_base: str | None = Field(None, description="api: custom base URL for the provider.")
    timeout: float | None = Field(None, gt=0, description="Read timeout override in seconds.")
    system_prompt: str | None = Field(None, description="System message added when the request has none.")
    options: dict[str, Any] = Field(default_factory=dict, description="Default generation options (Ollama names).")
    capabilities: list[ExpertCapability] | None = Field(
        None, description="What the expert can take: vision, tools, thinking, json, insert; None = anything.")
    context_length: int | None = Field(None, ge=1, description="Context window in tokens; None = unknown (or n_ctx).")
    dimensions: int | None = Field(
        None, ge=1, description="embedding: length of the expert's vectors; None = unknown (no silent fallback).")

    @model_validator(mode="before")
    @classmethod
    def _embedding_only_capability(cls, data: Any) -> Any:
        # `"capabilities": ["embedding"]` alone declares what `"kind": "embedding"` does.
        if isinstance(data, dict) and "kind" not in data and data.get("capabilities") == ["embedding"]:
            return {**data, "kind": "embedding"}
        return data

    @property
    def serves_chat(self) -> bool:
        return self.kind == "chat"

    @property
    def serves_embeddings(self) -> bool:
        return self.kind == "embedding" or "embedding" in (self.capabilities or ())

    @field_validator("label")
    @classmethod
    def _label_is_safe(cls, v: str) -> str:
        return check_model_label(v)

    @field_validator("url", "api_base")
    @classmethod
    def _url_is_safe(cls, v: str | None) -> str | None:
        if v is not None:
            check_backend_url(v)
        return v.rstrip("/") if v else v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            raise ValueError("must be the NAME of an environment variable, not a key")
        return v

    @field_validator("options")
    @classmethod
    def _known_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(GENERATION_OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(GENERATION_OPTIONS)}")
        for key, value in v.items():
            expected = GENERATION_OPTIONS[key]
            ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
            if not ok:
                raise ValueError(f"option '{key}' has the wrong type ({type(value).__name__})")
        try:
            # The check every request's options pass too: a default no backend could take would
            # otherwise surface per request, as a client error the client never made.
            GenerationOptions.from_options(v)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from exc
        return v

    @model_validator(mode="after")
    def _backend_fields(self) -> ExpertConfig:
        needed = {
            "local": ("format", "model_path"),
            "ollama": ("url", "model_name"),
            "openai": ("url", "model_name"),
            "api": ("model_name",),
        }[self.type]
        missing = [name for name in needed if not getattr(self, name)]
        if missing:
            raise ValueError(f"type '{self.type}' needs field(s): {', '.join(missing)}")
        if self.serves_embeddings and self.type == "local":
            raise ValueError("a local embedding model is set with embeddings.local_model in config.json, "
                             "not as an expert")
        return self


class ExpertsFile(_Strict):
    max_experts: int = Field(16, ge=1, le=256, description="Most experts allowed.")
    experts: list[ExpertConfig]

    @model_validator(mode="after")
    def _consistent(self) -> ExpertsFile:
        if len(self.experts) > self.max_experts:
            raise ValueError(f"{len(self.experts)} experts configured, max_experts is {self.max_experts}")
        seen_ids: set[int] = set()
        seen_labels: set[str] = set()
        for e in self.experts:
            if e.id in seen_ids:
                raise ValueError(f"duplicate expert id {e.id}")
            if e.label.lower() in seen_labels:
                raise ValueError(f"duplicate expert label '{e.label}'")
            seen_ids.add(e.id)
            seen_labels.add(e.label.lower())
        fallback = next((e for e in self.experts if e.id == 0), None)
        if fallback is None:
            raise ValueError("the fallback expert (id 0) is missing")
        if not fallback.serves_chat:
            raise ValueError("the fallback expert (id 0) must be a chat expert (kind 'chat')")
        if fallback.keywords:
            raise ValueError("the fallback expert (id 0) must not have keywords")
        return self


class EmbeddingsConfig(_Strict):
    default_expert: str = Field(
        "", description="Embedding expert for the model name 'lemoe' and unknown names; '' = the first one, "
                        "else the local encoder.")
    local_model: str = Field(
        "use-multilingual", description="Local encoder (use-multilingual, pkg:, HF id or path) that answers when "
                                        "no expert does; '' = none.")
    local_label: str = Field("use-multilingual", description="Model name the local encoder is listed and asked for by.")
    max_input_chars: int = Field(
        8192, ge=16, le=1_000_000, description="Longest text the local encoder embeds; longer ones are cut "
                                               "(truncate: true) or refused.")
    max_inputs: int = Field(2048, ge=1, le=100_000, description="Most texts in one embedding request.")

    @field_validator("local_label")
    @classmethod
    def _local_label_is_safe(cls, v: str) -> str:
        return check_model_label(v)


class ConfigFile(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    local_models: LocalModelsConfig = Field(default_factory=LocalModelsConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)


class AppConfig(BaseModel):
    """Everything the app needs, validated. Built only by `load_config` (or tests)."""

    model_config = ConfigDict(frozen=True)

    server: ServerConfig
    router: RouterConfig
    local_models: LocalModelsConfig
    # The chat experts (routed to); `embedding_experts` answer embedding requests. An expert can
    # be in both (a chat expert that declares the "embedding" capability).
    experts: tuple[ExpertConfig, ...]
    embedding_experts: tuple[ExpertConfig, ...] = ()
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    project_dir: Path
    config_path: Path
    experts_path: Path

    @property
    def fallback_expert(self) -> ExpertConfig:
        return next(e for e in self.experts if e.id == 0)

    def expert_by_label(self, label: str) -> ExpertConfig | None:
        label = label.lower()
        return next((e for e in self.experts if e.label.lower() == label), None)

    def embedding_expert_by_label(self, label: str) -> ExpertConfig | None:
        label = label.lower()
        return next((e for e in self.embedding_experts if e.label.lower() == label), None)


# Cloud metadata services outside the link-local ranges: AWS's IPv6 endpoint and Alibaba's.
_METADATA_NETWORKS = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))
_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                             "instance-data.ec2.internal"})
# The well-known NAT64 prefix: 64:ff9b::a9fe:a9fe reaches 169.254.169.254 through a NAT64 gateway.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# A name that does not resolve in this time is let through: it cannot be checked, and start-up
# must not hang on a slow resolver.
_RESOLVE_TIMEOUT = 2.0


def check_backend_url(url: str) -> None:
    """Refuse URLs that are not http(s) or that point at link-local / cloud metadata addresses.

    Host names are resolved once, here, so that a name (or a numeric form such as `2852039166`
    or `0xa9fea9fe`, which the resolver turns into 169.254.169.254) cannot smuggle in a
    forbidden address. Private and loopback addresses stay allowed: local Ollama servers live
    there.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not host:
        raise ValueError("has no host")
    name = host.lower().rstrip(".")
    if name in _METADATA_NAMES:
        raise ValueError("points at a cloud metadata service")
    try:
        literal = ipaddress.ip_address(name)
    except ValueError:
        literal = None
    for ip in [literal] if literal is not None else _resolve(name):
        if _is_forbidden_address(ip):
            where = str(ip) if literal is not None else f"{host} resolves to {ip}"
            raise ValueError(f"points at a forbidden address ({where})")


def _is_forbidden_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and _is_forbidden_address(embedded):
            return True
        ip = ipaddress.IPv6Address(ip.compressed.split("%")[0])  # the zone (%eth0) changes nothing
    return (ip.is_link_local or ip.is_multicast or ip.is_unspecified
            or any(ip in net for net in _METADATA_NETWORKS if net.version == ip.version))


def _resolve(name: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address `name` resolves to now; [] when it does not resolve (in time)."""
    import socket
    import threading

    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            return
        for info in infos:
            try:
                found.append(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
            except ValueError:
                continue

    # getaddrinfo cannot be cancelled: a daemon thread lets a hung resolver be abandoned.
    worker = threading.Thread(target=lookup, name="lemoe-resolve", daemon=True)
    worker.start()
    worker.join(_RESOLVE_TIMEOUT)
    return list(found) if not worker.is_alive() else []


def resolve_inside(base: Path, relative: str, what: str) -> Path:
    """Resolve `relative` against `base` and insist the result stays inside `base`."""
    base = base.resolve()
    path = (base / relative).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"{what} '{relative}' is outside {base}")
    return path


PACKAGE_PREFIX = "pkg:"


def resolve_local_model_path(model_path: str, project_dir: Path, models_dir: str) -> Path:
    """Where a local expert's model file is, confined to models/ or to a package's own files.

    `pkg:<package>/<file>` names a file shipped inside an installed Python package (how the
    default GGUF model arrives); anything else is relative to `models_dir` under the project.
    """
    if model_path.startswith(PACKAGE_PREFIX):
        import importlib.util

        package, _, rel = model_path[len(PACKAGE_PREFIX) :].partition("/")
        if not package.isidentifier() or not rel:
            raise ValueError(f"'{model_path}' must look like pkg:<package>/<file>")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"package '{package}' is not installed")
        base = Path(next(iter(spec.submodule_search_locations)))
        return resolve_inside(base, rel, "model_path")
    if Path(model_path).is_absolute():
        raise ValueError(f"model_path '{model_path}' must be relative to {models_dir}/")
    root = resolve_inside(project_dir, models_dir, "models_dir")
    rel = model_path.removeprefix(models_dir.rstrip("/") + "/")
    return resolve_inside(root, rel, "model_path")


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read file ({exc.strerror})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def _describe(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {where or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_config(config_path: str | Path | None = None, project_dir: str | Path | None = None) -> AppConfig:
    """Read and validate config.json and the experts file it names.

    `config_path` defaults to $LEMOE_CONFIG, then config/config.json of the project. The
    experts file (`router.categories_file`), models/ and logs/ are resolved against the project
    folder (`project_dir`, else $LEMOE_PROJECT_DIR, else this checkout) and must stay in it.
    """
    project_dir = project_dir or os.environ.get("LEMOE_PROJECT_DIR")
    project = Path(project_dir).resolve() if project_dir else PROJECT_DIR
    cfg_path = Path(config_path or os.environ.get("LEMOE_CONFIG") or DEFAULT_CONFIG_PATH)
    if not cfg_path.is_absolute():
        cfg_path = (Path.cwd() / cfg_path).resolve()
    raw = _read_json(cfg_path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: the top level must be a JSON object")
    try:
        cfg = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(cfg_path, exc)) from exc

    try:
        experts_path = resolve_inside(project, cfg.router.categories_file, "categories_file")
    except ValueError as exc:
        raise ConfigError(f"{cfg_path}: router.categories_file: {exc}") from exc
    if cfg.router.calibration_file:
        try:
            resolve_inside(project, cfg.router.calibration_file, "calibration_file")
        except ValueError as exc:
            raise ConfigError(f"{cfg_path}: router.calibration_file: {exc}") from exc
    raw_experts = _read_json(experts_path)
    if not isinstance(raw_experts, dict):
        raise ConfigError(f"{experts_path}: the top level must be a JSON object")
    try:
        experts = ExpertsFile.model_validate(raw_experts)
    except ValidationError as exc:
        raise ConfigError(_describe(experts_path, exc)) from exc

    _check_expert_labels(cfg.router, experts.experts, cfg_path, experts_path)
    _check_embedding_labels(cfg.embeddings, experts.experts, cfg_path, experts_path)
    for i, expert in enumerate(experts.experts):
        if expert.type == "local" and expert.model_path:
            try:
                resolve_local_model_path(expert.model_path, project, cfg.local_models.models_dir)
            except ValueError as exc:
                raise ConfigError(f"{experts_path}: experts[{i}].model_path: {exc}") from exc
        # Every GGUF model is loaded with local_models.n_ctx: a larger declared window would send
        # it prompts llama.cpp refuses.
        n_ctx = cfg.local_models.n_ctx
        if expert.format == "gguf" and expert.context_length is not None and expert.context_length > n_ctx:
            raise ConfigError(f"{experts_path}: experts[{i}].context_length: {expert.context_length} is more than "
                              f"local_models.n_ctx ({n_ctx}), the context GGUF models are loaded with")

    return AppConfig(
        server=cfg.server,
        router=cfg.router,
        local_models=cfg.local_models,
        experts=tuple(e for e in experts.experts if e.serves_chat),
        embedding_experts=tuple(e for e in experts.experts if e.serves_embeddings),
        embeddings=cfg.embeddings,
        rate_limit=cfg.rate_limit,
        auth=cfg.auth,
        cors=cfg.cors,
        project_dir=project,
        config_path=cfg_path,
        experts_path=experts_path,
    )


def _check_expert_labels(router: RouterConfig, experts: list[ExpertConfig], cfg_path: Path,
                         experts_path: Path) -> None:
    """Router fields that name an expert must name one of the experts file's."""
    labels = {e.label.lower() for e in experts}
    for field in ("utility_expert", "autocomplete_expert"):
        value = getattr(router, field)
        if value and value.lower() not in labels:
            known = ", ".join(e.label for e in experts)
            raise ConfigError(f"{cfg_path}: router.{field}: '{value}' names no expert in {experts_path} "
                              f"(experts: {known})")


def _check_embedding_labels(embeddings: EmbeddingsConfig, experts: list[ExpertConfig], cfg_path: Path,
                            experts_path: Path) -> None:
    """`embeddings.default_expert` names an embedding expert; the local encoder's name is free."""
    labels = {e.label.lower() for e in experts}
    if embeddings.local_model and embeddings.local_label.lower() in labels:
        raise ConfigError(f"{cfg_path}: embeddings.local_label: '{embeddings.local_label}' is also an expert's label "
                          f"in {experts_path}; pick another name")
    value = embeddings.default_expert
    if value and not any(e.label.lower() == value.lower() and e.serves_embeddings for e in experts):
        known = ", ".join(e.label for e in experts if e.serves_embeddings) or "none"
        raise ConfigError(f"{cfg_path}: embeddings.default_expert: '{value}' names no embedding expert in "
                          f"{experts_path} (embedding experts: {known})")


def with_overrides(config: AppConfig, **server_fields: Any) -> AppConfig:
    """A copy of `config` with some server fields replaced (CLI flags, env vars)."""
    fields = {k: v for k, v in server_fields.items() if v is not None}
    if not fields:
        return config
    try:
        server = ServerConfig.model_validate({**config.server.model_dump(), **fields})
    except ValidationError as exc:
        raise ConfigError(_describe(Path("command line"), exc)) from exc
    return config.model_copy(update={"server": server})


# Environment variables that stand in for a server field (command-line flags win over them).
ENVIRONMENT_OVERRIDES = {"LEMOE_HOST": "host", "LEMOE_PORT": "port", "LEMOE_CLIENT_TIMEOUT": "client_timeout"}
# Variables read elsewhere whose only meaningful values are these; anything else is a typo.
_ENVIRONMENT_CHOICES = {"LEMOE_ENCODER_PASS": ("numpy",)}


def config_from_environment(environ: Mapping[str, str] | None = None) -> AppConfig:
    """The config named by $LEMOE_CONFIG (or the default), with `ENVIRONMENT_OVERRIDES` applied.

    A variable whose value does not fit is a one-line `ConfigError` naming the variable, so a
    typo in a deployment stops the server with its name rather than a traceback or a default.
    """
    environ = os.environ if environ is None else environ
    config = load_config(environ.get("LEMOE_CONFIG") or None)
    for variable, choices in _ENVIRONMENT_CHOICES.items():
        raw = environ.get(variable, "").strip()
        if raw and raw.lower() not in choices:
            raise ConfigError(f"${variable}={raw[:40]!r}: must be unset or one of {', '.join(choices)}")
    for variable, field in ENVIRONMENT_OVERRIDES.items():
        raw = environ.get(variable, "").strip()
        if not raw:
            continue
        try:
            server = ServerConfig.model_validate({**config.server.model_dump(), field: raw})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"${variable}={raw[:40]!r}: {reason}") from None
        config = config.model_copy(update={"server": server})
    return config
