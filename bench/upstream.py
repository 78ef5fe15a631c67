"""The loopback stand-in LLM server (tests/fakes/fake_upstream.py) in a process of its own.

Run in-process, its threads would share the GIL with the load generator and skew every figure.
Prints its port on the first line of stdout, then serves until killed.

    python -m bench.upstream --tokens 20 [--delay-between 0.05]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from bench.fast_upstream import answer_tokens
from tests.fakes.fake_upstream import FakeUpstream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=20, help="answer pieces per reply")
    parser.add_argument("--delay-between", type=float, default=0.0, help="seconds between pieces")
    args = parser.parse_args(argv)
    upstream = FakeUpstream().start()
    upstream.behave("*", tokens=answer_tokens(args.tokens), delay_between=args.delay_between)
    print(upstream.port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
