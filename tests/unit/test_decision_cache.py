"""The decision cache answers an identical conversation without asking the router again."""

from __future__ import annotations

from collections.abc import Sequence

from modules.chat_types import RouteDecision
from modules.config_manager import RouterConfig
from modules.decision_cache import DecisionCache, conversation_key, router_name
from modules.embedding_router import EmbeddingRouter
from modules.encoding.encoders import PACKAGED_ENCODER, build_encoder
from tests.unit.test_embedding_router import EXPERTS


class CountingRouter:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def route(self, user_texts: Sequence[str]) -> RouteDecision:
        self.calls.append(list(user_texts))
        return RouteDecision(len(self.calls), f"e{len(self.calls)}", 0.5, "embedding")


def test_identical_conversations_are_decided_once() -> None:
    inner = CountingRouter()
    cache = DecisionCache(inner, size=8)
    first = cache.route(["a", "b"])
    assert cache.route(["a", "b"]) is first
    assert cache.route(["a b"]) is not first  # other turns, other key
    assert cache.route(["ab"]).label != first.label
    assert len(inner.calls) == 3
    assert (cache.hits, cache.misses) == (1, 3)


def test_keys_keep_turn_boundaries_and_stay_small() -> None:
    assert conversation_key(["ab", "c"]) != conversation_key(["a", "bc"])
    assert len(conversation_key(["x" * 1_000_000])) == 16


def test_least_recently_used_decision_is_dropped_first() -> None:
    inner = CountingRouter()
    cache = DecisionCache(inner, size=2)
    cache.route(["a"])
    cache.route(["b"])
    cache.route(["a"])  # a is now the most recent
    cache.route(["c"])  # drops b
    cache.route(["a"])
    cache.route(["b"])
    assert [c[0] for c in inner.calls] == ["a", "b", "c", "b"]


def test_size_zero_turns_it_off() -> None:
    inner = CountingRouter()
    cache = DecisionCache(inner, size=0)
    cache.route(["a"])
    cache.route(["a"])
    assert len(inner.calls) == 2


def test_a_cached_decision_is_the_routers_own() -> None:
    encoder = build_encoder(PACKAGED_ENCODER)
    assert encoder is not None
    router = EmbeddingRouter(EXPERTS, RouterConfig(), encoder)
    cache = DecisionCache(router, size=16)
    texts = ["my python function throws an error"]
    assert cache.route(texts) == router.route(texts) == cache.route(texts)
    assert router_name(cache) == "EmbeddingRouter"
