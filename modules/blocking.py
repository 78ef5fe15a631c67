"""Long native calls kept off the request loop, when the server runs one.

Under gunicorn's gevent worker every request is a greenlet on the worker's one OS thread. A
llama.cpp token, a prompt evaluation or a model load is tens of milliseconds to seconds of C code
that never yields: run inline, it would stop every other request of the worker, `/health`
included. These helpers run such calls on gevent's pool of real threads and let the other
greenlets run meanwhile. Without gevent's patches (the test process, gunicorn's gthread worker,
the development server) they just call, and threads already overlap.

Routing decisions go there too (`router_factory.OffLoopRouter`), and so does building a router
(the encoder, the first encoding of the experts' keywords) at start-up and on a config reload:
a long message costs the encoder 5 to 15 ms, a cascade two passes, and sixteen of them at once
held every other request of the worker for over 100 ms (bench/bench_loop_latency.py).

State that the pool's threads share with each other takes the OS's locks (`native_lock`):
gevent's monkey-patched ones work across threads, but its Event, waited on in a pool thread,
raises LoopExit instead of waiting.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


# A pause this short still makes gevent's loop poll once (sockets, timers) before the greenlet
# resumes; gevent.sleep(0) only runs queued callbacks, and sockets went unpolled for 100 ms while
# a reader called it every 2 ms.
_LOOP_PASS_SECONDS = 1e-6


def _patched_for_gevent() -> bool:
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("threading"))


def _thread_pool() -> Any | None:
    """gevent's pool of real threads when this process is patched for gevent, else None."""
    if not _patched_for_gevent():
        return None
    from gevent import get_hub

    return get_hub().threadpool


def _outcome(function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    # Caught here rather than left to gevent, which would print the traceback to stderr: a
    # library error is the caller's to map and log, sanitised.
    try:
        return True, function(*args)
    except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's greenlet
        return False, exc


def native_lock() -> Any:
    """A lock of the OS, not gevent's, even in a process patched for gevent.

    For state shared by real threads only: a greenlet that waits on it stops its whole loop.
    """
    if _patched_for_gevent():
        from gevent import monkey

        return monkey.get_original("_thread", "allocate_lock")()
    import _thread

    return _thread.allocate_lock()


def run_blocking(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)`, on a real thread if the caller is a greenlet (exceptions re-raised)."""
    pool = _thread_pool()
    if pool is None:
        return function(*args)
    ok, value = pool.apply(_outcome, (function, args))
    if not ok:
        raise value
    result: T = value
    return result


def yield_to_others() -> None:
    """Let the other requests of this worker run, then carry on.

    For loops whose reads never wait (the data is always there) and so never yield by
    themselves. Under gevent this greenlet waits for one pass of the event loop; otherwise it
    offers the GIL to another thread.
    """
    if _patched_for_gevent():
        import gevent

        gevent.sleep(_LOOP_PASS_SECONDS)
    else:
        time.sleep(0)


def patch_for_gevent() -> None:
    """Make sockets, locks, sleeps and threads cooperative, before anything else imports them.

    Locks created before the patch would be real ones: a greenlet waiting on one held by another
    greenlet would stop the whole worker. So the server entry point calls this first thing.
    """
    from gevent import monkey

    monkey.patch_all()
