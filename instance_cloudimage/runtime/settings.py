"""One small INI reader driven by a table of settings (variants and the site config use it).

Each setting is declared once with its section, key, parser and default; unknown sections and
keys are errors, so a typo in an administrator's file is reported instead of silently ignored.
Keys may carry an architecture qualifier, ``URL[aarch64] = ...``, where the setting allows it.
"""

from __future__ import annotations

import configparser
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instance_cloudimage.runtime.errors import ConfigError

KEY_RE = re.compile(r"^(?P<key>[A-Za-z][A-Za-z0-9]*)(?:\[(?P<qual>[A-Za-z0-9_.-]+)\])?$")


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    dest: str
    parse: Callable[[str], Any]
    default: Any = None
    help: str = ""
    qualified: bool = False  # may be given per architecture as Key[arch]


# --- value parsers -----------------------------------------------------------------------------

def parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected yes or no")


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(v for v in re.split(r"[\s,]+", value.strip()) if v)


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        v = value.strip()
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return v
    return parse


def parse_size(value: str) -> int:
    """``10G``, ``512M``, ``1024`` (bytes) → bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
    if not m:
        raise ValueError("expected a size such as 20G or 512M")
    exponent: int = " KMGT".index((m.group(2) or " ").upper())
    return int(m.group(1)) * (1 << (10 * exponent))


def parse_positive_float(value: str) -> float:
    f = float(value)
    if not math.isfinite(f) or f <= 0:  # nan <= 0 is false
        raise ValueError("must be a positive number of seconds")
    return f


def parse_str(value: str) -> str:
    return value.strip()


# --- the reader --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedIni:
    """Values keyed by dest; qualified values keyed by (dest, qualifier)."""

    values: Mapping[str, Any]
    qualified: Mapping[tuple[str, str], Any]
    free_sections: Mapping[str, Mapping[str, str]]


def read_ini(
    path: Path,
    table: Iterable[Setting],
    *,
    what: str,
    free_sections: Iterable[str] = (),
    base: ParsedIni | None = None,
) -> ParsedIni:
    """Parse ``path`` against ``table``.  ``base`` supplies values to override (site over shipped).

    ``free_sections`` hold arbitrary ``key = value`` pairs (e.g. the mirror map) and are returned
    as they are.  Raises ConfigError naming the file, section and key.
    """
    table = list(table)
    by_key = {(s.section.lower(), s.key.lower()): s for s in table}
    free = {f.lower() for f in free_sections}
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), inline_comment_prefixes=None,
                                       strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"{what} {path} is not a valid INI file: {first}") from None

    values: dict[str, Any] = dict(base.values) if base else {s.dest: s.default for s in table}
    qualified: dict[tuple[str, str], Any] = dict(base.qualified) if base else {}
    free_out: dict[str, dict[str, str]] = {k: dict(v) for k, v in (base.free_sections if base else {}).items()}
    for section in parser.sections():
        if section.lower() in free:
            free_out.setdefault(section.lower(), {}).update(parser.items(section))
            continue
        for raw_key, raw_value in parser.items(section):
            m = KEY_RE.match(raw_key)
            setting = by_key.get((section.lower(), m.group("key").lower())) if m else None
            if setting is None or m is None:
                known = sorted({s.section for s in table} | {f.capitalize() for f in free})
                raise ConfigError(f"{what} {path}: unknown setting [{section}] {raw_key}",
                                  f"known sections: {', '.join(known)}")
            qual = m.group("qual")
            if qual and not setting.qualified:
                raise ConfigError(f"{what} {path}: [{section}] {setting.key} cannot be given per architecture")
            try:
                value = setting.parse(raw_value)
            except ValueError as e:
                raise ConfigError(f"{what} {path}: [{section}] {raw_key} is invalid: {e}") from None
            if qual:
                qualified[(setting.dest, qual)] = value
            else:
                values[setting.dest] = value
    return ParsedIni(values=values, qualified=qualified, free_sections=free_out)
