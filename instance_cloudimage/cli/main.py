"""The ``instance-cloudimage`` console command: a local create, install, cache and variants.

It runs under the OS scripts' top-level handler (scripts/main.py), so its errors read the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

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
from instance_cloudimage.runtime.errors import ParameterError
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
from instance_cloudimage.sources.fetch import fetch_image, resolve_image
from instance_cloudimage.verbs.create import run_create

log = logging.getLogger("instance_cloudimage")

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


def create_disk_file(disk: Path, size_text: str) -> None:
    """A sparse disk file of ``size_text`` bytes for a local create.  Raises ParameterError."""
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
    except OverflowError:
        raise ParameterError("--disk-size is too large") from None
    except FileExistsError:  # from mkdir: a file where a parent directory should be
        raise ParameterError(f"cannot create the disk file {disk}: a parent is not a directory") from None
    except OSError as e:
        raise ParameterError(f"cannot create the disk file {disk}: {e.strerror}") from None


def local_environment(args: argparse.Namespace, params: dict[str, str]) -> dict[str, str]:
    """What Ganeti would give a create onto ``--disk`` (a file is created if missing)."""
    disk = Path(args.disk).absolute()
    if not disk.exists():
        create_disk_file(disk, args.disk_size)
    is_block = stat.S_ISBLK(disk.stat().st_mode)
    target = SimulatedDisk(disk, backend_type="block" if is_block else "file:loop",
                           size_mib=target_size(os.fspath(disk)) // (1024 * 1024))
    return simulated_environment(args.variant, [target], instance_name=args.instance_name,
                                 params=params, debug=args.debug)


def cmd_create(args: argparse.Namespace) -> None:
    params = parse_option_pairs(args.os_param)
    hide_values(values_to_hide(params))
    paths = Paths(Path(args.config_dir), Path(args.cache_dir))
    genv = parse_environment(local_environment(args, params), Script.CREATE)
    run_create(genv, load_site_config(paths))


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
    for name in list_variants(paths):
        v = load_variant(name, paths)
        print(f"{name:24} {v.agent:10} {v.description}")


def cmd_cache(args: argparse.Namespace) -> None:
    """``cache list|prune|fetch``: what administrators run on each node (gnt-cluster command)."""
    paths = Paths(Path(args.config_dir), Path(args.cache_dir))
    site = load_site_config(paths)
    cache = make_cache(site)
    if args.action == "list":
        entries = cache.list_entries()
        for e in entries:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            state = "in use" if e.in_use else "idle"
            print(f"sha256:{e.sha256[:16]}  {format_size(e.size):>10}  {used}  {state:6}  "
                  f"{'; '.join(e.sources) or 'no source recorded'}")
        total = sum(e.size for e in entries)
        print(f"{len(entries)} images, {format_size(total)} of {format_size(cache.max_size)} ([Cache] MaxSize)")
    elif args.action == "prune":
        removed, freed = cache.prune(everything=args.all)
        print(f"removed {removed} images, freed {format_size(freed)}")
    else:
        if not args.variant:
            raise ParameterError("cache fetch needs a variant name")
        variant = load_variant(args.variant, paths)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instance-cloudimage",
                                     description="Ganeti OS provider for distribution cloud images")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="run the create pipeline onto a local disk file or device")
    p.add_argument("--disk", required=True, help="target disk: a file (created if missing) or block device")
    p.add_argument("--disk-size", default="1G", help="size of a new disk file (default: %(default)s)")
    p.add_argument("--variant", default="demo", help="variant name (default: %(default)s)")
    p.add_argument("-O", "--os-param", action="append", default=[], metavar="NAME=VALUE",
                   help=OPTION_HELP)
    p.add_argument("--instance-name", default="demo.example.org", help="instance name (default: %(default)s)")
    add_site_options(p)
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("install", help="install the Ganeti OS definition on this node")
    p.add_argument("--os-dir", default=os.fspath(DEFAULT_OS_DIR),
                   help="OS definition directory; its name is the OS name (default: %(default)s)")
    add_site_options(p)
    p.add_argument("--destdir", help="write below this staging directory, for a package build")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("cache", help="list, prune or prefetch the image cache",
                       description="list: cached images; prune: evict to [Cache] MaxSize (--all: every "
                                   "image not in use); fetch VARIANT: download and verify a variant's image "
                                   "now (run it on every node with gnt-cluster command before a rollout)")
    p.add_argument("action", choices=("list", "prune", "fetch"))
    p.add_argument("variant", nargs="?", help="the variant to fetch")
    p.add_argument("--arch", help="machine architecture for fetch (default: this node's; 'all': every one)")
    p.add_argument("--all", action="store_true", help="prune: remove every image not in use")
    add_site_options(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("variants", help="list the variants and their agents")
    add_site_options(p)
    p.set_defaults(func=cmd_variants)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return guarded("instance-cloudimage", 1 if args.debug else 0, lambda: args.func(args))
