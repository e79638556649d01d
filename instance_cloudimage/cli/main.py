"""The ``instance-cloudimage`` console command: a local create, install, cache and variants.

It runs under the OS scripts' top-level handler (scripts/main.py), so its errors read the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
import textwrap
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, cast

from instance_cloudimage import __version__
from instance_cloudimage.cli.install import DEFAULT_OS_DIR, install_os, remove_old_worker, warn_if_shadowing
from instance_cloudimage.disk.convert import target_size
from instance_cloudimage.ganeti.env import (
    Script,
    parse_environment,
)
from instance_cloudimage.ganeti.simulate import SimulatedDisk, simulated_environment
from instance_cloudimage.ganeti.variants import host_architecture, list_variants, load_variant
from instance_cloudimage.params.table import PARAMETERS, values_to_hide
from instance_cloudimage.runtime.errors import DiskTooSmall, ParameterError
from instance_cloudimage.runtime.log import format_size, hide_values
from instance_cloudimage.runtime.settings import parse_size
from instance_cloudimage.runtime.siteconfig import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CONFIG_DIR,
    Paths,
    load_site_config,
)
from instance_cloudimage.scripts.main import guarded
from instance_cloudimage.sources.cache import make_cache
from instance_cloudimage.sources.cacheentry import export_entry, find_entry, import_entry
from instance_cloudimage.sources.fetch import fetch_image, resolve_image
from instance_cloudimage.verbs.create import run_create

log = logging.getLogger("instance_cloudimage")

MiB = 1024 * 1024

SECRET_NAMES = ", ".join(p.name for p in PARAMETERS if p.secret)
OPTION_HELP = ("an OS parameter, as gnt-instance add -O would pass it; NAME=@FILE reads the value from "
               "FILE (one final newline dropped), NAME=@- from stdin, NAME=@@... is a value starting with @; "
               f"give the secret ones ({SECRET_NAMES}) that way: a command line is visible to every user in ps")


def read_option_file(name: str, path: str, stdin_used: bool) -> str:
    """The value of ``-O name=@path`` (``-`` is stdin), one final newline dropped.  Raises ParameterError.

    Security: messages name the parameter and the file, never what the file holds.
    """
    if not path:
        raise ParameterError(f"-O {name}=@ needs a file name (write {name}=@@... for a value starting with @)")
    where = "stdin" if path == "-" else path
    if path == "-" and stdin_used:
        raise ParameterError(f"-O {name}=@-: stdin was already read for another parameter")
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ParameterError(f"cannot read the value of -O {name} from {where}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParameterError(f"the value of -O {name} in {where} is not UTF-8 text") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def parse_option_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``-O`` arguments as parameters: NAME=VALUE, NAME=@FILE, NAME=@- (stdin), NAME=@@... (a literal @...).

    Warns (naming the parameter only) when a secret parameter is given inline.
    """
    secret = {p.name for p in PARAMETERS if p.secret}
    out = {}
    stdin_used = False
    for number, item in enumerate(pairs, 1):
        name, sep, value = item.partition("=")
        # Security: never echo the argument; without '=' it may be the value itself.
        if not sep:
            raise ParameterError(f"-O expects name=value; argument {number} has no '='")
        name = name.strip()
        if not name:
            raise ParameterError(f"-O expects name=value; argument {number} has no name")
        if value.startswith("@@"):
            value = value[1:]
        elif value.startswith("@"):
            out[name] = read_option_file(name, value[1:], stdin_used)
            stdin_used = stdin_used or value == "@-"
            continue
        if name in secret:
            log.warning("warning: -O %s is secret, and a command line is visible to every user in ps; "
                        "use -O %s=@FILE or %s=@- (stdin)", name, name, name)
        out[name] = value
    return out


def create_disk_file(disk: Path, size_text: str) -> tuple[int, int]:
    """A sparse disk file of ``size_text`` bytes for a local create; returns its device and inode
    (see remove_disk_file).  Raises ParameterError."""
    try:
        size = parse_size(size_text)
    except ValueError:
        raise ParameterError("--disk-size must be a size such as 10G or 512M") from None
    try:
        disk.parent.mkdir(parents=True, exist_ok=True)
        with open(disk, "xb") as f:
            try:
                f.truncate(size)
            except BaseException:
                disk.unlink(missing_ok=True)
                raise
            st = os.fstat(f.fileno())
            return st.st_dev, st.st_ino
    except OverflowError:
        raise ParameterError("--disk-size is too large") from None
    except FileExistsError:  # from mkdir: a file where a parent directory should be
        raise ParameterError(f"cannot create the disk file {disk}: a parent is not a directory") from None
    except OSError as e:
        raise ParameterError(f"cannot create the disk file {disk}: {e.strerror}") from None


def remove_disk_file(disk: Path, made: tuple[int, int]) -> None:
    """Remove the disk file this command made, after a failed create: a half-made disk is of no
    use, and a new try with a larger --disk-size would otherwise reuse its size.  Only the very
    file it made (same device and inode), never a file or device put there since."""
    with suppress(OSError):
        st = disk.lstat()
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == made:
            disk.unlink()
            log.debug("removed %s: this create made it and failed", disk)


def disk_size_hint(needed: int | None, made: bool) -> str:
    """What to do about a disk too small for the image, in the local command's terms."""
    at_least = ""
    if needed:
        mib = -(-needed // MiB)
        at_least = f" of at least {-(-mib // 1024)}G" if mib > 1024 else f" of at least {mib}M"
    if made:
        return f"give a larger --disk-size{at_least}"
    return f"give --disk a larger file or device{at_least}, or a new file name and --disk-size"


def local_environment(args: argparse.Namespace, params: dict[str, str], disk: Path) -> dict[str, str]:
    """What Ganeti would give a create onto ``disk``, the absolute ``--disk`` (which exists by now)."""
    is_block = stat.S_ISBLK(disk.stat().st_mode)
    target = SimulatedDisk(disk, backend_type="block" if is_block else "file:loop",
                           size_mib=target_size(os.fspath(disk)) // MiB)
    return simulated_environment(args.variant, [target], instance_name=args.instance_name,
                                 params=params, debug=args.debug)


def cmd_create(args: argparse.Namespace) -> None:
    params = parse_option_pairs(args.os_param)
    hide_values(values_to_hide(params))
    paths = Paths(Path(args.config_dir), Path(args.cache_dir))
    disk = Path(args.disk).absolute()
    made = None if disk.exists() else create_disk_file(disk, args.disk_size)
    try:
        genv = parse_environment(local_environment(args, params, disk), Script.CREATE)
        run_create(genv, load_site_config(paths))
    except BaseException as e:
        if made is not None:
            remove_disk_file(disk, made)
        if isinstance(e, DiskTooSmall):
            raise DiskTooSmall(e.message, disk_size_hint(e.needed, made is not None), needed=e.needed) from e
        raise


def cmd_install(args: argparse.Namespace) -> None:
    paths = Paths(Path(args.config_dir), Path(args.cache_dir))
    destdir = Path(args.destdir) if args.destdir else None
    variants = install_os(Path(args.os_dir), paths, destdir=destdir)
    log.info("installed OS %s in %s offering %d variants (%s): %s", Path(args.os_dir).name, args.os_dir,
             len(variants), paths.variants_list, " ".join(variants))
    if destdir is None:
        warn_if_shadowing(Path(args.os_dir))
        remove_old_worker()


def cmd_variants(args: argparse.Namespace) -> None:
    paths = Paths(Path(args.config_dir), Path(args.cache_dir))
    variants = [load_variant(name, paths) for name in list_variants(paths)]
    if args.json:
        # The keys are documented in docs/configuration.md ("Variants"): add, never rename.
        print_json([{"name": v.name, "description": v.description, "agent": v.agent, "seed": v.seed,
                     "architectures": list(v.architectures)} for v in variants])
        return
    for v in variants:
        print(f"{v.name:24} {v.agent:10} {v.description}")


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def utc_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def cmd_cache(args: argparse.Namespace) -> None:
    """``cache list|prune|fetch|export|import``: what administrators run on each node (gnt-cluster command)."""
    paths = Paths(Path(args.config_dir), Path(args.cache_dir))
    site = load_site_config(paths)
    cache = make_cache(site)
    if args.action == "list":
        entries = cache.list_entries()
        if args.json:
            # The keys are documented in docs/images.md ("The cache"): add, never rename.
            print_json({"images": [{"sha256": e.sha256, "size": e.size, "last_used": utc_time(e.last_used),
                                    "in_use": e.in_use, "sources": list(e.sources)} for e in entries],
                        "total_size": sum(e.size for e in entries), "max_size": cache.max_size})
            return
        for e in entries:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            state = "in use" if e.in_use else "idle"
            print(f"sha256:{e.sha256[:16]}  {format_size(e.size):>10}  {used}  {state:6}  "
                  f"{'; '.join(e.sources) or 'no source recorded'}")
        total = sum(e.size for e in entries)
        print(f"{len(entries)} images, {format_size(total)} of {format_size(cache.max_size)} ([Cache] MaxSize)")
    elif args.json:
        raise ParameterError("--json is for 'cache list' only")
    elif args.action == "prune":
        removed, freed = cache.prune(everything=args.all)
        print(f"removed {removed} images, freed {format_size(freed)}")
    elif args.action == "export":
        if len(args.operands) != 2:
            raise ParameterError("cache export needs a digest and a file name", "e.g. cache export sha256:HEX FILE")
        manifest = export_entry(cache, find_entry(cache, args.operands[0]), Path(args.operands[1]))
        print(f"exported sha256:{manifest.sha256} {format_size(manifest.size)} to {args.operands[1]}")
    elif args.action == "import":
        if len(args.operands) != 1:
            raise ParameterError("cache import needs one file name")
        manifest, new = import_entry(cache, Path(args.operands[0]), int(site.get("max_download_size")))
        print(f"{'imported' if new else 'already cached:'} sha256:{manifest.sha256} {format_size(manifest.size)}")
    else:
        if len(args.operands) != 1:
            raise ParameterError("cache fetch needs a variant name")
        variant = load_variant(args.operands[0], paths)
        arches = variant.architectures if args.arch == "all" else (args.arch or host_architecture(),)
        for arch in arches:
            ref = resolve_image(variant, {}, arch)
            with ExitStack() as stack:
                fetched = fetch_image(ref, site, stack)
                print(f"{variant.name} {arch} {fetched.digest} {format_size(fetched.size)}")


def add_site_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-dir", default=os.fspath(DEFAULT_CONFIG_DIR),
                   help="site configuration directory (default: %(default)s)")
    p.add_argument("--cache-dir", default=os.fspath(DEFAULT_CACHE_DIR),
                   help="image cache directory (default: %(default)s)")


def add_subcommand(sub: Any, name: str, summary: str, description: str, examples: str,
                   debug: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A subcommand whose --help (and the man page built from it) says what it does, with examples."""
    return cast(argparse.ArgumentParser, sub.add_parser(
        name, help=summary, description=textwrap.fill(description, 79), epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instance-cloudimage",
        description=textwrap.fill("Ganeti OS provider for distribution cloud images: install the OS definition "
                                  "on a node, manage its image cache, list its variants, or run a create onto "
                                  "a local disk.", 79),
        epilog="examples:\n  instance-cloudimage variants\n"
               "  sudo instance-cloudimage create --disk /tmp/demo/disk.img --variant demo\n"
               "  instance-cloudimage cache list --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    # Also accepted after the subcommand; SUPPRESS keeps a --debug given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_subcommand(
        sub, "create", "run the create pipeline onto a local disk file or device",
        "Run what Ganeti's create script runs, with a simulated Ganeti environment, onto a local "
        "disk: fetch and verify the variant's image, write it, and seed the guest agent. A disk "
        "file that does not exist is made (sparse, --disk-size) and removed again if the create "
        "fails. Seeding into the guest's filesystem, grow_root and post-write hooks mount the guest "
        "and need root; with seed=none, onto a file and with a cache directory of your own, a "
        "create runs unprivileged.",
        "  sudo instance-cloudimage create --disk /tmp/demo/disk.img --variant demo\n"
        "  instance-cloudimage create --disk ~/vm.img --disk-size 4G --variant debian-12 \\\n"
        "      -O seed=none --cache-dir ~/.cache/instance-cloudimage\n"
        "  sudo instance-cloudimage create --disk /dev/vg0/vm1 --variant ubuntu-24.04 \\\n"
        "      -O ssh_authorized_keys=@$HOME/.ssh/id_ed25519.pub -O password_hash=@hash.txt", debug)
    p.add_argument("--disk", required=True, help="target disk: a file (created if missing) or block device")
    p.add_argument("--disk-size", default="1G", help="size of a new disk file (default: %(default)s)")
    p.add_argument("--variant", default="demo", help="variant name (default: %(default)s)")
    p.add_argument("-O", "--os-param", action="append", default=[], metavar="NAME=VALUE",
                   help=OPTION_HELP)
    p.add_argument("--instance-name", default="demo.example.org", help="instance name (default: %(default)s)")
    add_site_options(p)
    p.set_defaults(func=cmd_create)

    p = add_subcommand(
        sub, "install", "install the Ganeti OS definition on this node",
        "Write the Ganeti OS definition (the scripts, parameters.list, the directories baked in, "
        "and variants.list, a link to <config-dir>/variants.list, written once) into --os-dir, "
        "whose name is the OS name. Run it on every node.",
        "  instance-cloudimage install\n"
        "  instance-cloudimage install --os-dir /srv/ganeti/os/cloudimage --cache-dir /srv/cache/cloudimage\n"
        "  gnt-cluster command /opt/instance-cloudimage/bin/instance-cloudimage install", debug)
    p.add_argument("--os-dir", default=os.fspath(DEFAULT_OS_DIR),
                   help="OS definition directory; its name is the OS name (default: %(default)s)")
    add_site_options(p)
    p.add_argument("--destdir", help="write below this staging directory, for a package build")
    p.set_defaults(func=cmd_install)

    p = add_subcommand(
        sub, "cache", "list, prune, prefetch, export or import the image cache",
        "list: the cached images (--json: for scripts); prune: evict to [Cache] MaxSize (--all: "
        "every image not in use); fetch VARIANT: download and verify a variant's image now; "
        "export DIGEST FILE: write one cached image, with its digests, to FILE; import FILE: "
        "verify such a file and add its image to this node's cache (one download per cluster: "
        "fetch and export on the master, gnt-cluster copyfile, import with gnt-cluster command).",
        "  instance-cloudimage cache list\n"
        "  gnt-cluster command 'instance-cloudimage cache list --json'\n"
        "  instance-cloudimage cache fetch debian-12 --arch all\n"
        "  instance-cloudimage cache export sha256:9c1a0e5b2f7d FILE\n"
        "  gnt-cluster command 'instance-cloudimage cache import FILE'\n"
        "  instance-cloudimage cache prune --all", debug)
    p.add_argument("action", choices=("list", "prune", "fetch", "export", "import"))
    p.add_argument("operands", nargs="*", metavar="ARG", help="fetch: VARIANT; export: DIGEST FILE; import: FILE")
    p.add_argument("--arch", help="machine architecture for fetch (default: this node's; 'all': every one)")
    p.add_argument("--all", action="store_true", help="prune: remove every image not in use")
    p.add_argument("--json", action="store_true", help="list: print JSON (keys: docs/images.md)")
    add_site_options(p)
    p.set_defaults(func=cmd_cache)

    p = add_subcommand(
        sub, "variants", "list the variants and their agents",
        "List the variants this node has (shipped and the site's), with the guest agent and the "
        "description of each.",
        "  instance-cloudimage variants\n"
        "  gnt-cluster command 'instance-cloudimage variants --json'", debug)
    p.add_argument("--json", action="store_true", help="print JSON (keys: docs/configuration.md)")
    add_site_options(p)
    p.set_defaults(func=cmd_variants)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return guarded("instance-cloudimage", 1 if args.debug else 0, lambda: args.func(args))
