"""Administrators' hooks: executables run at four points of create (docs/hooks.md).

Each hook is a standalone program with a documented interface (osbuild's stage contract): an
environment, a JSON file describing the instance, and an exit code.  Hooks are found in
``<phase>.d/`` and ``<phase>.d/<variant>/`` under the shipped and the site ``hooks.d``; a hook
with the same name in a later directory replaces an earlier one, and the merged set runs in
byte order of the names.  Every hook of every phase is found and checked before create touches
the network or the disk, so a refused hook costs nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import signal
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from instance_cloudimage.hooks.facts import HookFacts, describe_for_hooks, hook_variables, visible_parameters
from instance_cloudimage.image.formats import DECLARABLE_FORMATS
from instance_cloudimage.params.table import check_image, check_image_checksum
from instance_cloudimage.runtime.errors import CommandNotFound, HookFailed, ParameterError
from instance_cloudimage.runtime.process import run_streaming
from instance_cloudimage.runtime.resources import shipped_dir
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig
from instance_cloudimage.sources.fetch import ImageRef
from instance_cloudimage.sources.urlpolicy import redact_url

log = logging.getLogger(__name__)


class Phase(StrEnum):
    PRE_FETCH = "pre-fetch"
    PRE_WRITE = "pre-write"
    POST_WRITE = "post-write"
    POST = "post"


HOOK_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# Names that are leftovers of editors and package managers, never hooks.
BACKUP_RE = re.compile(r"(~|\.bak|\.orig|\.swp|\.dpkg-[a-z]+|\.rpm(new|save|orig)|\.ucf-[a-z]+)$")
MASK_TARGET = "/dev/null"
LAST_LINES = 5
# A shipped hook may declare, in its first lines, the $CONFDATA entry that enables it.  Without
# that entry it is left out of the plan, so an unconfigured example costs nothing: above all, no
# read-write mount of the guest for post-write hooks that would do nothing (the disk of a
# seed=none create stays byte-identical to the image).
CONFDATA_DECLARATION_RE = re.compile(rb"^#\s*instance-cloudimage-confdata:\s*([A-Za-z0-9_.-]+)\s*$", re.MULTILINE)
DECLARATION_WINDOW = 4096


@dataclass(frozen=True)
class Hook:
    phase: Phase
    name: str
    path: Path  # the directory entry (it may be a symlink)
    origin: str  # "shipped" or "site"

    def describe(self) -> str:
        return f"{self.phase.value} hook {self.path}"


@dataclass(frozen=True)
class HookPlan:
    """The checked hooks of every phase, in the order they run."""

    hooks: Mapping[Phase, tuple[Hook, ...]]

    def for_phase(self, phase: Phase) -> tuple[Hook, ...]:
        return self.hooks.get(phase, ())


# --- finding and checking ----------------------------------------------------------------------

def allowed_owners() -> frozenset[int]:
    # Ganeti runs us as root; a local, unprivileged `instance-cloudimage create` may own its own.
    return frozenset({0, os.geteuid()})


def check_directory(path: Path) -> None:
    """A site hook directory must be owned by root and writable by nobody else."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise HookFailed(f"hook directory {path} is not a directory")
    if st.st_uid not in allowed_owners():
        raise HookFailed(f"hook directory {path} is refused: it is owned by uid {st.st_uid}, not root",
                         f"chown root {path}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HookFailed(f"hook directory {path} is refused: it is writable by group or others",
                         f"chmod go-w {path}")


def check_hook(hook: Hook) -> None:
    """Raise HookFailed unless ``hook`` may run: executable, and for site hooks root's alone.

    Shipped hooks are part of the installed package and trusted like its Python modules; the
    ownership and mode rules guard the site's directories, where administrators drop programs.
    """
    real = Path(os.path.realpath(hook.path))
    try:
        st = os.stat(real)
    except OSError as e:
        raise HookFailed(f"{hook.describe()} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HookFailed(f"{hook.describe()} is refused: it is not a regular file")
    if not st.st_mode & stat.S_IXUSR:
        raise HookFailed(f"{hook.describe()} is refused: it is not executable",
                         f"chmod +x it to enable it, or remove it (masking: ln -s /dev/null {hook.name})")
    if hook.origin == "shipped":
        return
    owners = [("it", st)]
    if hook.path.is_symlink():
        owners.insert(0, ("its symlink", os.lstat(hook.path)))
    for what, s in owners:
        if s.st_uid not in allowed_owners():
            raise HookFailed(f"{hook.describe()} is refused: {what} is owned by uid {s.st_uid}, not root",
                             f"chown root {real}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HookFailed(f"{hook.describe()} is refused: it is writable by group or others", f"chmod go-w {real}")
    if real.parent != hook.path.parent:
        check_directory(real.parent)  # a symlinked hook is only as safe as the directory it lives in


def declared_confdata(path: Path) -> str | None:
    """The $CONFDATA entry a shipped hook declares it needs, if any."""
    try:
        with open(path, "rb") as f:
            head = f.read(DECLARATION_WINDOW)
    except OSError:
        return None  # check_hook reports it
    match = CONFDATA_DECLARATION_RE.search(head)
    return match.group(1).decode() if match else None


def is_configured(hook: Hook, confdata: Path) -> bool:
    if hook.origin != "shipped":
        return True
    entry = declared_confdata(hook.path)
    if entry is None or os.path.lexists(confdata / entry):
        return True
    log.debug("%s is left out: $CONFDATA/%s does not exist", hook.describe(), entry)
    return False


def is_masked(entry: Path) -> bool:
    return entry.is_symlink() and os.path.realpath(entry) == MASK_TARGET


def scan_directory(directory: Path, phase: Phase, origin: str, found: dict[str, Hook]) -> None:
    """Add the hooks in ``directory`` to ``found`` (same name: this one replaces the earlier)."""
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if name.startswith("."):
            continue
        if is_masked(entry):
            log.debug("%s/%s is masked (-> /dev/null)", directory, name)
            found.pop(name, None)
            continue
        if entry.is_dir():
            continue  # variant subdirectories are scanned on their own
        if BACKUP_RE.search(name) or (name.startswith("#") and name.endswith("#")):
            log.info("skipping %s: an editor or package-manager leftover, not a hook", entry)
            continue
        if not HOOK_NAME_RE.match(name):
            log.warning("skipping %s: hook names may only contain A-Z a-z 0-9 _ . -", entry)
            continue
        found[name] = Hook(phase, name, entry, origin)


def hook_roots(paths: Paths, shipped: Path | None = None) -> list[tuple[str, Path]]:
    return [("shipped", shipped_dir("hooks.d") if shipped is None else shipped), ("site", paths.site_hooks)]


def find_hooks(phase: Phase, variant: str, roots: list[tuple[str, Path]], confdata: Path) -> tuple[Hook, ...]:
    """The hooks of ``phase`` for ``variant``, checked, in running order."""
    found: dict[str, Hook] = {}
    for origin, root in roots:
        if not root.is_dir():
            continue
        phase_dir = root / f"{phase.value}.d"
        if not phase_dir.is_dir():
            continue  # and so is its variant subdirectory
        if origin == "site":
            check_directory(root)
            check_directory(phase_dir)
        for directory in (phase_dir, phase_dir / variant):
            if not directory.is_dir():
                continue
            if origin == "site" and directory != phase_dir:
                check_directory(directory)
            scan_directory(directory, phase, origin, found)
    hooks = tuple(found[name] for name in sorted(found) if is_configured(found[name], confdata))
    for hook in hooks:
        check_hook(hook)
    return hooks


def plan_hooks(paths: Paths, variant: str, *, shipped: Path | None = None) -> HookPlan:
    """Find and check the hooks of every phase.  Raises HookFailed for a refused hook or directory."""
    roots = hook_roots(paths, shipped)
    for _origin, root in roots:
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name.endswith(".d") and entry.name[:-2] not in {p.value for p in Phase}:
                    log.warning("%s is not a hook directory and is ignored (phases: %s)", entry,
                                ", ".join(f"{p.value}.d" for p in Phase))
    confdata = paths.site_hooks / "confdata"
    return HookPlan({phase: find_hooks(phase, variant, roots, confdata) for phase in Phase})


# --- running ------------------------------------------------------------------------------------

def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"failed with exit code {returncode}"


def run_one(hook: Hook, env: Mapping[str, str], timeout: float) -> None:
    """Run one hook, its output going to our stderr (Ganeti's log).  Raises HookFailed."""
    prefix = f"[{hook.phase.value} {hook.name}]"
    last: collections.deque[str] = collections.deque(maxlen=LAST_LINES)

    def on_line(line: str) -> None:
        last.append(line)
        log.info("%s %s", prefix, line)

    log.info("running %s", hook.describe())
    try:
        result = run_streaming([os.fspath(hook.path)], on_line, env=env, timeout=timeout)
    except CommandNotFound:
        raise HookFailed(f"{hook.describe()} cannot be run: the interpreter on its #! line does not exist") from None
    except OSError as e:
        raise HookFailed(f"{hook.describe()} cannot be run: {e.strerror}",
                         "a script must start with a #! line naming its interpreter") from None
    tail = " | ".join(x.strip() for x in last if x.strip()) or "no output"
    if result.timed_out:
        raise HookFailed(f"{hook.describe()} timed out after {timeout:.0f}s; last output: {tail}",
                         "raise [Hooks] Timeout in the site's defaults.conf if it needs longer")
    if result.returncode != 0:
        raise HookFailed(f"{hook.describe()} {_describe_exit(result.returncode)}; last output: {tail}")


def parse_pre_fetch_result(hook: Hook, text: str, image: ImageRef, site: SiteConfig) -> ImageRef:
    """Apply the ``key=value`` lines a pre-fetch hook wrote to $HOOK_RESULT.

    ``image=`` replaces the location and keeps the verification data (a mirror must serve the
    same bytes); ``image_checksum=`` replaces the expected digest and drops the variant's checksum
    file and signature, which describe another file; ``image_format=`` the declared format.
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key not in ("image", "image_checksum", "image_format"):
            raise HookFailed(f"{hook.describe()} wrote an invalid line {number} to $HOOK_RESULT",
                             "expected image=, image_checksum= or image_format= lines")
        values[key] = value.strip()
    if not values:
        return image
    try:
        if "image" in values:
            check_image(values["image"], site)
        if "image_checksum" in values:
            check_image_checksum(values["image_checksum"], site)
    except ParameterError as e:
        raise HookFailed(f"{hook.describe()} named an image that is refused: {e}") from None
    fmt = values.get("image_format", image.declared_format)
    if fmt != "auto" and fmt not in DECLARABLE_FORMATS:
        raise HookFailed(f"{hook.describe()} wrote an unknown image_format",
                         f"use auto or one of {', '.join(DECLARABLE_FORMATS)}")
    new = dataclasses.replace(image, location=values.get("image", image.location), declared_format=fmt)
    if "image_checksum" in values:
        new = dataclasses.replace(new, checksum=values["image_checksum"].lower(), checksum_url=None,
                                  signature_url=None, keyring=None)
    # Say that the image changed, but not to what when the original came from a parameter.
    log.info("%s replaced the image%s", hook.describe(),
             "" if image.from_parameter else f" with {redact_url(new.location)}")
    return new


def run_hooks(plan: HookPlan, phase: Phase, facts: HookFacts, site: SiteConfig) -> ImageRef:
    """Run the hooks of ``phase`` in order; return the image (pre-fetch hooks may replace it).

    Each hook sees what the hooks before it decided.  Raises HookFailed naming the hook.
    """
    hooks = plan.for_phase(phase)
    image = facts.image
    if not hooks:
        return image
    pass_secrets = bool(site.get("hooks_pass_secrets"))
    params, withheld = visible_parameters(facts.genv.params, pass_secrets)
    if withheld:
        log.debug("secret parameters %s are not passed to hooks ([Hooks] PassSecrets)", ", ".join(withheld))
    timeout = float(site.get("hook_timeout"))

    with tempfile.TemporaryDirectory(prefix=f"cloudimage-{phase.value}-") as tmp:
        json_path = Path(tmp) / "instance.json"
        for hook in hooks:
            current = dataclasses.replace(facts, image=image)
            doc = describe_for_hooks(current, phase.value, params=params, withheld=withheld)
            # 0600 in a 0700 directory: it may hold secrets when the site passes them.
            fd = os.open(json_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
            result_path = Path(tmp) / "result" if phase is Phase.PRE_FETCH else None
            if result_path is not None:
                result_path.unlink(missing_ok=True)
                result_path.touch(mode=0o600)
            env = hook_variables(current, phase.value, params=params, json_path=json_path, result_path=result_path)
            run_one(hook, env, timeout)
            if result_path is not None:
                image = parse_pre_fetch_result(hook, result_path.read_text(errors="replace"), image, site)
    return image
