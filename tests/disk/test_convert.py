"""The exact qemu-img argv (run() is mocked at its seam), and the O_DIRECT fallback."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.disk import convert
from instance_cloudimage.disk.write import DiskTarget
from instance_cloudimage.image.formats import DetectedImage, DiskFormat


def capture(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> None:
        assert kwargs["limits"] is convert.CONVERT_LIMITS and kwargs["env"] == {"MALLOC_ARENA_MAX": "3"}
        calls.append(list(argv))

    monkeypatch.setattr(convert, "run", fake_run)
    return calls


def test_convert_argv_for_a_qcow2_onto_a_block_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = capture(monkeypatch)
    monkeypatch.setattr(convert, "supports_direct_io", lambda target: True)
    target = DiskTarget("/dev/xenvg/disk,0", -1, 1 << 30, True, False)
    convert.convert_file(Path("/var/cache/x/image,1.qcow2"), DetectedImage(DiskFormat.QCOW2, 1 << 20, "qcow2 v3"),
                         target)
    assert calls == [["qemu-img", "convert", "-n", "-q", "-t", "none", "-W", "-m", "16",
                      "--image-opts", "driver=qcow2,file.driver=file,file.filename=/var/cache/x/image,,1.qcow2",
                      "--target-image-opts", "driver=raw,file.driver=host_device,file.filename=/dev/xenvg/disk,,0"]]


def test_fixed_vhd_is_read_as_raw_data_and_a_fresh_file_skips_zeroing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = capture(monkeypatch)
    real_open = os.open

    def no_direct(path: str, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")  # tmpfs on older kernels
        return real_open(path, flags, *args)

    monkeypatch.setattr(convert.os, "open", no_direct)
    target = DiskTarget("/srv/ganeti/file-storage/i/disk0", -1, 1 << 30, False, True)
    detected = DetectedImage(DiskFormat.VPC, 1 << 20, "vhd (fixed)", raw_data_size=1 << 20)
    convert.convert_file(Path("/tmp/a.vhd"), detected, target)
    assert calls[0][4:6] == ["-t", "writeback"]
    assert "--target-is-zero" in calls[0]
    assert "driver=raw,file.driver=file,file.filename=/tmp/a.vhd,size=1048576" in calls[0]
