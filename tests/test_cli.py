"""The instance-cloudimage command with bad input: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import Site, cli


def assert_one_line_error(r: subprocess.CompletedProcess[str], phrase: str) -> None:
    rc, err = r.returncode, r.stderr
    assert rc in (1, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instance-cloudimage: error: "), err
    assert phrase in lines[0], lines[0]


@pytest.mark.parametrize(("size", "phrase"), [
    ("lots", "--disk-size must be a size such as 10G or 512M"),
    ("99999999T", "--disk-size is too large"),
])
def test_bad_disk_size(site: Site, tmp_path: Path, size: str, phrase: str) -> None:
    disk = tmp_path / "disk.img"
    assert_one_line_error(cli("create", "--disk", str(disk), "--disk-size", size, *site.cli_args()), phrase)
    assert not disk.exists()


def test_disk_that_cannot_be_created(site: Site, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = cli("create", "--disk", str(tmp_path / "file" / "disk.img"), *site.cli_args())
    disk = tmp_path / "file" / "disk.img"
    assert_one_line_error(r, f"cannot create the disk file {disk}: a parent is not a directory")


def test_os_parameter_without_a_value_is_not_echoed(site: Site, tmp_path: Path) -> None:
    # Someone who forgets 'name=' may have typed the value itself (a password hash, a key).
    r = cli("create", "--disk", str(tmp_path / "d.img"), "-O", "image=/x", "-O", "$6$SECRET", *site.cli_args())
    assert_one_line_error(r, "-O expects name=value; argument 2 has no '='")
    assert "SECRET" not in r.stderr
