"""A progress bar with rate and ETA for the terminal, and plain lines when output is not a TTY."""

from __future__ import annotations

import time
from typing import TextIO

_BAR = 30
# Plain-text mode (a log, a pipe): one line at most this often, and the last one always.
PLAIN_INTERVAL_SECONDS = 5.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def describe(done: int, total: int, elapsed: float, unit: str = "subject keys") -> str:
    """``[#####-----]  50%  500/1000 subject keys  250/s  ETA 0:00:02``"""
    total = max(total, done)
    fraction = done / total if total else 1.0
    filled = round(fraction * _BAR)
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = _clock((total - done) / rate) if rate > 0 else "--:--:--"
    return (
        f"[{'#' * filled}{'-' * (_BAR - filled)}] {fraction:4.0%}  {done}/{total} {unit}  "
        f"{rate:.0f}/s  ETA {eta}"
    )


class Progress:
    def __init__(self, out: TextIO, total: int, unit: str = "subject keys") -> None:
        self._out = out
        self._unit = unit
        self._total = total
        self._tty = out.isatty()
        self._start = time.monotonic()
        self._last_plain = float("-inf")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def update(self, done: int, *, final: bool = False) -> None:
        line = describe(done, self._total, self.elapsed, self._unit)
        if self._tty:
            self._out.write("\r" + line + ("\n" if final else ""))
            self._out.flush()
        elif final or time.monotonic() - self._last_plain >= PLAIN_INTERVAL_SECONDS:
            self._last_plain = time.monotonic()
            self._out.write(line + "\n")
            self._out.flush()
