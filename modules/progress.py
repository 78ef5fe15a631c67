"""A one-line progress bar with the rate and the time left, for long command-line jobs.

It writes to stderr (the commands print their results on stdout) and redraws about 50 times a
phase, so a log file of a piped run stays short. The time left covers `later` units of work
queued after this phase too (the remaining epochs of a training run), at this phase's rate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

WIDTH = 30
REDRAWS = 50


def format_duration(seconds: float) -> str:
    """`1h02m`, `4m05s` or `17s`: short enough for the end of a progress line."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressBar:
    """`label [#####.....] done/total note  1.2 s/it  ETA 4m05s`, redrawn in place."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        later: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = max(1, total)
        self.later = later
        self.enabled = enabled
        self._stream = stream
        self._clock = clock
        self._started = clock()
        self._every = max(1, self.total // REDRAWS)
        self._next_draw = self._every

    def update(self, done: int, note: str = "") -> None:
        """Record that `done` of `total` units are finished; redraw when it is time to.

        Callers may advance by more than one unit (a batch of rows): a redraw is due whenever
        `done` has passed the next multiple of total / REDRAWS since the last one.
        """
        if not self.enabled or (done < self.total and done < self._next_draw):
            return
        self._next_draw = (done // self._every + 1) * self._every
        stream = self._stream or sys.stderr
        print("\r" + self.line(done, note), end="\n" if done >= self.total else "", file=stream, flush=True)

    def line(self, done: int, note: str = "") -> str:
        filled = round(WIDTH * min(done, self.total) / self.total)
        parts = [f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{self.total}"]
        if note:
            parts.append(note)
        elapsed = self._clock() - self._started
        if done > 0 and elapsed > 0:
            per_unit = elapsed / done
            rate = f"{per_unit:.2f} s/it" if per_unit >= 1 else f"{1 / per_unit:.1f} it/s"
            left = per_unit * (self.total - done + self.later)
            parts.append(f"{rate}  ETA {format_duration(left)}" if done < self.total or self.later
                         else f"{rate}  took {format_duration(elapsed)}")
        return "  ".join(parts)
