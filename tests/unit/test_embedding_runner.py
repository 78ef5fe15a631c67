"""Which model answers an embedding request, and when the local encoder may stand in."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modules.config_manager import (
    AppConfig,
    EmbeddingsConfig,
    ExpertConfig,
    LocalModelsConfig,
    RouterConfig,
    ServerConfig,
)
from modules.embedding_runner import EmbeddingRunner
from modules.embeddings import EmbedRequest, EmbedResult
from modules.errors import (
    ExpertTimeout,
    InvalidRequest,
    MissingCapability,
    ServiceUnavailable,
    UnknownModel,
)
from modules.expert_health import ExpertHealth

LOCAL_DIMENSIONS = 16


class Scripted:
    """An embedding backend that runs `script` and counts its calls."""

    def __init__(self, script: Callable[[EmbedRequest], EmbedResult]) -> None:
        self.script = script
        self.calls = 0

    def embed(self, request: EmbedRequest) -> EmbedResult:
        self.calls += 1
        return self.script(request)

    def close(self) -> None:
        pass


def vectors(width: int, fill: float = 1.0) -> Callable[[EmbedRequest], EmbedResult]:
    def script(request: EmbedRequest) -> EmbedResult:
        rows = np.full((request.count, width), fill, dtype=np.float32)
        return EmbedResult(rows / np.linalg.norm(rows, axis=1, keepdims=True), prompt_tokens=request.count)
    return script


def failing(request: EmbedRequest) -> EmbedResult:
    raise ExpertTimeout("too slow")


def expert(i: int, label: str, **fields: object) -> ExpertConfig:
    return ExpertConfig(id=i, label=label, type="ollama", url="http://127.0.0.1:9", model_name="m", **fields)


CHAT = expert(0, "chatty")


def config(*embedders: ExpertConfig, **embeddings: object) -> AppConfig:
    return AppConfig(
        server=ServerConfig(expert_failures_before_cooldown=1, expert_cooldown_seconds=60),
        router=RouterConfig(model_path=""), local_models=LocalModelsConfig(), experts=(CHAT,),
        embedding_experts=embedders, embeddings=EmbeddingsConfig(**embeddings),  # type: ignore[arg-type]
        project_dir=Path("."), config_path=Path("c.json"), experts_path=Path("e.json"))


def runner(cfg: AppConfig, backends: dict[str, Scripted], local: Scripted | None = None) -> EmbeddingRunner:
    return EmbeddingRunner(cfg, backends, local, LOCAL_DIMENSIONS if local else None,  # type: ignore[arg-type]
                           ExpertHealth(1, 60))


def request(*texts: str, dimensions: int | None = None) -> EmbedRequest:
    return EmbedRequest(model="x", texts=list(texts), dimensions=dimensions)


def test_names_pick_experts_and_everything_else_the_default() -> None:
    first, second = expert(5, "first", kind="embedding"), expert(6, "second", kind="embedding")
    run = runner(config(first, second, default_expert="second"), {}, Scripted(vectors(LOCAL_DIMENSIONS)))
    assert run.choose("first").label == "first"
    assert run.choose("FIRST:latest").label == "first"
    assert run.choose("use-multilingual").expert is None
    for name in (None, "", "lemoe", "lemoe:latest", "gpt-4o", "first:v2"):
        assert run.choose(name).label == "second"
    with pytest.raises(MissingCapability, match='"chatty" does not support embeddings'):
        run.choose("chatty")


def test_without_experts_the_local_encoder_is_the_default_and_without_it_nothing_is() -> None:
    assert runner(config(), {}, Scripted(vectors(LOCAL_DIMENSIONS))).choose("lemoe").label == "use-multilingual"
    assert runner(config(expert(5, "v", kind="embedding")), {}, None).choose("lemoe").label == "v"
    with pytest.raises(UnknownModel):
        runner(config(), {}, None).choose("lemoe")


def test_an_expert_answers_and_dimensions_are_fitted() -> None:
    vec = expert(5, "vec", kind="embedding")
    backend = Scripted(vectors(8))
    run = runner(config(vec), {"vec": backend})
    label, result, cause = run.embed(run.choose("vec"), request("a", "b", dimensions=4))
    assert (label, cause, result.vectors.shape) == ("vec", None, (2, 4))
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1) and result.total_duration_ns > 0


def test_a_failed_expert_falls_back_only_when_the_size_is_known_and_reachable() -> None:
    sized = expert(5, "sized", kind="embedding", dimensions=12)
    unsized = expert(6, "unsized", kind="embedding")
    big = expert(7, "big", kind="embedding", dimensions=768)
    local = Scripted(vectors(LOCAL_DIMENSIONS, 2.0))
    backends = {label: Scripted(failing) for label in ("sized", "unsized", "big")}
    run = runner(config(sized, unsized, big), backends, local)
    label, result, cause = run.embed(run.choose("sized"), request("a"))
    assert label == "use-multilingual" and result.vectors.shape == (1, 12) and "ExpertTimeout" in (cause or "")
    # The request's own dimensions make the size known.
    assert run.embed(run.choose("unsized"), request("a", dimensions=8))[1].vectors.shape == (1, 8)
    for name, dims in (("unsized", None), ("big", None), ("sized", 32)):
        with pytest.raises(ServiceUnavailable, match="vectors of this size"):
            run.embed(run.choose(name), request("a", dimensions=dims))


def test_a_benched_expert_is_not_called_until_its_cool_down_ends() -> None:
    vec = expert(5, "vec", kind="embedding", dimensions=8)
    backend = Scripted(failing)
    run = runner(config(vec), {"vec": backend}, Scripted(vectors(LOCAL_DIMENSIONS)))
    run.embed(run.choose("vec"), request("a"))
    run.embed(run.choose("vec"), request("a"))
    assert backend.calls == 1


def test_request_errors_pass_through_and_empty_requests_call_nobody() -> None:
    def refuse(request: EmbedRequest) -> EmbedResult:
        raise InvalidRequest("takes text, not token arrays")

    vec = expert(5, "vec", kind="embedding", dimensions=8)
    backend = Scripted(refuse)
    local = Scripted(vectors(LOCAL_DIMENSIONS))
    run = runner(config(vec, max_inputs=2), {"vec": backend}, local)
    with pytest.raises(InvalidRequest, match="token arrays"):
        run.embed(run.choose("vec"), request("a"))
    assert local.calls == 0
    label, result, _ = run.embed(run.choose("vec"), request())
    assert label == "vec" and result.vectors.size == 0 and backend.calls == 1
    with pytest.raises(InvalidRequest, match="at most 2"):
        run.embed(run.choose("vec"), request("a", "b", "c"))


def test_the_local_encoder_failing_is_a_503() -> None:
    run = runner(config(), {}, Scripted(lambda r: (_ for _ in ()).throw(ExpertTimeout("boom"))))
    with pytest.raises(ServiceUnavailable):
        run.embed(run.choose("lemoe"), request("a"))
