"""The model names LeMoE serves: the router (`lemoe`) plus one per expert label.

Clients list these through /api/tags and /v1/models and pick one by name. Names are listed with
an explicit `:latest` tag (Open WebUI appends it before looking a name up) and accepted with or
without it, case-insensitively, as Ollama does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from modules.capabilities import (
    CHARS_PER_TOKEN,
    OLLAMA_CAPABILITIES,
    UNKNOWN_CONTEXT_LISTING,
    ExpertAbilities,
    abilities_from_config,
)
from modules.chat_types import ModelCard
from modules.config_manager import ROUTER_MODEL_NAME, AppConfig, ExpertConfig, resolve_local_model_path
from modules.encoding.encoders import PACKAGED_ENCODER

DEFAULT_TAG = "latest"
_QUANT_RE = re.compile(r"(I?Q\d+_[A-Z0-9_]+|Q\d+_\d|F16|F32|BF16)", re.IGNORECASE)
_PARAMS_RE = re.compile(r"(\d+(?:\.\d+)?[MB])(?![A-Za-z])", re.IGNORECASE)


def split_tag(name: str) -> tuple[str, str]:
    """'code:latest' -> ('code', 'latest'); 'code' -> ('code', 'latest')."""
    base, sep, tag = name.strip().rpartition(":")
    if not sep:
        return name.strip(), DEFAULT_TAG
    return base, tag or DEFAULT_TAG


@dataclass(frozen=True)
class ModelChoice:
    """What a requested model name means: a specific expert, or 'let the router decide'."""

    expert: ExpertConfig | None
    # True when the name was neither the router's nor an expert's (it is routed all the same).
    unknown: bool = False
    # True when the name is an embedding model's, which cannot chat.
    embedding_only: bool = False


@dataclass(frozen=True)
class LocalEncoderListing:
    """The local embedding encoder as a model: its name and the length of its vectors."""

    label: str
    dimensions: int
    # Longest text it embeds, in characters.
    max_chars: int


class ModelCatalog:
    def __init__(self, config: AppConfig, local_encoder: LocalEncoderListing | None = None) -> None:
        self._config = config
        self._abilities = abilities_from_config(config)
        modified = config.experts_path.stat().st_mtime if config.experts_path.exists() else 0.0
        embedding_only = [e for e in config.embedding_experts if not e.serves_chat]
        self._cards = ([self._router_card(modified)] + [self._expert_card(e, modified) for e in config.experts]
                       + [self._embedding_card(e, modified) for e in embedding_only])
        if local_encoder is not None:
            self._cards.append(self._local_encoder_card(local_encoder, modified))
        self._embedding_only = {e.label.lower() for e in embedding_only}
        if local_encoder is not None:
            self._embedding_only.add(local_encoder.label.lower())
        self._by_base = {split_tag(c.name)[0].lower(): c for c in self._cards}

    @property
    def cards(self) -> list[ModelCard]:
        return list(self._cards)

    def card(self, name: str) -> ModelCard | None:
        base, tag = split_tag(name)
        if tag.lower() != DEFAULT_TAG:
            return None
        return self._by_base.get(base.lower())

    def card_for_expert(self, expert: ExpertConfig) -> ModelCard:
        return self._by_base[expert.label.lower()]

    @property
    def abilities(self) -> dict[str, ExpertAbilities]:
        """What each expert can take, by label: the values the listings report and routing uses."""
        return dict(self._abilities)

    def choose(self, name: str | None) -> ModelChoice:
        """Resolve a request's `model` field. Unknown names are routed, not refused.

        Refusing would break clients that hard-code a model name (the openai test-suite sends
        "gpt-4o"); routing them gives those users an answer from the right expert anyway.
        """
        if not name:
            return ModelChoice(expert=None)
        base, tag = split_tag(name)
        if base.lower() == ROUTER_MODEL_NAME:
            return ModelChoice(expert=None)
        expert = self._config.expert_by_label(base) if tag.lower() == DEFAULT_TAG else None
        if expert is None:
            embedding_only = tag.lower() == DEFAULT_TAG and base.lower() in self._embedding_only
            return ModelChoice(expert=None, unknown=not embedding_only, embedding_only=embedding_only)
        return ModelChoice(expert=expert)

    def _router_card(self, modified: float) -> ModelCard:
        return ModelCard(
            name=f"{ROUTER_MODEL_NAME}:{DEFAULT_TAG}",
            family="lemoe",
            format="gguf",
            parameter_size="router",
            quantization_level="mixed",
            size=1,
            digest=_digest({"router": self._config.router.model_dump(), "experts": len(self._config.experts)}),
            modified_at=modified,
            context_length=max(a.listed_context_length() for a in self._abilities.values()),
            # What at least one expert takes: the router finds that expert for such a request.
            capabilities=tuple(c for c in OLLAMA_CAPABILITIES
                               if any(c in a.listed_capabilities() for a in self._abilities.values())),
            description="Routes each request to the best expert.",
        )

    def _expert_card(self, expert: ExpertConfig, modified: float) -> ModelCard:
        size, fmt, params, quant = 1, "remote", "unknown", "unknown"
        family: str = expert.type
        if expert.type == "local" and expert.model_path:
            fmt = expert.format or "gguf"
            family = "llama" if fmt == "gguf" else "onnx"
            try:
                path = resolve_local_model_path(
                    expert.model_path, self._config.project_dir, self._config.local_models.models_dir
                )
                if path.exists():
                    size = path.stat().st_size if path.is_file() else size
                    modified = max(modified, path.stat().st_mtime)
            except ValueError:
                pass
            quant_match = _QUANT_RE.search(expert.model_path)
            params_match = _PARAMS_RE.search(expert.model_path)
            quant = quant_match.group(1).upper() if quant_match else quant
            params = params_match.group(1).upper() if params_match else params
        return ModelCard(
            name=f"{expert.label}:{DEFAULT_TAG}",
            family=family,
            format=fmt,
            parameter_size=params,
            quantization_level=quant,
            size=size,
            digest=_digest(expert.model_dump(exclude={"keywords", "description"})),
            modified_at=modified,
            context_length=self._abilities[expert.label].listed_context_length(),
            capabilities=self._abilities[expert.label].listed_capabilities(),
            description=expert.description,
        )


    def _embedding_card(self, expert: ExpertConfig, modified: float) -> ModelCard:
        return ModelCard(
            name=f"{expert.label}:{DEFAULT_TAG}",
            family=expert.type,
            format="remote",
            parameter_size="unknown",
            quantization_level="unknown",
            size=1,
            digest=_digest(expert.model_dump(exclude={"keywords", "description"})),
            modified_at=modified,
            context_length=expert.context_length or UNKNOWN_CONTEXT_LISTING,
            capabilities=("embedding",),
            description=expert.description,
            embedding_length=expert.dimensions,
        )

    def _local_encoder_card(self, local: LocalEncoderListing, modified: float) -> ModelCard:
        return ModelCard(
            name=f"{local.label}:{DEFAULT_TAG}",
            # USE for the packaged encoder; a sentence-transformers model is BERT-like.
            family="use" if self._config.embeddings.local_model == PACKAGED_ENCODER else "bert",
            format="onnx" if self._config.embeddings.local_model == PACKAGED_ENCODER else "safetensors",
            parameter_size="unknown",
            quantization_level="unknown",
            size=1,
            digest=_digest({"local_encoder": self._config.embeddings.model_dump()}),
            modified_at=modified,
            context_length=math.ceil(local.max_chars / CHARS_PER_TOKEN),
            capabilities=("embedding",),
            description="The local sentence encoder (in-process, offline).",
            embedding_length=local.dimensions,
        )


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
