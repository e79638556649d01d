"""Helpers for tests that drive a real single-node Ganeti cluster (see conftest.py, cluster.sh).

``GanetiCluster`` wraps the Ganeti CLI the way an administrator uses it: every command runs with
a clean environment (``env -i PATH=... LANG=C.UTF-8``) because the daemons and, through them,
the OS import/export scripts inherit it.  Output goes through temporary files rather than
pipes, so a daemon that keeps an inherited descriptor open can never hang a test.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from instance_cloudimage.runtime.resources import shipped_dir
from tests.support.ganeti_host import DEFAULT_TIMEOUT, GntError, GntResult, run_logged

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"

GNT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
OS_NAME = "cloudimage"
OS_DIR = Path("/srv/ganeti/os") / OS_NAME  # where the venv's 'instance-cloudimage install' puts it
OS_LOG_DIR = Path("/var/log/ganeti/os")
FILE_STORAGE_DIR = Path("/srv/ganeti/file-storage")
LOOP_IMG_DIR = Path("/srv/ganeti/loop-images")
# The 'nbdfile' ExtStorage provider (cluster.sh): volumes served by qemu-nbd, no block device.
NBD_IMG_DIR = Path("/srv/ganeti/nbd-images")
NBD_RUN_DIR = Path("/run/ganeti-test-nbd")
# The kvm stand-in cluster.sh installs (Ganeti allows access=userspace only with kvm).
KVM_STUB = Path("/var/lib/ganeti-test-cluster/kvm")
EXPORT_DIR = Path("/var/lib/ganeti/export")
DOMAIN = "example.test"
BRIDGE = "gntbr0"
# The site variant conftest.py puts into the installed OS (the demo image with a default user).
SITE_VARIANT = "demo-site"
SITE_VARIANT_USER = "cloud"


def gnt(*args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> GntResult:
    """Run a Ganeti command (``gnt("gnt-instance", "list")``) with Ganeti's clean environment."""
    result = run_logged(args, env=GNT_ENV, timeout=timeout, cwd="/")
    if check and result.returncode != 0:
        raise GntError(result)
    return result


def escape_option_value(value: str) -> str:
    """Ganeti splits ``-O`` lists at commas; a backslash keeps a comma inside a value."""
    return value.replace(",", "\\,")


def os_parameter_args(params: Mapping[str, str] | None, private: Mapping[str, str] | None,
                      secret: Mapping[str, str] | None) -> list[str]:
    """-O / --os-parameters-private / --os-parameters-secret, each only when given."""
    argv: list[str] = []
    for option, values in (("-O", params), ("--os-parameters-private", private),
                           ("--os-parameters-secret", secret)):
        if values:
            argv += [option, format_options(values)]
    return argv


def format_options(params: Mapping[str, str]) -> str:
    return ",".join(f"{k}={escape_option_value(v)}" for k, v in params.items())


@dataclass(frozen=True)
class DiskInfo:
    index: int
    template: str
    logical_id: tuple[str, ...]
    on_primary: str | None  # the device path while the disk is assembled


_DISK_RE = re.compile(r"^\s+- disk/(\d+): (\w+), size")


def parse_disks(info_text: str) -> list[DiskInfo]:
    """The disks in ``gnt-instance info`` output."""
    disks: list[DiskInfo] = []
    current: dict[str, object] | None = None

    def flush() -> None:
        if current is not None:
            disks.append(DiskInfo(int(str(current["index"])), str(current["template"]),
                                  tuple(current.get("logical_id", ())),  # type: ignore[arg-type]
                                  current.get("on_primary")))  # type: ignore[arg-type]

    for line in info_text.splitlines():
        m = _DISK_RE.match(line)
        if m:
            flush()
            current = {"index": m.group(1), "template": m.group(2)}
            continue
        if current is None:
            continue
        stripped = line.strip()
        if stripped.startswith("logical_id:"):
            current["logical_id"] = tuple(str(x) for x in ast.literal_eval(stripped.split(":", 1)[1].strip()))
        elif stripped.startswith("on primary:"):
            current["on_primary"] = stripped.split(":", 1)[1].strip().split(" (")[0]
    flush()
    return disks


@dataclass
class GanetiCluster:
    """The running test cluster and what the tests installed into it."""

    node: str  # the master node's FQDN
    config_dir: Path  # --config-dir baked into the installed OS
    cache_dir: Path  # --cache-dir baked into the installed OS
    image_dir: Path  # allowed directory ([Images] AllowedDirectories) for the image parameter
    work_dir: Path
    os_dir: Path = OS_DIR  # the OS definition Ganeti runs: the venv's install or the package's
    logs_before: frozenset[Path] = field(default_factory=frozenset)

    # --- commands ------------------------------------------------------------------------------

    def gnt(self, *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT) -> GntResult:
        return gnt(*args, check=check, timeout=timeout)

    @staticmethod
    def fqdn(short: str) -> str:
        return short if "." in short else f"{short}.{DOMAIN}"

    # --- instances -----------------------------------------------------------------------------

    def disk_option(self, index: int, template: str, size: str, extra: str = "") -> str:
        spec = f"{index}:size={size}"
        if template == "ext":
            spec += ",provider=loopfile"
        return spec + (f",{extra}" if extra else "")

    def add_instance(
        self,
        name: str,
        template: str = "file",
        variant: str = "demo",
        params: Mapping[str, str] | None = None,
        private: Mapping[str, str] | None = None,
        secret: Mapping[str, str] | None = None,
        nics: Sequence[str] | None = None,
        disks: Sequence[str] | None = None,
        disk_size: str = "128M",
        extra: Iterable[str] = (),
        check: bool = True,
    ) -> GntResult:
        """``gnt-instance add -o cloudimage+<variant>``, not started.

        ``nics`` are ``--net`` values (``"0:network=net1,ip=pool"``); None keeps Ganeti's
        default of one bridged NIC, ``[]`` gives ``--no-nics``.  ``disks`` are ``--disk``
        values; the default is one disk of ``disk_size`` (on the loopfile provider for ext).
        """
        argv = ["gnt-instance", "add", "-o", f"{OS_NAME}+{variant}", "-t", template,
                "-B", "memory=128M", "--no-start", "--no-name-check", "--no-ip-check", "-n", self.node]
        for d in disks if disks is not None else [self.disk_option(0, template, disk_size)]:
            argv += ["--disk", d]
        if nics is not None and not nics:
            argv.append("--no-nics")
        for n in nics or ():
            argv += ["--net", n]
        argv += os_parameter_args(params, private, secret)
        argv += list(extra)
        argv.append(self.fqdn(name))
        return self.gnt(*argv, check=check)

    def remove_instance(self, name: str, check: bool = True) -> GntResult:
        return self.gnt("gnt-instance", "remove", "-f", "--ignore-failures", self.fqdn(name), check=check)

    def reinstall(self, name: str, params: Mapping[str, str] | None = None,
                  private: Mapping[str, str] | None = None, secret: Mapping[str, str] | None = None,
                  check: bool = True) -> GntResult:
        """Note Ganeti 3.0 replaces the stored parameters by exactly these (pitfall 9)."""
        argv = ["gnt-instance", "reinstall", "-f"]
        argv += os_parameter_args(params, private, secret)
        return self.gnt(*argv, self.fqdn(name), check=check)

    def rename(self, old: str, new: str, check: bool = True) -> GntResult:
        # Without -f, rename asks for confirmation and silently exits 1 with no TTY (pitfall 5).
        return self.gnt("gnt-instance", "rename", "-f", "--no-ip-check", "--no-name-check",
                        self.fqdn(old), self.fqdn(new), check=check)

    def export(self, name: str, check: bool = True) -> GntResult:
        return self.gnt("gnt-backup", "export", "-n", self.node, self.fqdn(name), check=check)

    def export_dir(self, name: str) -> Path:
        return EXPORT_DIR / self.fqdn(name)

    def import_(self, exported: str, name: str, template: str = "file", disk_size: str = "128M",
                extra: Iterable[str] = (), check: bool = True) -> GntResult:
        """``gnt-backup import`` of ``exported``'s export as ``name`` with a new MAC (pitfall 6)."""
        return self.gnt("gnt-backup", "import", "-t", template,
                        "--disk", self.disk_option(0, template, disk_size), "--net", "0:mac=generate",
                        "-n", self.node, "--no-name-check", "--no-ip-check", "--src-node", self.node,
                        "--src-dir", os.fspath(self.export_dir(exported)), *extra, self.fqdn(name),
                        check=check)

    def export_dumps(self, name: str) -> list[Path]:
        """The disk dumps (our export scripts' output) in ``name``'s export directory."""
        return sorted(p for p in self.export_dir(name).iterdir() if p.name != "config.ini")

    def exports(self) -> set[str]:
        out = self.gnt("gnt-backup", "list", "--no-headers", "-o", "export").stdout
        return set(out.split()) - {"?"}  # "?": a node with no export directory yet

    def remove_export(self, name: str, check: bool = True) -> GntResult:
        return self.gnt("gnt-backup", "remove", self.fqdn(name), check=check)

    def instances(self) -> list[str]:
        out = self.gnt("gnt-instance", "list", "--no-headers", "-o", "name").stdout
        return out.split()

    def info(self, name: str) -> str:
        return self.gnt("gnt-instance", "info", self.fqdn(name)).stdout

    def disks_of(self, name: str) -> list[DiskInfo]:
        return parse_disks(self.info(name))

    def disk_path_of(self, name: str, index: int = 0) -> Path:
        """A regular file holding the disk's bytes, readable without activating the disk.

        file template: the disk file under /srv/ganeti/file-storage; ext (loopfile provider):
        the image file behind the loop device; ext (nbdfile provider): the file qemu-nbd serves.
        """
        disk = self.disks_of(name)[index]
        if disk.template == "file":
            return Path(disk.logical_id[1])
        if disk.template == "ext" and disk.logical_id[0] == "loopfile":
            return LOOP_IMG_DIR / f"{disk.logical_id[1]}.img"
        if disk.template == "ext" and disk.logical_id[0] == "nbdfile":
            return NBD_IMG_DIR / f"{disk.logical_id[1]}.img"
        raise AssertionError(f"no file behind disk {index} of {name}: {disk}")

    def field_of(self, name: str, field: str) -> str:
        """One ``gnt-instance list -o`` field of an instance (uuid, nic.macs, nic.ips, ...)."""
        return self.gnt("gnt-instance", "list", "--no-headers", "--separator=|", "-o", field,
                        self.fqdn(name)).stdout.strip()

    # --- site hooks ----------------------------------------------------------------------------

    @contextmanager
    def site_hooks(self, phase: str, hooks: Mapping[str, str | None]) -> Iterator[Path]:
        """Hooks in ``<config-dir>/hooks.d/<phase>.d/`` for the duration of the block.

        ``hooks`` maps a name to a script's text, or to None for a mask (the documented symlink to
        /dev/null, which disables a shipped hook of that name).  Files are root-owned 0755 in
        root-owned 0755 directories, as the hook runner demands; all of it goes afterwards.
        """
        created: list[Path] = []
        directory = self.config_dir / "hooks.d" / f"{phase}.d"
        for d in (directory.parent, directory):
            if not d.exists():
                d.mkdir(mode=0o755)
                os.chmod(d, 0o755)  # whatever the umask
                created.append(d)
        entries = []
        try:
            for name, text in hooks.items():
                entry = directory / name
                entries.append(entry)
                if text is None:
                    entry.symlink_to("/dev/null")
                else:
                    entry.write_text(text)
                    os.chmod(entry, 0o755)
            yield directory
        finally:
            for entry in entries:
                entry.unlink(missing_ok=True)
            for d in reversed(created):
                d.rmdir()

    @contextmanager
    def shipped_hooks_masked(self, phase: str = "post-write") -> Iterator[None]:
        """Every shipped hook of ``phase`` masked for the duration of the block."""
        shipped = shipped_dir("hooks.d") / f"{phase}.d"
        names = sorted(p.name for p in shipped.iterdir() if not p.name.startswith(".")) if shipped.is_dir() else []
        with self.site_hooks(phase, dict.fromkeys(names)):
            yield

    # --- networks ------------------------------------------------------------------------------

    def add_network(self, name: str, network: str, gateway: str | None = None,
                    network6: str | None = None, gateway6: str | None = None,
                    tags: Sequence[str] = (), mode: str = "bridged", link: str = BRIDGE) -> None:
        """``gnt-network add`` and connect it to the default node group."""
        argv = ["gnt-network", "add", f"--network={network}"]
        if gateway:
            argv.append(f"--gateway={gateway}")
        if network6:
            argv.append(f"--network6={network6}")
        if gateway6:
            argv.append(f"--gateway6={gateway6}")
        if tags:
            argv.append(f"--tags={','.join(tags)}")
        self.gnt(*argv, name)
        self.gnt("gnt-network", "connect", f"--nic-parameters=mode={mode},link={link}", name)

    def remove_network(self, name: str) -> None:
        self.gnt("gnt-network", "disconnect", name, check=False)
        self.gnt("gnt-network", "remove", name)

    # --- the OS scripts' logs ------------------------------------------------------------------

    def os_logs(self, kind: str | None = None, instance: str | None = None) -> list[Path]:
        """Log files Ganeti wrote for our OS scripts during this session, oldest first.

        ``kind``: add (create and reinstall), rename, import, export.  Ganeti names them
        ``<kind>-cloudimage+<variant>-<instance>[-<new>|-disk<N>]-<timestamp>.log``.
        """
        if not OS_LOG_DIR.is_dir():
            return []
        pattern = rf"^{re.escape(kind) if kind else '[a-z]+'}-{OS_NAME}(\+[^/]*?)?-"
        if instance is not None:
            pattern += rf"(.*-)?{re.escape(self.fqdn(instance))}-"
        found = [p for p in OS_LOG_DIR.iterdir()
                 if p not in self.logs_before and re.match(pattern, p.name)]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    def read_os_logs(self, kind: str | None = None, instance: str | None = None) -> str:
        return "".join(p.read_text(errors="replace") for p in self.os_logs(kind, instance))
