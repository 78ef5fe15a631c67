"""modules/blocking: native calls off the gevent loop when patched, plain calls otherwise."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from modules.blocking import run_blocking
from tests.contract.conftest import REPO

# Run in a child: patching this test process for gevent would change every other test.
PATCHED_CHILD = r"""
import io, sys
sys.stderr = io.StringIO()
from modules.blocking import patch_for_gevent
patch_for_gevent()
import time
import gevent
from gevent import monkey
from modules.blocking import run_blocking

native_sleep = monkey.get_original("time", "sleep")  # stands for C code that never yields
ticks = []

def ticker():
    for _ in range(150):
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

def slow(x):
    native_sleep(0.3)
    return x * 2

def failing():
    raise ValueError("from the pool")

def tokens():
    for i in range(3):
        native_sleep(0.1)
        yield i

t = gevent.spawn(ticker)
started = time.monotonic()
assert run_blocking(slow, 21) == 42
ended = time.monotonic()
# The other greenlet kept running while the native call was under way.
assert sum(started < tick < ended for tick in ticks) >= 5, ticks
try:
    run_blocking(failing)
except ValueError as exc:
    assert str(exc) == "from the pool"
else:
    raise AssertionError("the exception was lost")
assert "Traceback" not in sys.stderr.getvalue()
before = len(ticks)
stream, end = tokens(), object()
assert [run_blocking(next, stream, end) for _ in range(4)] == [0, 1, 2, end]
assert len(ticks) - before >= 5
t.kill()
print("ok")
"""


def test_under_gevent_native_calls_leave_the_other_greenlets_running() -> None:
    done = subprocess.run([sys.executable, "-c", PATCHED_CHILD], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_without_gevent_they_are_plain_calls_on_the_callers_thread() -> None:
    caller = threading.get_ident()
    assert run_blocking(lambda: threading.get_ident()) == caller
    started = time.monotonic()
    assert run_blocking(sum, [1, 2, 3]) == 6
    assert time.monotonic() - started < 5
