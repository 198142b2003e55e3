"""A small progress display for long merges: bytes done, rate, time left, and the current phase.

One line on stderr, redrawn at most every 0.2 s when stderr is a terminal; otherwise (logs, CI) a
line per phase and a final summary. The phase (``statistics``, ``compiling``, ``merging``) is shown
on its own: the first tensor of each new shape compiles before it merges, and the rate over a
compile says nothing about the merge.

References: none (infrastructure).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress"]


def _fmt_bytes(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress of ``total`` bytes. Thread-safe ``update``; ``phase(name)`` labels what runs now.

    The rate and time left are measured over ``merging`` time only (compiles excluded).

    References: none (infrastructure).
    """

    def __init__(self, total: int, *, label: str = "jmerge", disable: bool = False, stream: TextIO | None = None):
        self.total, self.label, self.disable = int(total), label, disable
        self.stream = stream or sys.stderr
        self.done = 0
        self._phase = "starting"
        self._t0 = time.perf_counter()
        self._busy = 0.0  # seconds spent in the 'merging' phase
        self._since = self._t0
        self._last_draw = 0.0
        self._lock = threading.Lock()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def phase(self, name: str) -> None:
        with self._lock:
            now = time.perf_counter()
            if self._phase == "merging":
                self._busy += now - self._since
            self._phase, self._since = name, now
            if not self._tty and not self.disable:
                self.stream.write(f"{self.label}: {name}\n")
        self._draw(force=True)

    def update(self, nbytes: int) -> None:
        with self._lock:
            self.done += int(nbytes)
        self._draw()

    def write(self, msg: str) -> None:
        if not self.disable:
            self.stream.write(("\r\033[K" if self._tty else "") + msg + "\n")
            self._draw(force=True)

    def _line(self) -> str:
        now = time.perf_counter()
        busy = self._busy + (now - self._since if self._phase == "merging" else 0.0)
        rate = self.done / busy if busy > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = _fmt_time(left) if left == left else "?"
        return (f"{self.label} [{self._phase}] {pct:5.1f}% {_fmt_bytes(self.done)}/{_fmt_bytes(self.total)} "
                f"{_fmt_bytes(rate)}/s, {eta} left, {_fmt_time(now - self._t0)} elapsed")

    def _draw(self, force: bool = False) -> None:
        if self.disable or not self._tty:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        self.stream.write("\r\033[K" + self._line())
        self.stream.flush()

    def close(self) -> None:
        self.phase("done")
        if not self.disable:
            self.stream.write(("\r\033[K" if self._tty else "") + self._line() + "\n")
            self.stream.flush()
