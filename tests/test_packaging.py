"""The Debian package's dependencies against the tools the code runs: every host tool the code
runs is named in runtime/process.py's PACKAGES (which also tells a user what to install), and
every package named there is a Depends or Recommends of the binary package."""

from __future__ import annotations

import re
from pathlib import Path

from instance_cloudimage.runtime.process import PACKAGES

REPO = Path(__file__).resolve().parents[1]
ESSENTIAL = {"util-linux"}  # never listed as a dependency (Debian policy)
# The tools run with a literal argv; the decoders and qemu-img, run through variables, are in
# PACKAGES by construction (their callers look their package up there).
RUN_RE = re.compile(r'\brun(?:_streaming)?\(\s*\[\s*"([^"]+)"')
NOT_DEPENDED_ON = {"systemctl"}  # run only to remove the old worker's units where systemd is present


def binary_relations(field: str) -> set[str]:
    control = (REPO / "debian" / "control").read_text()
    stanza = control.split("\nPackage: ganeti-instance-cloudimage\n", 1)[1]
    m = re.search(rf"^{field}:(.*?)(?=^\S)", stanza + "\nEnd:", re.S | re.M)
    assert m, field
    relations = (r.strip() for r in m.group(1).split(","))
    return {r.split()[0] for r in relations if r and not r.startswith("$")}


def test_every_tool_run_with_a_literal_argv_has_a_package() -> None:
    run = set()
    for path in (REPO / "instance_cloudimage").rglob("*.py"):
        run |= set(RUN_RE.findall(path.read_text()))
    assert {"qemu-img", "sfdisk", "mcopy"} <= run  # the pattern finds calls at all
    assert run - NOT_DEPENDED_ON - set(PACKAGES) == set()


def test_every_package_of_a_tool_is_a_dependency() -> None:
    related = binary_relations("Depends") | binary_relations("Recommends")
    assert "qemu-utils" in related and "pigz" in related
    assert set(PACKAGES.values()) - ESSENTIAL - related == set()
