"""qemu-img's answer about a stable image file is kept and reused; our checks still run on it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from instance_cloudimage.disk import convert
from instance_cloudimage.disk.convert import inspect_with_qemu
from instance_cloudimage.image.detect import inspect_file
from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.image.formats import DetectedImage
from instance_cloudimage.runtime.errors import UnsafeImage
from tests.conftest import Site, cli, need_root, need_tools


def qcow2(path: Path, size: str = "64M") -> DetectedImage:
    need_tools("qemu-img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, size], check=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        return inspect_file(ImageFile(fd))
    finally:
        os.close(fd)


class Asked:
    """inspect_with_qemu's question, counted: the real qemu-img answers it."""

    def __init__(self, path: Path, detected: DetectedImage, kept: Path) -> None:
        self.path, self.detected, self.kept, self.count = path, detected, kept, 0

    def __call__(self) -> dict[str, object]:
        real = convert.ask_once  # the name inspect_with_qemu looks up

        def counting(path, detected, directory, ask):  # type: ignore[no-untyped-def]
            def counted() -> str:
                self.count += 1
                return ask()  # type: ignore[no-any-return]
            return real(path, detected, directory, counted)

        convert.ask_once = counting  # type: ignore[assignment]
        try:
            return inspect_with_qemu(self.path, self.detected, self.kept)
        finally:
            convert.ask_once = real  # type: ignore[assignment]


def test_an_unchanged_file_is_asked_about_once(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    asked = Asked(image, qcow2(image), tmp_path / "kept")
    first, second = asked(), asked()
    assert first == second and first["format"] == "qcow2"
    assert asked.count == 1
    records = list((tmp_path / "kept").iterdir())
    assert len(records) == 1 and records[0].stat().st_mode & 0o777 == 0o600


def test_a_changed_file_is_asked_about_again(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    asked = Asked(image, qcow2(image), tmp_path / "kept")
    asked()
    os.chmod(image, 0o600)  # metadata only: the change time moves all the same
    asked()
    assert asked.count == 2
    with open(image, "r+b") as f:  # same size, same mtime set back: still the change time
        st = os.stat(image)
        f.seek(st.st_size - 1)
        f.write(b"\0")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    asked()
    assert asked.count == 3


def test_the_checks_run_on_a_kept_answer(tmp_path: Path) -> None:
    """A kept answer naming a backing file is refused like a fresh one: the rules are not cached."""
    image = tmp_path / "a.qcow2"
    detected = qcow2(image)
    kept = tmp_path / "kept"
    inspect_with_qemu(image, detected, kept)
    (record,) = kept.iterdir()
    info = json.loads(record.read_text())
    record.write_text(json.dumps({**info, "backing-filename": "/etc/shadow"}))
    with pytest.raises(UnsafeImage, match="backing file"):
        inspect_with_qemu(image, detected, kept)


@pytest.mark.parametrize("spoil", ["world-writable", "symlink", "not json"])
def test_a_doubtful_record_is_ignored_or_refused(tmp_path: Path, spoil: str) -> None:
    image = tmp_path / "a.qcow2"
    detected = qcow2(image)
    kept = tmp_path / "kept"
    inspect_with_qemu(image, detected, kept)
    (record,) = kept.iterdir()
    if spoil == "world-writable":
        record.write_text(json.dumps({"format": "qcow2", "backing-filename": "/etc/shadow"}))
        record.chmod(0o666)
    elif spoil == "symlink":
        fake = tmp_path / "fake.json"
        fake.write_text(json.dumps({"format": "qcow2", "backing-filename": "/etc/shadow"}))
        record.unlink()
        record.symlink_to(fake)
    else:
        record.write_text("{not json")
    # Ignored: qemu-img is asked again, and its true answer passes.
    assert inspect_with_qemu(image, detected, kept)["format"] == "qcow2"


def test_without_a_directory_nothing_is_kept(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    asked = Asked(image, qcow2(image), tmp_path / "kept")
    asked.kept = None  # type: ignore[assignment]
    asked(), asked()
    assert asked.count == 2 and not (tmp_path / "kept").exists()


def test_a_directory_that_cannot_hold_records_is_only_a_miss(tmp_path: Path) -> None:
    """Keeping the answer is best effort, also when removing the half-made record fails the
    same way (a non-root user's create with the default, root-owned cache)."""
    image = tmp_path / "a.qcow2"
    (tmp_path / "file").write_text("not a directory")
    asked = Asked(image, qcow2(image), tmp_path / "file" / "qemu-info")
    asked(), asked()
    assert asked.count == 2


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["qcow2", "vmdk"])
def test_create_keeps_the_answer_for_an_image_used_in_place(site: Site, tmp_path: Path, fmt: str) -> None:
    """Each run opens the image through its own /proc/<pid>/fd path, which a VMDK's answer names."""
    need_root()
    need_tools("qemu-img")
    image = site.images / f"a.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, image, "16M"], check=True)
    runs = []
    for name in ("d1", "d2"):
        r = cli("--debug", "create", "--disk", os.fspath(tmp_path / f"{name}.raw"), "--disk-size", "32M",
                "-O", f"image={image}", "-O", "seed=none", *site.cli_args())
        assert r.returncode == 0, r.stderr
        runs.append(r.stderr)
    assert len(list((site.cache_dir / "qemu-info").iterdir())) == 1
    assert "qemu-img info: the answer kept" not in runs[0]
    assert "qemu-img info: the answer kept" in runs[1]
    assert "qemu-img info --output=json" in runs[0]  # the debug log of the commands run
    assert "qemu-img info --output=json" not in runs[1]
