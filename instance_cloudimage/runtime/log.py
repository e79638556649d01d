"""Logging to stderr, where Ganeti collects the scripts' output into /var/log/ganeti/os/.

Steps are logged as ``<verb>: <message>`` lines so that the last 20 lines Ganeti quotes in a
failed job read well.  Progress is a tqdm bar on a TTY, and a throttled line in a log file
(docs/images.md, "Progress", states the cadence; tests/runtime/test_progress.py holds the two
to each other).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from types import TracebackType
from typing import Any, cast

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


def console_logging() -> contextlib.AbstractContextManager[object]:
    """While it is entered, on a terminal, log lines are written through tqdm: the bars in
    progress are cleared first and drawn again below the line, so that a line never lands on a
    bar's row and no stale frame stays behind.  Without a terminal (Ganeti's log) nothing changes.
    """
    if not sys.stderr.isatty():
        return nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return cast("contextlib.AbstractContextManager[object]", logging_redirect_tqdm(loggers=[log]))


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


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done} of {size} [{elapsed}<{remaining}, {speed}]"
BAR_FORMAT_NO_TOTAL = "{desc}: {done} [{elapsed}, {speed}]"


def make_bar(what: str, total: int | None) -> Any:
    """A tqdm bar counting bytes in the log's units (format_size: MiB, GiB), cleared when closed.

    tqdm's own unit_scale says "MB" for 1024-based sizes and scales the rate by 1000; the sizes
    are formatted here instead and handed to bar_format as extra fields."""
    from tqdm import tqdm

    class ByteBar(tqdm):  # type: ignore[misc]  # tqdm ships no type information
        @property
        def format_dict(self) -> dict[str, Any]:
            d: dict[str, Any] = super().format_dict
            rate = d.get("rate")
            d.update(done=format_size(d["n"]), size=format_size(d["total"]) if d.get("total") else "?",
                     speed=f"{format_size(rate)}/s" if rate else "?/s")
            return d

    return ByteBar(total=total, desc=what, file=sys.stderr, leave=False, unit="B",
                   bar_format=BAR_FORMAT if total else BAR_FORMAT_NO_TOTAL)


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
            self.bar = make_bar(what, self.total)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(success=et is None)

    def advance_to(self, done: int) -> None:
        """Progress given as the amount done so far (qemu-img's percentage of the virtual size)."""
        if done > self.done:
            self.update(done - self.done)

    def update(self, n: int) -> None:
        self.done += n
        if self.total is not None and self.done > self.total:
            # A size a wrapper announced is a lower bound: past it, the total is what came so far.
            self.total = self.done
            if self.bar is not None:
                self.bar.total = self.done
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
