"""ModelPool with plain objects as models and a hand-driven clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from modules.model_pool import LoadedModel, ModelPool


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Model:
    """A stand-in model that records being closed."""

    def __init__(self, name: str, size_bytes: int | None = None) -> None:
        self.name = name
        self.closed = False
        self.size_bytes = size_bytes

    def close(self) -> None:
        self.closed = True


class Loader:
    """Counts loads per key and hands out `Model`s."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.models: dict[str, list[Model]] = {}

    def __call__(self, key: str) -> Callable[[], Model]:
        def load() -> Model:
            self.calls[key] = self.calls.get(key, 0) + 1
            model = Model(key, size_bytes=len(key))
            self.models.setdefault(key, []).append(model)
            return model

        return load


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def loader() -> Loader:
    return Loader()


def make_pool(clock: FakeClock, max_loaded: int = 3, ttl: float = 300) -> ModelPool:
    wall = FakeClock(start=1_700_000_000.0)
    return ModelPool(max_loaded, ttl, clock=clock, wall_clock=wall)


def use(pool: ModelPool, key: str, loader: Loader, keep_alive: float | None = None) -> Model:
    with pool.lease(key, loader(key), keep_alive) as model:
        return model


def keys(pool: ModelPool) -> set[str]:
    return {m.key for m in pool.loaded()}


def test_lease_loads_once_and_reuses(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock)
    first = use(pool, "a", loader)
    second = use(pool, "a", loader)
    assert first is second
    assert loader.calls == {"a": 1}
    assert not first.closed


def test_limit_three_with_four_keys_evicts_least_recently_used(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock, max_loaded=3)
    for key in ("a", "b", "c"):
        use(pool, key, loader)
        clock.advance(1)
    use(pool, "a", loader)  # "a" is now the most recent, so "b" is the oldest
    clock.advance(1)
    use(pool, "d", loader)
    assert keys(pool) == {"a", "c", "d"}
    assert loader.models["b"][0].closed
    assert not loader.models["a"][0].closed
    assert [m.key for m in pool.loaded()] == ["d", "a", "c"]


def test_lru_order_follows_last_use_not_load_order(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock, max_loaded=2)
    use(pool, "a", loader)
    clock.advance(1)
    use(pool, "b", loader)
    clock.advance(1)
    use(pool, "a", loader)
    clock.advance(1)
    use(pool, "c", loader)
    assert keys(pool) == {"a", "c"}
    use(pool, "b", loader)  # reloads b, evicting a (used before c)
    assert keys(pool) == {"b", "c"}
    assert loader.calls["b"] == 2


def test_model_in_use_is_not_evicted_and_pool_shrinks_after(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock, max_loaded=1)
    with pool.lease("a", loader("a")) as a:
        clock.advance(1)
        with pool.lease("b", loader("b")) as b:
            # Both are in use: the pool goes over its limit rather than unload a busy model.
            assert keys(pool) == {"a", "b"}
            assert not a.closed and not b.closed
        # b is idle now but a is still busy, and the pool is over its limit: b goes.
        assert b.closed
        assert keys(pool) == {"a"}
        assert not a.closed
    assert keys(pool) == {"a"}
    assert not a.closed


def test_in_use_count_and_snapshot_fields(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock, ttl=60)
    with pool.lease("model-x", loader("model-x")):
        with pool.lease("model-x", loader("model-x")):
            (snap,) = pool.loaded()
            assert isinstance(snap, LoadedModel)
            assert snap.in_use == 2
    (snap,) = pool.loaded()
    assert snap.in_use == 0
    assert snap.size_bytes == len("model-x")
    assert snap.loaded_at == pytest.approx(1_700_000_000.0)
    assert snap.expires_at == pytest.approx(snap.last_used + 60)


def test_ttl_expiry_unloads_idle_models_only(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock, ttl=10)
    old = use(pool, "old", loader)
    clock.advance(5)
    with pool.lease("busy", loader("busy")) as busy:
        clock.advance(6)
        assert pool.evict_expired() == ["old"]
        assert old.closed
        clock.advance(100)
        assert pool.evict_expired() == []  # busy is in use, however long
        assert not busy.closed
    assert pool.evict_expired() == []  # just released: its idle time starts now
    clock.advance(10)
    assert pool.evict_expired() == ["busy"]
    assert busy.closed
    assert pool.loaded() == []


def test_keep_alive_zero_unloads_when_lease_ends(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock)
    with pool.lease("a", loader("a"), keep_alive=0) as a:
        assert keys(pool) == {"a"}
        assert not a.closed
    assert a.closed
    assert pool.loaded() == []


def test_negative_keep_alive_never_expires(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock, ttl=10)
    model = use(pool, "a", loader, keep_alive=-1)
    clock.advance(10**9)
    assert pool.evict_expired() == []
    (snap,) = pool.loaded()
    assert snap.expires_at is None
    # A later request with a finite keep_alive makes it expire again.
    use(pool, "a", loader, keep_alive=5)
    clock.advance(5)
    assert pool.evict_expired() == ["a"]
    assert model.closed


def test_keep_alive_overrides_pool_ttl(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock, ttl=300)
    use(pool, "short", loader, keep_alive=2)
    use(pool, "default", loader)
    clock.advance(2)
    assert pool.evict_expired() == ["short"]
    assert keys(pool) == {"default"}


def test_concurrent_leases_of_one_key_load_it_once(loader: Loader) -> None:
    pool = ModelPool(3, 300)
    load_started = threading.Event()
    release_load = threading.Event()
    calls = 0

    def slow_load() -> Model:
        nonlocal calls
        calls += 1
        load_started.set()
        release_load.wait(5)
        return Model("shared")

    got: list[Model] = []
    lock = threading.Lock()

    def worker() -> None:
        with pool.lease("shared", slow_load) as model:
            with lock:
                got.append(model)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    assert load_started.wait(5)
    time.sleep(0.05)  # let the other threads reach the wait
    release_load.set()
    for t in threads:
        t.join(5)
    assert calls == 1
    assert len(got) == 8
    assert all(m is got[0] for m in got)
    (snap,) = pool.loaded()
    assert snap.in_use == 0


def test_failed_load_reaches_every_waiter_and_leaves_nothing() -> None:
    pool = ModelPool(3, 300)
    started = threading.Event()
    fail_now = threading.Event()

    def broken() -> Model:
        started.set()
        fail_now.wait(5)
        raise OSError("no such file")

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with pool.lease("x", broken):
                pass
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(5)
    time.sleep(0.05)
    fail_now.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 3
    assert pool.loaded() == []
    # The next lease tries again instead of remembering the failure.
    with pool.lease("x", lambda: Model("x")) as model:
        assert model.name == "x"
    assert pool.loaded()[0].in_use == 0


def test_unloader_is_called_instead_of_close(clock: FakeClock, loader: Loader) -> None:
    unloaded: list[Model] = []
    pool = ModelPool(1, 300, clock=clock, unloader=unloaded.append)
    a = use(pool, "a", loader)
    use(pool, "b", loader)
    assert unloaded == [a]
    assert not a.closed


def test_size_of_callable_is_reported(clock: FakeClock) -> None:
    pool = ModelPool(2, 300, clock=clock, size_of=lambda m: 1234)
    with pool.lease("a", lambda: object()):
        pass
    assert pool.loaded()[0].size_bytes == 1234


def test_unload_now_or_when_idle(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock)
    idle = use(pool, "idle", loader)
    assert pool.unload("idle") is True
    assert idle.closed
    assert pool.unload("idle") is False
    with pool.lease("busy", loader("busy")) as busy:
        assert pool.unload("busy") is True
        assert not busy.closed
    assert busy.closed


def test_close_unloads_all_and_in_use_ones_after_their_lease(clock: FakeClock, loader: Loader) -> None:
    pool = make_pool(clock)
    a = use(pool, "a", loader, keep_alive=-1)
    with pool.lease("b", loader("b")) as b:
        pool.close()
        assert a.closed
        assert not b.closed
    assert b.closed
    assert pool.loaded() == []


def test_reaper_thread_unloads_after_a_short_real_ttl(loader: Loader) -> None:
    pool = ModelPool(3, ttl_seconds=0.1)
    pool.start_reaper(0.02)
    try:
        model = use(pool, "a", loader)
        deadline = time.monotonic() + 5
        while pool.loaded() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.loaded() == []
        assert model.closed
    finally:
        pool.close()
    assert pool._reaper is None


def test_reaper_survives_a_failing_unloader(loader: Loader) -> None:
    def explode(model: Model) -> None:
        raise RuntimeError("boom")

    pool = ModelPool(3, ttl_seconds=0.05, unloader=explode)
    pool.start_reaper(0.01)
    try:
        use(pool, "a", loader)
        use(pool, "b", loader)
        deadline = time.monotonic() + 5
        while pool.loaded() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.loaded() == []
    finally:
        pool.close()
