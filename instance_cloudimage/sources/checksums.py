"""Checksums: pinned digests and the distributions' checksum files.

Formats read:

* GNU coreutils ``HASH  NAME`` and ``HASH *NAME`` (Debian SHA512SUMS, Ubuntu SHA256SUMS,
  openSUSE ``.sha256``);
* BSD/``--tag`` ``SHA256 (NAME) = HASH`` (Fedora, CentOS, Rocky, AlmaLinux CHECKSUM files);
* a file holding one bare hash.

Names are matched exactly (a leading ``./`` or ``*`` is ignored), ``#`` lines are comments, and
a file giving two different hashes of one algorithm for one name is refused.  Only SHA-256 and
SHA-512 count; MD5 and SHA-1 lines are ignored.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from instance_cloudimage.runtime.errors import ChecksumMismatch, ConfigError

ALGORITHMS = {"sha256": 64, "sha512": 128}
STRENGTH = ("sha512", "sha256")  # preferred first
GNU_RE = re.compile(r"^(?P<hash>[0-9a-fA-F]+)\s+\*?(?P<name>\S.*?)\s*$")
BSD_RE = re.compile(r"^(?P<algo>[A-Za-z0-9-]+)\s*\((?P<name>.+)\)\s*=\s*(?P<hash>[0-9a-fA-F]+)\s*$")
BARE_RE = re.compile(r"^([0-9a-fA-F]{64}|[0-9a-fA-F]{128})$")


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hexdigest: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """``sha256:<hex>`` or ``sha512:<hex>`` (validated by the variant and parameter checks)."""
        algo, _, value = text.strip().lower().partition(":")
        if algo not in ALGORITHMS or len(value) != ALGORITHMS[algo] or not re.fullmatch(r"[0-9a-f]+", value):
            raise ValueError("expected sha256:<64 hex digits> or sha512:<128 hex digits>")
        return cls(algo, value)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def algorithm_of(hexdigest: str) -> str | None:
    for algo, length in ALGORITHMS.items():
        if len(hexdigest) == length:
            return algo
    return None


@dataclass
class ChecksumList:
    """name → digests by algorithm, from one checksum file."""

    source: str  # how to name the file in messages
    entries: dict[str, dict[str, str]] = field(default_factory=dict)
    bare: Digest | None = None

    def add(self, name: str, algo: str, value: str) -> None:
        name = name.removeprefix("./")
        known = self.entries.setdefault(name, {})
        if known.get(algo, value) != value:
            raise ChecksumMismatch(f"checksum file {self.source} gives two different {algo} hashes for {name}",
                                   "the file is corrupt or was tampered with")
        known[algo] = value

    def lookup(self, name: str) -> Digest | None:
        """The strongest digest listed for exactly ``name`` (or the bare hash)."""
        found = self.entries.get(name)
        if found:
            for algo in STRENGTH:
                if algo in found:
                    return Digest(algo, found[algo])
        if self.bare is not None and not self.entries:
            return self.bare
        return None

    def pick(self, pattern: str) -> str:
        """The newest listed name matching a glob (natural version order).  Raises ConfigError."""
        names = [n for n in self.entries if "/" not in n and fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise ConfigError(f"checksum file {self.source} lists no file matching {pattern}",
                              "check the variant's [Image] NamePattern")
        return max(names, key=natural_key)


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key treating digit runs as numbers: 43-1.10 after 43-1.9."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


def parse_checksum_file(text: str, source: str) -> ChecksumList:
    """Parse the (already signature-checked) text of a checksum file.  Raises ChecksumMismatch."""
    out = ChecksumList(source)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if len(lines) == 1 and BARE_RE.match(lines[0]):
        value = lines[0].lower()
        algo = algorithm_of(value)
        if algo:
            out.bare = Digest(algo, value)
        return out
    for line in lines:
        m = BSD_RE.match(line)
        if m:
            algo = m.group("algo").lower().replace("-", "")
            value = m.group("hash").lower()
            if algo in ALGORITHMS and len(value) == ALGORITHMS[algo]:
                out.add(m.group("name"), algo, value)
            continue
        m = GNU_RE.match(line)
        if m:
            value = m.group("hash").lower()
            gnu_algo = algorithm_of(value)
            if gnu_algo:
                out.add(m.group("name"), gnu_algo, value)
    return out


def lookup_required(checksums: ChecksumList, names: list[str]) -> Digest:
    """The digest for the first of ``names`` the file lists.  Raises ChecksumMismatch."""
    for name in names:
        digest = checksums.lookup(name)
        if digest is not None:
            return digest
    raise ChecksumMismatch(f"checksum file {checksums.source} has no SHA-256/SHA-512 entry for {names[0]}",
                           "the image cannot be verified; check the variant's ChecksumURL")
