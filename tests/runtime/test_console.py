"""Progress bars and log lines on a real terminal (a pty): lines never land on a bar's row, and
no bar frame stays on the screen once its transfer is over."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import struct
import sys
import termios
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from instance_cloudimage.runtime.log import Progress, console_logging, setup_logging

MiB = 1024 * 1024
CSI = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def render(data: str) -> list[str]:
    """The rows a terminal shows after ``data``: text overwrites, CR, LF, cursor up (what tqdm
    writes); any other escape sequence is skipped."""
    rows: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(data):
        ch = data[i]
        if ch == "\x1b" and (m := CSI.match(data, i)):
            if m.group(2) == "A":
                row = max(0, row - int(m.group(1) or 1))
            i = m.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            rows.extend([] for _ in range(row + 1 - len(rows)))
        else:
            line = rows[row]
            line.extend(" " for _ in range(col + 1 - len(line)))
            line[col] = ch
            col += 1
        i += 1
    return ["".join(r).rstrip() for r in rows]


@contextmanager
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, io.TextIOWrapper]]:
    """stderr on the slave side of a 24x100 pty; yields the master's fd and the slave file.

    Entered in the test itself: pytest puts its own capture on sys.stderr after the fixtures ran."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    tty = io.TextIOWrapper(io.FileIO(slave, "w"), encoding="utf-8", line_buffering=True, write_through=True)
    monkeypatch.setattr(sys, "stderr", tty)
    setup_logging("prog")  # its handler writes to this stderr
    try:
        yield master, tty
    finally:
        logging.getLogger("instance_cloudimage").handlers.clear()
        monkeypatch.undo()
        tty.close()
        os.close(master)


def screen(master: int) -> tuple[str, list[str]]:
    os.set_blocking(master, False)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    raw = b"".join(chunks).decode()
    return raw, [row for row in render(raw) if row]


def test_log_lines_never_tear_a_bar_and_no_frame_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("instance_cloudimage.test")
    with terminal(monkeypatch) as (master, tty), console_logging():
        with Progress("downloading image", 100 * MiB) as download:
            download.update(10 * MiB)
            log.info("image content: qcow2")
            with Progress("converting image", 64 * MiB) as conversion:  # two bars at once
                conversion.advance_to(32 * MiB)
                log.warning("a line while two bars run")
                download.update(90 * MiB)
        log.info("done")
        tty.flush()
        raw, rows = screen(master)
    assert "of 100.0 MiB" in raw and "of 64.0 MiB" in raw  # the bars were drawn, in the log's units
    # Every line whole on its own row, and nothing else: no torn line, no stale frame.
    assert rows == ["prog: image content: qcow2", "prog: a line while two bars run", "prog: done"], rows


def test_without_a_terminal_nothing_is_redirected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    setup_logging("prog")
    try:
        handlers = list(logging.getLogger("instance_cloudimage").handlers)
        with console_logging():
            assert logging.getLogger("instance_cloudimage").handlers == handlers
    finally:
        logging.getLogger("instance_cloudimage").handlers.clear()
