#!/usr/bin/env python3
"""atheris (libFuzzer) harnesses for the parsers that read untrusted bytes.

    python3 fuzz/fuzz.py TARGET [libFuzzer options] [corpus directories]

TARGET is one of TARGETS below.  Each target passes what the fuzzer makes to one parser and lets
only our refusals (UserError) through: any other exception, a read outside an image file or a
run over libFuzzer's -timeout is a finding, saved as a crash-* or timeout-* file.  fuzz/run.sh
runs every target for a bounded time with seeds from fuzz/seeds.py; CI does not run these (the
Hypothesis properties in tests/*/test_*_properties.py are the suite's share).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from instance_cloudimage.disk import exportstream as ds
    from instance_cloudimage.disk import importstream as ims
    from instance_cloudimage.image import qcow2, vhd, vmdk
    from instance_cloudimage.image.detect import inspect_file
    from instance_cloudimage.image.file import ImageFile
    from instance_cloudimage.image.formats import DetectedImage
    from instance_cloudimage.image.tar import TarMember
    from instance_cloudimage.runtime.errors import UserError
    from instance_cloudimage.seed.sshkeys import parse_authorized_keys
    from instance_cloudimage.seed.userdata import classify, decode_user_data


class CheckedImage(ImageFile):
    """ImageFile over the one reused memfd, asserting that every read it serves is inside the file."""

    def read_at(self, offset: int, length: int) -> bytes:
        data = super().read_at(offset, length)
        if not (0 <= offset and offset + len(data) <= self.size):
            raise AssertionError(f"read of {length} bytes at {offset} outside a {self.size}-byte file")
        return data


FD = os.memfd_create("fuzz-image")


def image(data: bytes) -> CheckedImage:
    os.ftruncate(FD, 0)
    os.pwrite(FD, data, 0)
    return CheckedImage(FD)


def inspector(inspect: Callable[[ImageFile], DetectedImage]) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        try:
            inspect(image(data))
        except UserError:
            pass
    return target


def fuzz_tar(data: bytes) -> None:
    try:
        member = TarMember(io.BytesIO(data))
        if member.size > 64 << 20:  # gigabytes of sparse holes are zeros to copy, not a finding
            member.read(1 << 16)
            return
        got = 0
        while chunk := member.read(1 << 16):
            got += len(chunk)
        if got != member.size:
            raise AssertionError(f"member yielded {got} bytes, announced {member.size}")
        member.finish()
    except UserError:
        pass


def fuzz_exportstream(data: bytes) -> None:
    pos = 0

    def on_data(offset: int, piece: bytes) -> None:
        nonlocal pos
        if offset < pos or offset + len(piece) > header.disk_size:
            raise AssertionError(f"data at {offset} out of order or beyond the disk")
        pos = offset + len(piece)

    try:
        header = ims.parse_header(data[:ds.HEADER.size])
        ims.read_records(ims.Reader(io.BytesIO(data[ds.HEADER.size:]), header.compressed), header, 1 << 40, on_data)
    except UserError:
        pass


def env_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")  # what os.environ makes of any bytes


def fuzz_userdata(data: bytes) -> None:
    text = env_text(data)
    classify(text)
    try:
        decode_user_data(text)
    except UserError:
        pass


def fuzz_sshkeys(data: bytes) -> None:
    try:
        parse_authorized_keys(env_text(data))
    except UserError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "detect": inspector(inspect_file),
    "qcow2": inspector(qcow2.inspect_qcow2),
    "vmdk": inspector(vmdk.inspect_vmdk),
    "vhd": inspector(vhd.inspect_vhd),
    "vhdx": inspector(vhd.inspect_vhdx),
    "vdi": inspector(vhd.inspect_vdi),
    "tar": fuzz_tar,
    "exportstream": fuzz_exportstream,
    "userdata": fuzz_userdata,
    "sshkeys": fuzz_sshkeys,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus...]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
