"""The exact qemu-img argv (run_streaming() is mocked at its seam), the O_DIRECT fallback, and
qemu-img's own progress and errors (the real qemu-img)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.disk import convert
from instance_cloudimage.disk.write import DiskTarget
from instance_cloudimage.image.formats import DetectedImage, DiskFormat
from instance_cloudimage.runtime.errors import ConversionError
from instance_cloudimage.runtime.process import StreamedRun, child_environment
from tests.conftest import need_tools


def capture(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], on_line: object, **kwargs: Any) -> StreamedRun:
        assert kwargs["limits"] is convert.CONVERT_LIMITS and kwargs["split_cr"] is True
        assert kwargs["env"] == child_environment({"MALLOC_ARENA_MAX": "3"})
        calls.append(list(argv))
        return StreamedRun(returncode=0, timed_out=False)

    monkeypatch.setattr(convert, "run_streaming", fake_run)
    return calls


def test_convert_argv_for_a_qcow2_onto_a_block_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = capture(monkeypatch)
    monkeypatch.setattr(convert, "supports_direct_io", lambda target: True)
    target = DiskTarget("/dev/xenvg/disk,0", -1, 1 << 30, True, False)
    convert.convert_file(Path("/var/cache/x/image,1.qcow2"), DetectedImage(DiskFormat.QCOW2, 1 << 20, "qcow2 v3"),
                         target)
    assert calls == [["qemu-img", "convert", "-n", "-p", "-t", "none", "-W", "-m", "16",
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


def file_target(path: Path, size: int) -> tuple[DiskTarget, int]:
    with open(path, "wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDWR)
    return DiskTarget(os.fspath(path), fd, size, False, True), fd


def test_qemu_img_progress_drives_ours(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The amount done comes only from qemu-img's '(NN.NN/100%)' lines: all of it at the end."""
    need_tools("qemu-img", "qemu-io")
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "24M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 8M", image], check=True, capture_output=True)
    target, fd = file_target(tmp_path / "disk.img", 32 * 1024 * 1024)
    caplog.set_level(logging.DEBUG, logger="instance_cloudimage")
    try:
        convert.convert_file(image, DetectedImage(DiskFormat.QCOW2, 24 * 1024 * 1024, "qcow2 v3"), target)
    finally:
        os.close(fd)
    assert "converting image: 24.0 MiB in " in caplog.text
    with open(tmp_path / "disk.img", "rb") as f:
        f.seek(1024 * 1024)
        assert f.read(8 * 1024 * 1024) == b"\x5a" * 8 * 1024 * 1024


def test_qemu_img_errors_are_one_line(tmp_path: Path) -> None:
    need_tools("qemu-img")
    image = tmp_path / "not.qcow2"
    image.write_bytes(b"this is no qcow2 image" * 100)
    target, fd = file_target(tmp_path / "disk.img", 1024 * 1024)
    try:
        with pytest.raises(ConversionError, match=r"^qemu-img convert failed: qemu-img: Could not open .*"
                                                  r"Image is not in qcow2 format$"):
            convert.convert_file(image, DetectedImage(DiskFormat.QCOW2, 1024 * 1024, "qcow2 v3"), target)
    finally:
        os.close(fd)
