"""Logging to stderr, where Ganeti collects the scripts' output into /var/log/ganeti/os/.

Steps are logged as ``<verb>: <message>`` lines so that the last 20 lines Ganeti quotes in a
failed job read well.  Progress is a tqdm bar on a TTY, and a throttled line in a log file.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

log = logging.getLogger("instance_cloudimage")

HIDDEN = "[hidden]"
# Longest first, so that a value is replaced before a line or token inside it.
_hidden: list[str] = []


def hide_values(values: Iterable[str]) -> None:
    """Register strings that must never reach stderr (see params.values_to_hide)."""
    _hidden[:] = sorted(set(_hidden) | {v for v in values if v}, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every registered value replaced by [hidden].

    Security: a safety net only.  Messages never carry a parameter's value in the first place;
    this catches what no message controls: an internal error's text, a DEBUG_LEVEL=1 traceback, a
    hook that prints what it was given.
    """
    for value in _hidden:
        if value in text:
            text = text.replace(value, HIDDEN)
    return text


def printable(text: str) -> str:
    """``text`` scrubbed (redact), with undecodable bytes escaped: Ganeti's environment may hold bytes
    that are not UTF-8 (Python keeps them as surrogates), and they must not make a line unprintable."""
    return redact(text).encode("utf-8", "backslashreplace").decode("utf-8")


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(prog: str, debug_level: int = 0) -> None:
    """Configure the package logger: INFO, or DEBUG when Ganeti's DEBUG_LEVEL > 0."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(prog.replace("%", "%%") + ": %(message)s"))
    root = logging.getLogger("instance_cloudimage")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug_level > 0 else logging.INFO)
    root.propagate = False


@contextmanager
def complete_step(message: str) -> Iterator[None]:
    """Log a step and how long it took."""
    log.info("%s", message)
    start = time.monotonic()
    yield
    log.debug("%s done in %.1fs", message, time.monotonic() - start)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Byte progress: a tqdm bar on a TTY; otherwise a throttled line for Ganeti's log.

    Without a TTY a line is written when another 10% is done (at most one a second), and
    after ``interval`` seconds without a line (30 s when the total is known, so that the
    heartbeat does not double the 10% lines), so a slow download still shows signs of life and
    a fast one prints at most a summary.  Transfers below ``QUIET_BELOW`` bytes print nothing but
    a debug line: a checksum file is not news.
    """

    QUIET_BELOW = 16 * 1024 * 1024
    MIN_GAP = 1.0

    def __init__(self, what: str, total: int | None, interval: float | None = None) -> None:
        self.what = what
        self.total = total if total and total > 0 else None
        self.done = 0
        self.interval = interval if interval is not None else (30.0 if self.total else 10.0)
        self.start = time.monotonic()
        self.last_time = self.start
        self.last_decile = 0
        self.lines = 0
        self.quiet = self.total is not None and self.total < self.QUIET_BELOW
        self.bar: Any = None
        if sys.stderr.isatty() and not self.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=what, file=sys.stderr, leave=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(success=et is None)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.quiet:
            return
        now = time.monotonic()
        decile = min(self.done * 10 // self.total, 10) if self.total else 0
        since = now - self.last_time
        if (decile > self.last_decile and since >= self.MIN_GAP) or since >= self.interval:
            self.last_decile = max(decile, self.last_decile)
            self.last_time = now
            self.lines += 1
            log.info("%s: %s", self.what, self.describe(now))

    def describe(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        text = format_size(self.done)
        if self.total:
            text += f" of {format_size(self.total)} ({100 * self.done // self.total}%)"
            if rate > 0 and self.done < self.total:
                text += f", ETA {int((self.total - self.done) / rate)}s"
        return text + f", {format_size(rate)}/s"

    def close(self, success: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not success:
            return
        elapsed = time.monotonic() - self.start
        level = logging.DEBUG if self.quiet or (elapsed < 1.0 and not self.lines) else logging.INFO
        log.log(level, "%s: %s in %.1fs", self.what, format_size(self.done), elapsed)
