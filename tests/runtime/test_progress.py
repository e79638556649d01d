"""Progress lines in Ganeti's log: throttled, and silent for small transfers (fake clock)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from instance_cloudimage.runtime import log as logmod
from instance_cloudimage.runtime.log import Progress

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(logmod.time, "monotonic", c)
    return c


def info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]


def run(clock: Clock, total: int | None, steps: int, step_bytes: int, seconds_per_step: float) -> None:
    with Progress("downloading image", total) as p:
        for _ in range(steps):
            clock.now += seconds_per_step
            p.update(step_bytes)


def test_small_transfers_print_nothing(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="instance_cloudimage")
    run(clock, 4 * MiB, 4, MiB, 3.0)
    assert info_lines(caplog) == []
    assert any("in 12.0s" in r.getMessage() for r in caplog.records)  # still at debug


def test_fast_transfer_prints_a_summary(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="instance_cloudimage")
    run(clock, 1000 * MiB, 1000, MiB, 0.0005)
    assert info_lines(caplog) == []  # under a second: debug only
    run(clock, 1000 * MiB, 1000, MiB, 0.002)
    assert info_lines(caplog)[-1] == "downloading image: 1000.0 MiB in 2.0s"
    assert len(info_lines(caplog)) <= 3


def test_slow_transfer_prints_about_every_tenth(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="instance_cloudimage")
    run(clock, 1000 * MiB, 10000, 100 * 1024, 0.01)  # 100 s, 10000 updates
    lines = info_lines(caplog)
    assert 10 <= len(lines) <= 12
    assert "(50%)" in " ".join(lines) and "ETA" in lines[0]


def test_unknown_size_prints_a_heartbeat(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="instance_cloudimage")
    run(clock, None, 600, MiB, 0.1)  # 60 s
    assert 5 <= len(info_lines(caplog)) <= 7


def test_known_size_heartbeat_every_30_seconds(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="instance_cloudimage")
    run(clock, 10 * 1024 * MiB, 1190, 100 * 1024, 0.1)  # 119 s, 116 MiB: never another 10%
    lines = info_lines(caplog)
    assert len(lines) == 4, lines  # at 30, 60 and 90 s, and the summary
    assert lines[0].startswith("downloading image: 29.3 MiB of 10.0 GiB (0%)")


def test_at_most_one_line_a_second(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="instance_cloudimage")
    run(clock, 100 * MiB, 5, 20 * MiB, 0.5)  # 2.5 s, a new decile every update
    assert len(info_lines(caplog)) == 3  # after 1 s, after 2 s, and the summary


def test_the_docs_state_this_cadence() -> None:
    """docs/images.md, "Progress", in the numbers the code uses."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "images.md").read_text()
    section = " ".join(text.split("## Progress", 1)[1].split("\n## ", 1)[0].split())
    known, unknown = Progress("x", 20 * MiB), Progress("x", None)
    known.close(success=False), unknown.close(success=False)
    assert f"a line each time another 10% is done, at most one a {'second' if Progress.MIN_GAP == 1 else '?'}" \
        in section
    assert f"a line after {known.interval:.0f} s without one ({unknown.interval:.0f} s when the size is unknown)" \
        in section
    assert f"under {Progress.QUIET_BELOW // MiB} MiB logs nothing but a debug line" in section
    assert "that took under a second without a progress line" in section
    assert "qemu-img" in section and "MiB, GiB" in section
