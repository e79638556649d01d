"""run()/spawn(): resource limits reach the child (through prlimit, no Python between fork and exec)."""

from __future__ import annotations

import pytest

from instance_cloudimage.runtime.errors import CommandError, CommandNotFound
from instance_cloudimage.runtime.process import Limits, run, run_text, spawn

LIMITS = Limits(address_space=512 * 1024**2, cpu_seconds=7)


def limit_line(text: str, name: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name)]
    return line[len(name):].split()


def test_run_applies_the_limits_to_the_child() -> None:
    text = run_text(["cat", "/proc/self/limits"], limits=LIMITS)
    assert limit_line(text, "Max address space")[:2] == [str(512 * 1024**2)] * 2
    assert limit_line(text, "Max cpu time")[:2] == ["7", "7"]
    # and nothing leaks into a child run without limits
    assert limit_line(run_text(["cat", "/proc/self/limits"]), "Max cpu time")[:2] == ["unlimited", "unlimited"]


def test_spawn_applies_the_limits_to_the_child() -> None:
    child = spawn(["cat", "/proc/self/limits"], limits=LIMITS)
    try:
        assert child.proc.stdout is not None
        text = child.proc.stdout.read().decode()
        assert child.proc.wait(timeout=10) == 0
    finally:
        child.close()
    assert limit_line(text, "Max address space")[:2] == [str(512 * 1024**2)] * 2


def test_a_failure_under_limits_names_the_tool_not_prlimit() -> None:
    with pytest.raises(CommandError) as e:
        run(["ls", "/nonexistent-directory"], limits=LIMITS)
    assert e.value.argv[0].endswith("/ls") and e.value.returncode == 2
    assert str(e.value).startswith(e.value.argv[0])


def test_a_missing_tool_under_limits_is_named() -> None:
    with pytest.raises(CommandNotFound, match="'no-such-tool-here'"):
        run(["no-such-tool-here"], limits=LIMITS)

