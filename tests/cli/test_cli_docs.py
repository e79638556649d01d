"""The man page and the bash completion the package ships are generated from the current parser.

debian/make-cli-docs is what the package build runs; it runs here with Debian's python3 and its
argparse-manpage and shtab (build dependencies, installed by .ci/setup), so neither file is kept
in the repository and neither can go stale.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from instance_cloudimage.cli.main import build_parser
from tests.conftest import need_tools

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"


def make_cli_docs(out: Path) -> tuple[str, Path]:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import build_manpages, shtab"], capture_output=True, check=False)
    if probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI is missing python3-argparse-manpage or python3-shtab (.ci/setup installs them)")
        pytest.skip("needs python3-argparse-manpage and python3-shtab (sudo .ci/setup)")
    subprocess.run([SYSTEM_PYTHON, REPO / "debian" / "make-cli-docs", out], env={"PYTHONPATH": os.fspath(REPO)},
                   check=True)
    return (out / "instance-cloudimage.8").read_text(), out / "instance-cloudimage"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_man_page_documents_every_subcommand_and_option(tmp_path: Path) -> None:
    page, _ = make_cli_docs(tmp_path)
    assert page.startswith('.TH INSTANCE-CLOUDIMAGE 8 ')
    parser = build_parser()
    for name, sub in subparsers(parser).items():
        assert f".SH OPTIONS 'instance-cloudimage {name}'" in page
        for action in (a for a in sub._actions if a.dest != "help"):
            for option in action.option_strings:
                assert f"\\fB{option.replace('-', chr(92) + '-')}" in page, (name, option)
    assert "/etc/ganeti/instance\\-cloudimage/variants.list" in page


def test_the_man_page_renders_without_warnings(tmp_path: Path) -> None:
    need_tools("man")
    make_cli_docs(tmp_path)
    r = subprocess.run(["man", "--warnings", "-l", tmp_path / "instance-cloudimage.8"], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "MANWIDTH": "100", "LANG": "C.UTF-8"}, check=True)
    assert r.stderr == ""
    assert "instance-cloudimage - Ganeti OS provider for distribution cloud images" in r.stdout


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers after ``instance-cloudimage WORDS...`` (the last word being typed)."""
    line = " ".join(("instance-cloudimage", *words))
    program = (f'source {script}; COMP_WORDS=(instance-cloudimage {" ".join(repr(w) for w in words)}); '
               f'COMP_CWORD={len(words)}; COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; '
               '_shtab_instance_cloudimage; printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return r.stdout.split()


def test_bash_completes_the_current_subcommands_and_options(tmp_path: Path) -> None:
    _, script = make_cli_docs(tmp_path)
    assert sorted(complete(script, "")) == sorted(subparsers(build_parser()))
    assert "--destdir" in complete(script, "install", "--")
    assert complete(script, "cache", "pr") == ["prune"]
