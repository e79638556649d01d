"""The shipped example hooks, run as the executables they are against real directory trees."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from instance_cloudimage.runtime.resources import shipped_dir

HOOKS = shipped_dir("hooks.d")
MIRROR = HOOKS / "pre-fetch.d" / "50-local-mirror"
FILES = HOOKS / "post-write.d" / "50-install-files"
CONSOLE = HOOKS / "post-write.d" / "60-serial-console"
ROOT = os.geteuid() == 0


def run_hook(hook: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VARIANT": "debian-12"}
    return subprocess.run([hook], env={**base, **env}, capture_output=True, text=True, check=False)


# --- 50-local-mirror -------------------------------------------------------------------------------

@pytest.fixture
def confdata(tmp_path: Path) -> Path:
    d = tmp_path / "etc" / "hooks.d" / "confdata"
    d.mkdir(parents=True)
    return d


def mirror(confdata: Path, tmp_path: Path, url: str) -> tuple[subprocess.CompletedProcess[str], str]:
    result = tmp_path / "result"
    result.write_text("")
    proc = run_hook(MIRROR, CONFDATA=os.fspath(confdata), IMAGE_URL=url, HOOK_RESULT=os.fspath(result))
    return proc, result.read_text()


def test_mirror_inert_without_config(confdata: Path, tmp_path: Path) -> None:
    proc, result = mirror(confdata, tmp_path, "https://cloud.debian.org/images/x.qcow2")
    assert proc.returncode == 0 and result == "" and proc.stdout == ""


def test_mirror_rewrites_first_matching_prefix(confdata: Path, tmp_path: Path) -> None:
    (confdata / "local-mirror").write_text(
        "# upstream                      mirror\n"
        "https://cloud-images.ubuntu.com/  https://mirror.example.net/ubuntu/\n"
        "\n"
        "https://cloud.debian.org/images/  https://mirror.example.net/debian/\n"
        "https://cloud.debian.org/         https://never.example.net/")  # no final newline
    proc, result = mirror(confdata, tmp_path, "https://cloud.debian.org/images/cloud/bookworm/latest/x.qcow2")
    assert proc.returncode == 0, proc.stderr
    assert result == "image=https://mirror.example.net/debian/cloud/bookworm/latest/x.qcow2\n"
    proc, result = mirror(confdata, tmp_path, "https://example.org/other.qcow2")
    assert proc.returncode == 0 and result == ""


def test_mirror_last_line_without_newline(confdata: Path, tmp_path: Path) -> None:
    (confdata / "local-mirror").write_text("https://a.example/ https://b.example/")
    _, result = mirror(confdata, tmp_path, "https://a.example/x.img")
    assert result == "image=https://b.example/x.img\n"


def test_mirror_prefix_is_literal_not_a_pattern(confdata: Path, tmp_path: Path) -> None:
    (confdata / "local-mirror").write_text("https://*.example/ https://b.example/\n")
    _, result = mirror(confdata, tmp_path, "https://a.example/x.img")
    assert result == ""


def test_mirror_local_directory_with_fallback(confdata: Path, tmp_path: Path) -> None:
    local = tmp_path / "images" / "debian"
    (local / "cloud").mkdir(parents=True)
    (local / "cloud" / "have.qcow2").write_bytes(b"x")
    (confdata / "local-mirror").write_text(f"https://cloud.debian.org/images/ {local}/\n")
    _, result = mirror(confdata, tmp_path, "https://cloud.debian.org/images/cloud/have.qcow2")
    assert result == f"image={local}/cloud/have.qcow2\n"
    proc, result = mirror(confdata, tmp_path, "https://cloud.debian.org/images/cloud/missing.qcow2")
    assert proc.returncode == 0 and result == "" and "using the upstream image" in proc.stdout
    (confdata / "local-mirror").write_text(f"https://cloud.debian.org/images/ file://{local}/\n")
    _, result = mirror(confdata, tmp_path, "https://cloud.debian.org/images/cloud/have.qcow2")
    assert result == f"image=file://{local}/cloud/have.qcow2\n"


def test_mirror_malformed_line_fails(confdata: Path, tmp_path: Path) -> None:
    (confdata / "local-mirror").write_text("https://only-one-field.example/\n")
    proc, result = mirror(confdata, tmp_path, "https://only-one-field.example/x")
    assert proc.returncode == 1 and "expected '<upstream prefix> <mirror prefix>'" in proc.stderr and result == ""


# --- 50-install-files ------------------------------------------------------------------------------

@pytest.fixture
def guest(tmp_path: Path) -> Path:
    """A guest root as images have it: merged /usr, an /etc, a /root."""
    g = tmp_path / "guest"
    for d in ("usr/bin", "usr/lib", "etc/ssh", "root", "var/lib"):
        (g / d).mkdir(parents=True)
    (g / "bin").symlink_to("usr/bin")
    (g / "root").chmod(0o700)
    (g / "etc" / "motd").write_text("image motd\n")
    return g


def install(confdata: Path, guest: Path | None, variant: str = "debian-12") -> subprocess.CompletedProcess[str]:
    env = {"CONFDATA": os.fspath(confdata), "VARIANT": variant}
    if guest is not None:
        env["TARGET"] = os.fspath(guest)
    return run_hook(FILES, **env)


def put(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_files_inert_without_config(confdata: Path, guest: Path) -> None:
    before = sorted(p.relative_to(guest) for p in guest.rglob("*"))
    proc = install(confdata, guest)
    assert proc.returncode == 0 and proc.stdout == ""
    assert sorted(p.relative_to(guest) for p in guest.rglob("*")) == before


def test_files_common_then_variant(confdata: Path, guest: Path) -> None:
    files = confdata / "files"
    put(files / "common" / "etc" / "motd", "site motd\n")
    put(files / "common" / "etc" / "issue.d" / "site.issue", "common\n")
    put(files / "common" / "usr" / "local" / "bin" / "tool", "#!/bin/sh\n", 0o750)
    put(files / "debian-12" / "etc" / "issue.d" / "site.issue", "debian\n")
    put(files / "ubuntu-24.04" / "etc" / "ubuntu-only", "no\n")
    (files / "common" / "etc" / "link").symlink_to("/etc/motd")
    proc = install(confdata, guest)
    assert proc.returncode == 0, proc.stderr
    assert (guest / "etc" / "motd").read_text() == "site motd\n"
    assert (guest / "etc" / "issue.d" / "site.issue").read_text() == "debian\n"
    assert (guest / "usr" / "local" / "bin" / "tool").stat().st_mode & 0o777 == 0o750
    assert os.readlink(guest / "etc" / "link") == "/etc/motd"  # copied as a link, never followed
    assert not (guest / "etc" / "ubuntu-only").exists()
    assert "installed 4 files" in proc.stdout and "installed 1 files" in proc.stdout
    assert not list(guest.rglob(".*cloudimage-*"))


def test_files_follow_guest_symlinks_inside_the_guest(confdata: Path, guest: Path) -> None:
    put(confdata / "files" / "common" / "bin" / "hello", "hi\n", 0o755)
    assert install(confdata, guest).returncode == 0
    assert (guest / "usr" / "bin" / "hello").read_text() == "hi\n"
    assert (guest / "bin").is_symlink()


def test_files_never_escape_the_guest(confdata: Path, guest: Path, tmp_path: Path) -> None:
    host = tmp_path / "host-etc"
    host.mkdir()
    (host / "shadow").write_text("host secret\n")
    # An image's absolute and relative symlinks pointing out of the guest.
    (guest / "etc" / "cron.d").symlink_to(host)  # absolute: /<tmp>/host-etc
    (guest / "etc" / "up").symlink_to("../../../../../../../..")
    (guest / "etc" / "motd").unlink()
    (guest / "etc" / "motd").symlink_to(host / "shadow")
    files = confdata / "files" / "common"
    put(files / "etc" / "cron.d" / "job", "job\n")
    put(files / "etc" / "up" / "etc" / "escaped", "escaped\n")
    put(files / "etc" / "motd", "motd\n")
    proc = install(confdata, guest)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in host.iterdir()) == ["shadow"]
    assert (host / "shadow").read_text() == "host secret\n"
    # The absolute link was resolved with the guest as /, the relative one stopped at the guest's /.
    assert (guest / os.fspath(host).lstrip("/") / "job").read_text() == "job\n"
    assert (guest / "etc" / "escaped").read_text() == "escaped\n"
    assert not (guest / "etc" / "motd").is_symlink() and (guest / "etc" / "motd").read_text() == "motd\n"


def test_files_symlink_loop_is_an_error(confdata: Path, guest: Path) -> None:
    (guest / "etc" / "loop").symlink_to("loop")
    put(confdata / "files" / "common" / "etc" / "loop" / "x", "x\n")
    proc = install(confdata, guest)
    assert proc.returncode == 1 and "too many levels of symlinks" in proc.stderr


def test_files_existing_directories_keep_their_mode(confdata: Path, guest: Path) -> None:
    put(confdata / "files" / "common" / "root" / ".ssh" / "authorized_keys", "ssh-ed25519 AAAA site\n", 0o600)
    (confdata / "files" / "common" / "root").chmod(0o755)
    (confdata / "files" / "common" / "root" / ".ssh").chmod(0o700)
    assert install(confdata, guest).returncode == 0
    assert (guest / "root").stat().st_mode & 0o777 == 0o700
    assert (guest / "root" / ".ssh").stat().st_mode & 0o777 == 0o700
    assert (guest / "root" / ".ssh" / "authorized_keys").stat().st_mode & 0o777 == 0o600


def test_files_directory_in_the_way_is_an_error(confdata: Path, guest: Path) -> None:
    put(confdata / "files" / "common" / "etc" / "ssh", "not a dir\n")
    proc = install(confdata, guest)
    assert proc.returncode == 1 and "the guest has a directory there" in proc.stderr


def test_files_need_a_target_when_configured(confdata: Path) -> None:
    put(confdata / "files" / "common" / "etc" / "motd", "x\n")
    proc = install(confdata, None)
    assert proc.returncode == 1 and "TARGET is not set" in proc.stderr


@pytest.mark.integration
@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_files_keep_numeric_owner(confdata: Path, guest: Path) -> None:
    f = put(confdata / "files" / "common" / "home" / "app" / "config", "x\n", 0o640)
    os.chown(f, 1234, 4321)
    os.chown(f.parent, 1234, 1234)
    assert install(confdata, guest).returncode == 0
    st = (guest / "home" / "app" / "config").stat()
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert (guest / "home" / "app").stat().st_uid == 1234
    assert (guest / "home").stat().st_uid == 0


# --- 60-serial-console -------------------------------------------------------------------------------

DEBIAN_GRUB_CFG = """\
menuentry 'Debian GNU/Linux' --class debian {
\tload_video
\tlinux\t/boot/vmlinuz-6.1.0-18-cloud-amd64 root=PARTUUID=abc ro quiet
\tinitrd\t/boot/initrd.img-6.1.0-18-cloud-amd64
}
submenu 'Advanced options' {
\tmenuentry 'Debian, recovery' {
\t\tlinux\t/boot/vmlinuz-6.1.0-18-cloud-amd64 root=PARTUUID=abc ro single
\t}
}
"""


def console(confdata: Path, guest: Path | None, setting: str | None = "") -> subprocess.CompletedProcess[str]:
    if setting is not None:
        (confdata / "serial-console").write_text(setting)
    env = {"CONFDATA": os.fspath(confdata)}
    if guest is not None:
        env["TARGET"] = os.fspath(guest)
    return run_hook(CONSOLE, **env)


@pytest.fixture
def debian(tmp_path: Path) -> Path:
    g = tmp_path / "debian"
    put(g / "etc" / "default" / "grub", 'GRUB_DEFAULT=0\nGRUB_TIMEOUT=1\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
                                        'GRUB_CMDLINE_LINUX=""\n')
    put(g / "boot" / "grub" / "grub.cfg", DEBIAN_GRUB_CFG, 0o444)
    return g


@pytest.fixture
def fedora(tmp_path: Path) -> Path:
    g = tmp_path / "fedora"
    put(g / "etc" / "default" / "grub", "GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX='no_timer_check net.ifnames=0'\n")
    put(g / "etc" / "kernel" / "cmdline", "root=UUID=abc ro console=tty1\n")
    entries = g / "boot" / "loader" / "entries"
    put(entries / "abc-6.5.6.conf", "title Fedora\nversion 6.5.6\nlinux /vmlinuz-6.5.6\n"
                                    "options root=UUID=abc ro rootflags=subvol=root\ngrub_users $grub_users\n")
    put(entries / "abc-0-rescue.conf", "title Fedora rescue\noptions root=UUID=abc ro\n")
    put(entries / "notes.txt", "options untouched\n")
    return g


def test_console_inert_without_config(confdata: Path, debian: Path) -> None:
    before = (debian / "boot" / "grub" / "grub.cfg").read_text()
    proc = console(confdata, debian, setting=None)
    assert proc.returncode == 0 and proc.stdout == ""
    assert (debian / "boot" / "grub" / "grub.cfg").read_text() == before


def test_console_debian_tree(confdata: Path, debian: Path) -> None:
    proc = console(confdata, debian)
    assert proc.returncode == 0, proc.stderr
    grub = (debian / "etc" / "default" / "grub").read_text()
    assert 'GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"\n' in grub
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"' in grub
    cfg = (debian / "boot" / "grub" / "grub.cfg").read_text()
    assert ("\tlinux\t/boot/vmlinuz-6.1.0-18-cloud-amd64 root=PARTUUID=abc ro quiet "
            "console=tty0 console=ttyS0,115200\n") in cfg
    assert "ro single console=tty0 console=ttyS0,115200\n" in cfg
    assert "\tinitrd\t/boot/initrd.img-6.1.0-18-cloud-amd64\n" in cfg
    assert (debian / "boot" / "grub" / "grub.cfg").stat().st_mode & 0o777 == 0o444  # mode kept
    # Idempotent: a second run changes nothing.
    again = console(confdata, debian)
    assert again.returncode == 0 and "no kernel command line changed" in again.stdout
    assert (debian / "boot" / "grub" / "grub.cfg").read_text() == cfg


def test_console_fedora_tree_with_custom_console(confdata: Path, fedora: Path) -> None:
    proc = console(confdata, fedora, "# speed for our hosts\nttyS1,9600n8\n")
    assert proc.returncode == 0, proc.stderr
    assert "GRUB_CMDLINE_LINUX='no_timer_check net.ifnames=0 console=tty0 console=ttyS1,9600n8'" in \
        (fedora / "etc" / "default" / "grub").read_text()
    # console=tty1 is already there, so no console=tty0 is added in front.
    assert (fedora / "etc" / "kernel" / "cmdline").read_text() == "root=UUID=abc ro console=tty1 console=ttyS1,9600n8\n"
    entries = fedora / "boot" / "loader" / "entries"
    assert "options root=UUID=abc ro rootflags=subvol=root console=tty0 console=ttyS1,9600n8\n" in \
        (entries / "abc-6.5.6.conf").read_text()
    assert "grub_users $grub_users\n" in (entries / "abc-6.5.6.conf").read_text()
    assert (entries / "abc-0-rescue.conf").read_text().endswith(
        "options root=UUID=abc ro console=tty0 console=ttyS1,9600n8\n")
    assert (entries / "notes.txt").read_text() == "options untouched\n"


def test_console_already_present_is_left_alone(confdata: Path, tmp_path: Path) -> None:
    g = tmp_path / "g"
    put(g / "etc" / "kernel" / "cmdline", "root=/dev/vda1 console=ttyS0,38400\n")
    proc = console(confdata, g)
    assert proc.returncode == 0
    assert (g / "etc" / "kernel" / "cmdline").read_text() == "root=/dev/vda1 console=ttyS0,38400\n"


def test_console_adds_the_setting_when_grub_has_none(confdata: Path, tmp_path: Path) -> None:
    g = tmp_path / "g"
    put(g / "etc" / "default" / "grub", "GRUB_TIMEOUT=1")
    assert console(confdata, g).returncode == 0
    assert (g / "etc" / "default" / "grub").read_text() == \
        'GRUB_TIMEOUT=1\nGRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"\n'


def test_console_does_not_follow_guest_symlinks(confdata: Path, tmp_path: Path) -> None:
    host = tmp_path / "host-file"
    host.write_text('GRUB_CMDLINE_LINUX=""\n')
    g = tmp_path / "g"
    (g / "etc" / "default").mkdir(parents=True)
    (g / "etc" / "default" / "grub").symlink_to(host)
    (g / "boot").symlink_to(tmp_path)  # a directory link out of the guest
    (tmp_path / "grub").mkdir()
    put(tmp_path / "grub" / "grub.cfg", DEBIAN_GRUB_CFG)
    proc = console(confdata, g)
    assert proc.returncode == 0, proc.stderr
    assert host.read_text() == 'GRUB_CMDLINE_LINUX=""\n'
    assert (tmp_path / "grub" / "grub.cfg").read_text() == DEBIAN_GRUB_CFG
    assert "is not a regular file" in proc.stdout


@pytest.mark.parametrize("bad", ["ttyS0;reboot", "/dev/ttyS0", "ttyS0,fast", "console=ttyS0"])
def test_console_bad_setting_fails(confdata: Path, debian: Path, bad: str) -> None:
    proc = console(confdata, debian, bad)
    assert proc.returncode == 1 and "is not a console" in proc.stderr


def test_console_needs_a_target_when_configured(confdata: Path) -> None:
    proc = console(confdata, None)
    assert proc.returncode == 1 and "TARGET is not set" in proc.stderr


# --- linting the hooks -------------------------------------------------------------------------------

def shipped_hooks() -> list[Path]:
    return sorted(p for p in HOOKS.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and "__pycache__" not in p.parts)


def test_every_shipped_hook_is_executable_with_a_known_interpreter() -> None:
    hooks = shipped_hooks()
    assert hooks
    for hook in hooks:
        assert os.access(hook, os.X_OK), hook
        assert hook.read_text().split("\n", 1)[0] in ("#!/bin/sh", "#!/usr/bin/python3"), hook


def test_shell_hooks_pass_shellcheck() -> None:
    import shutil

    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck is not installed (CI installs it from .ci/packages.txt)")
    shell = [h for h in shipped_hooks() if h.read_text().startswith("#!/bin/sh")]
    proc = subprocess.run([tool, "--shell=sh", *shell], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_python_hooks_pass_ruff() -> None:
    import shutil
    import sys

    tool = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.exists(tool):
        pytest.skip("ruff is not installed")
    python = [h for h in shipped_hooks() if h.read_text().startswith("#!/usr/bin/python3")]
    proc = subprocess.run([tool, "check", *python], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout
