#!/usr/bin/env python3
"""Write the seed corpus of each fuzz target into fuzz/corpus/<target>/ (made at run time, not
committed): small valid images from qemu-img, archives from tarfile and GNU tar, export streams
from write_stream, user-data and keys.  A tool that is missing only costs its seeds."""

from __future__ import annotations

import base64
import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from instance_cloudimage.disk import exportstream as ds

IMAGES = {  # name: (target, qemu-img convert options)
    "qcow2": ("qcow2", ["-O", "qcow2", "-o", "cluster_size=512"]),
    "qcow2-compressed": ("qcow2", ["-O", "qcow2", "-c", "-o", "cluster_size=4096"]),
    "qcow2-extended-l2": ("qcow2", ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=16k"]),
    "qcow2-v2": ("qcow2", ["-O", "qcow2", "-o", "compat=0.10,cluster_size=512"]),
    "vmdk": ("vmdk", ["-O", "vmdk"]),
    "vmdk-stream": ("vmdk", ["-O", "vmdk", "-o", "subformat=streamOptimized"]),
    "vpc": ("vhd", ["-O", "vpc"]),
    "vpc-fixed": ("vhd", ["-O", "vpc", "-o", "subformat=fixed,force_size=on"]),
    "vhdx": ("vhdx", ["-O", "vhdx", "-o", "block_size=1M,log_size=1M"]),
    "vdi": ("vdi", ["-O", "vdi"]),
}
DISK = bytes(range(256)) * 16 + bytes(8192) + b"data" * 1024


def images(corpus: Path, work: Path) -> None:
    raw = work / "raw"
    raw.write_bytes(DISK.ljust(64 * 1024, b"\0"))
    if shutil.which("qemu-img") is None:
        print("seeds: qemu-img is missing; the image targets start from nothing", file=sys.stderr)
        return
    for name, (target, options) in IMAGES.items():
        out = work / name
        subprocess.run(["qemu-img", "convert", "-f", "raw", *options, str(raw), str(out)], check=True,
                       capture_output=True)
        for where in (target, "detect"):
            shutil.copy(out, corpus / where / name)


def tars(corpus: Path, work: Path) -> None:
    for fmt, label in ((tarfile.USTAR_FORMAT, "ustar"), (tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in (("box.ovf", b"<ovf/>"), ("disk.img" if label == "ustar" else "a" * 110 + "/disk.img",
                                                       DISK[:2048])):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (corpus / "tar" / label).write_bytes(buf.getvalue())
    if shutil.which("tar") is None:
        return
    with open(work / "disk.raw", "wb") as f:
        f.write(DISK[:4096])
        f.seek(64 * 1024)
        f.write(b"after a hole")
    for fmt in ("oldgnu", "pax"):
        subprocess.run(["tar", f"--format={fmt}", "-S", "-cf", str(corpus / "tar" / f"sparse-{fmt}"), "-C", str(work),
                        "disk.raw"], check=True, capture_output=True)


def streams(corpus: Path) -> None:
    fd = os.memfd_create("disk")
    try:
        os.ftruncate(fd, 64 * 1024)
        os.pwrite(fd, DISK[:4096], 0)
        os.pwrite(fd, DISK[:4096], 40960)
        for name, level in (("plain", None), ("zstd", 3)):
            sink = io.BytesIO()
            ds.write_stream(fd, 64 * 1024, sink, zstd_level=level)
            (corpus / "exportstream" / name).write_bytes(sink.getvalue())
    finally:
        os.close(fd)


USER_DATA = {
    "cloud-config": "#cloud-config\nhostname: a\npackages: [vim]\nusers:\n  - name: x\n    groups: [a, b]\n",
    "script": "#!/bin/sh\necho hi\n",
    "include": "#include\nhttps://example.org/a\nfile:///x\n",
    "jinja": "## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n",
    "archive": "#cloud-config-archive\n- type: text/x-shellscript\n  content: echo\n",
    "mime": 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\n'
            "Content-Type: text/x-shellscript\n\n#!/bin/sh\n--b--\n",
    "json": '{"a": [1, 2, {"b": null}]}',
    "headless": "runcmd: [ls]\nwhen: 2001-02-03\n",
}


def _key(type_name: str, *fields: bytes) -> str:
    blob = b"".join(struct.pack(">I", len(f)) + f for f in (type_name.encode(), *fields))
    return f"{type_name} {base64.b64encode(blob).decode()}"


def seed_text(corpus: Path) -> None:
    for name, text in USER_DATA.items():
        (corpus / "userdata" / name).write_text(text)
    (corpus / "userdata" / "base64-gzip").write_text(
        "base64:" + base64.b64encode(gzip.compress(USER_DATA["cloud-config"].encode())).decode())
    keys = {
        "ed25519": _key("ssh-ed25519", bytes(range(32))) + " me@host",
        "rsa": _key("ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xc3" * 256),
        "ecdsa": _key("ecdsa-sha2-nistp256", b"nistp256", b"\x04" + bytes(64)),
        "cert": _key("ssh-ed25519-cert-v01@openssh.com", bytes(32), bytes(200)),
        "options": 'restrict,command="echo \\"hi\\"",from="10.0.0.0/8" ' + _key("ssh-ed25519", bytes(32)),
    }
    for name, line in keys.items():
        (corpus / "sshkeys" / name).write_text(line)
    (corpus / "sshkeys" / "several").write_text(";".join(keys.values()))


def main() -> None:
    corpus = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "corpus")
    for target in ("detect", "qcow2", "vmdk", "vhd", "vhdx", "vdi", "tar", "exportstream", "userdata", "sshkeys"):
        (corpus / target).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
        images(corpus, Path(tmp))
        tars(corpus, Path(tmp))
    streams(corpus)
    seed_text(corpus)


if __name__ == "__main__":
    main()
