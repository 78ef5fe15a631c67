"""An exact-text LRU of routing decisions in front of any router.

Clients repeat themselves: Open WebUI routes the same conversation again for its title, tags
and follow-up prompts, retries resend the same body, and a chat's earlier turns come back with
every new message. A decision depends only on the user turns (routers are pure functions of
them), so an identical conversation gets the identical decision without another encoder pass.
The cache lives in the router's services: a configuration reload builds a new one, so it never
serves a decision made under other experts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from modules.chat_types import RouteDecision
from modules.router_factory import OffLoopRouter, Router


def conversation_key(user_texts: Sequence[str]) -> bytes:
    """A fixed-size key for the user turns: a pasted document must not be held as a key."""
    digest = hashlib.blake2b(digest_size=16)
    for text in user_texts:
        data = text.encode("utf-8", "surrogatepass")
        # Length-prefixed, so ["ab", "c"] and ["a", "bc"] differ.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


class DecisionCache:
    """`route` through `router`, remembering the last `size` decisions (0 = no cache)."""

    def __init__(self, router: Router, size: int) -> None:
        self.router = router
        self._size = size
        self._decisions: OrderedDict[bytes, RouteDecision] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def route(self, user_texts: Sequence[str]) -> RouteDecision:
        if self._size <= 0:
            return self.router.route(user_texts)
        key = conversation_key(user_texts)
        decision = self._decisions.get(key)
        if decision is not None:
            self._decisions.move_to_end(key)
            self.hits += 1
            return decision
        self.misses += 1
        decision = self.router.route(user_texts)
        self._decisions[key] = decision
        if len(self._decisions) > self._size:
            self._decisions.popitem(last=False)
        return decision

    def clear(self) -> None:
        self._decisions.clear()


def router_name(router: Router) -> str:
    """The class name of the router doing the work (what /ui and the start-up log show)."""
    # Through the wrappers (this cache, OffLoopRouter), which all keep theirs as `router`.
    inner = router
    while isinstance(inner, (DecisionCache, OffLoopRouter)):
        inner = inner.router
    return type(inner).__name__
