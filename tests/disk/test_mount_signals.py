"""signals_deferred: a SIGTERM arriving between "attached" and "registered" waits for the block's end."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from instance_cloudimage.disk.mount import signals_deferred


class Stop(BaseException):
    pass


@pytest.fixture()
def raising_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_is_delivered_after_the_block(raising_sigterm: None) -> None:
    steps = []
    with pytest.raises(Stop):
        with signals_deferred():
            steps.append("attached")
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("registered")  # still runs: the signal is held back
        steps.append("after")  # never runs: the signal is delivered when the block ends
    assert steps == ["attached", "registered"]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_mask_is_restored_on_error() -> None:
    with pytest.raises(RuntimeError), signals_deferred():
        raise RuntimeError
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
