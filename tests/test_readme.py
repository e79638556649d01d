"""The docs document what the code has: every parameter, site setting, variant setting and
shipped variant (docs/configuration.md), the node packages (docs/install.md); the README's two
opening commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from instance_cloudimage.config import SITE_SETTINGS
from instance_cloudimage.params import PARAMETERS
from instance_cloudimage.resources import shipped_dir
from instance_cloudimage.settings import Setting
from instance_cloudimage.variants import VARIANT_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def page(name: str) -> str:
    return (DOCS / name).read_text()


def section(text: str, title: str, where: str = "README") -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{where} has no '## {title}' section"
    return m.group(1)


def table_rows(text: str) -> list[list[str]]:
    rows = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows[2:] if r]  # skip the header and the |---| line


def configuration(title: str) -> str:
    return section(page("configuration.md"), title, "docs/configuration.md")


@pytest.mark.parametrize("param", [p.name for p in PARAMETERS])
def test_every_parameter_is_documented(param: str) -> None:
    assert param in [row[0] for row in table_rows(configuration("OS parameters"))]


@pytest.mark.parametrize("setting", SITE_SETTINGS, ids=lambda s: f"{s.section}.{s.key}")
def test_every_site_setting_is_documented(setting: Setting) -> None:
    assert [setting.section, setting.key] in [row[:2] for row in table_rows(configuration("Site configuration"))]


@pytest.mark.parametrize("setting", VARIANT_SETTINGS, ids=lambda s: f"{s.section}.{s.key}")
def test_every_variant_setting_is_documented(setting: Setting) -> None:
    assert [setting.section, setting.key] in [row[:2] for row in table_rows(configuration("Variants"))]


def test_every_shipped_variant_is_listed() -> None:
    shipped = sorted(p.stem for p in shipped_dir("variants").glob("*.conf"))
    listed = sorted(row[0] for row in table_rows(configuration("Variants")) if len(row) == 2)
    assert listed == shipped


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"^sudo \.ci/setup && sudo (.+)$", README, re.M)
    assert len(commands) == 2, commands
    assert commands[0].startswith(".venv/bin/instance-cloudimage create ")
    ci_run = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_run, f"CI must run the README's test command: {commands[1]}"


def test_node_packages_are_those_of_ci_packages_txt() -> None:
    node_packages = []
    for line in (ROOT / ".ci" / "packages.txt").read_text().splitlines():
        name, _, comment = line.partition("#")
        if name.strip() and comment.strip() != "test":
            node_packages.append(name.strip())
    m = re.search(r'gnt-cluster command "apt-get install -y --no-install-recommends (.*?)"', page("install.md"), re.S)
    assert m, "docs/install.md has no apt-get line for the nodes"
    assert m.group(1).replace("\\", " ").split() == node_packages
