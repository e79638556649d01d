"""The docs document what the code has: every parameter, site setting, variant setting and
shipped variant (docs/configuration.md), the node packages (docs/install.md); the README's two
opening commands are the ones CI runs, it stays short, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from instance_cloudimage.ganeti.variants import VARIANT_SETTINGS
from instance_cloudimage.params.table import PARAMETERS
from instance_cloudimage.runtime.resources import shipped_dir
from instance_cloudimage.runtime.settings import Setting
from instance_cloudimage.runtime.siteconfig import SITE_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.glob("*.md")])
README_MAX_LINES = 200


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


def without_fences(text: str) -> str:
    """``text`` without its fenced code blocks: a '# comment' in one is no heading."""
    return re.sub(r"^ *(```|~~~).*?^ *\1[^\n]*$", "", text, flags=re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link markup dropped, lower case, punctuation other than '-'
    and '_' removed, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = without_fences(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#* *$", text, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def relative_links(text: str) -> list[str]:
    """The targets of the Markdown links in ``text`` that are not URLs (https:, mailto:...)."""
    prose = re.sub(r"`[^`\n]*`", "", without_fences(text))
    targets = re.findall(r"\]\(([^)\s]+)\)", prose)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


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
        if name.strip() and comment.strip() not in ("test", "build"):
            node_packages.append(name.strip())
    m = re.search(r'gnt-cluster command "apt-get install -y --no-install-recommends (.*?)"', page("install.md"), re.S)
    assert m, "docs/install.md has no apt-get line for the nodes"
    assert m.group(1).replace("\\", " ").split() == node_packages


def test_readme_is_short() -> None:
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the detail into docs/"


def test_the_readme_map_links_every_docs_page() -> None:
    mapped = {link.partition("#")[0] for link in relative_links(section(README, "Documentation"))}
    for target in sorted(mapped):
        assert (ROOT / target).is_file(), f"README's map links {target}, which does not exist"
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert pages <= mapped, f"docs pages missing from README's map: {sorted(pages - mapped)}"


@pytest.mark.parametrize("source", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(source: Path) -> None:
    broken = []
    for link in relative_links(source.read_text()):
        target, _, anchor = link.partition("#")
        path = (source.parent / target).resolve() if target else source
        if not path.exists():
            broken.append(f"{link}: no {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{source.relative_to(ROOT)}: " + "; ".join(broken)


# Paths the docs name in code spans: files of the project, which a move must not leave behind.
PROJECT_PATH = re.compile(r"`((?:instance_cloudimage|tests|bench|scripts|hooks\.d|variants|docs)/[\w./-]*)`")


@pytest.mark.parametrize("source", PAGES, ids=lambda p: p.name)
def test_named_project_files_exist(source: Path) -> None:
    named = PROJECT_PATH.findall(source.read_text())
    missing = [p for p in named if "<" not in p and "*" not in p and not (ROOT / p).exists()]
    assert not missing, f"{source.name} names files that do not exist: {missing}"
