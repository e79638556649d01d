"""Entry points: the Ganeti OS scripts and the ``instance-cloudimage`` command.

One top-level handler turns a UserError into one line on stderr and a non-zero exit, and keeps
tracebacks for bugs (or for everything when DEBUG_LEVEL > 0).  SIGTERM raises, so the ExitStack
of a running create still unmounts and detaches what it set up.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from instance_cloudimage import __version__
from instance_cloudimage.sources.cache import make_cache
from instance_cloudimage.runtime.siteconfig import DEFAULT_CACHE_DIR, DEFAULT_CONFIG_DIR, Paths, SiteConfig, load_site_config
from instance_cloudimage.disk.convert import target_size
from instance_cloudimage.verbs.create import run_create
from instance_cloudimage.ganeti.env import OS_NAME_RE, GanetiEnv, Script, debug_level_of, parse_environment, parse_os_params
from instance_cloudimage.runtime.errors import CloudImageError, CommandError, ConfigError, ParameterError, UserError
from instance_cloudimage.cli.install import install_os, installed_paths, remove_old_worker
from instance_cloudimage.runtime.log import format_size, hide_values, printable, setup_logging
from instance_cloudimage.params.table import validate_parameters, values_to_hide
from instance_cloudimage.runtime.settings import parse_size
from instance_cloudimage.sources.fetch import fetch_image, resolve_image
from instance_cloudimage.disk.uri import uri_secrets
from instance_cloudimage.ganeti.variants import host_architecture, list_variants, load_variant

# seeddata, lifecycle and reseed are imported where used: they bring PyYAML, which a create
# without a seed never needs.

log = logging.getLogger("instance_cloudimage")

EXIT_BUG = 3
EXIT_INTERRUPTED = 130


class Terminated(BaseException):
    """Raised from the SIGTERM handler so that cleanup runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def print_traceback() -> None:
    """The current exception's traceback on stderr, scrubbed like every log line (log.redact)."""
    sys.stderr.write(printable(traceback.format_exc()))


def guarded(prog: str, debug_level: int, fn: Callable[[], None]) -> int:
    """Run ``fn`` under the top-level error policy; return the exit code."""
    setup_logging(prog, debug_level)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        fn()
        return 0
    except (UserError, CommandError) as e:
        if debug_level > 0:
            print_traceback()
        log.error("error: %s", e)
        return e.exit_code
    except CloudImageError as e:
        print_traceback()
        log.error("error: %s", e)
        return e.exit_code
    except (KeyboardInterrupt, Terminated):
        log.error("error: interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: keep the traceback
        print_traceback()
        log.error("internal error: %s: %s (please report this)", type(e).__name__, e)
        return EXIT_BUG


# --- the OS scripts ----------------------------------------------------------------------------

def run_verify(genv: GanetiEnv, paths: Paths, argv: Sequence[str]) -> None:
    if argv and argv[0] != "parameters":
        raise ParameterError(f"verify: unknown check '{argv[0]}' (Ganeti passes 'parameters')")
    site = load_site_config(paths)
    problems = validate_parameters(genv.params, site)
    try:
        variant = load_variant(genv.variant, paths)
    except UserError as e:
        problems.append(str(e))
    else:
        if not problems:
            from instance_cloudimage.seed.content import check_variant_parameters

            problems.extend(check_variant_parameters(genv.params, variant))
        arch = genv.params.get("arch")
        if not problems and arch and not genv.params.get("image"):
            try:
                variant.image_for(arch)
            except UserError as e:
                problems.append(str(e))
    if problems:
        for p in problems[:-1]:
            log.error("%s", p)
        raise ParameterError(problems[-1])


def dispatch(script: Script, genv: GanetiEnv, paths: Paths, argv: Sequence[str]) -> None:
    if script is Script.VERIFY:
        run_verify(genv, paths, argv)
        return
    if script is Script.CREATE:
        run_create(genv, load_site_config(paths))
        return
    from instance_cloudimage.verbs import transfer as lifecycle

    try:
        site = load_site_config(paths)
    except ConfigError as e:
        if script is not Script.RENAME:
            raise
        log.warning("%s; renaming with the default settings", e)  # rename never fails for this
        site = SiteConfig(paths=paths)
    if script is Script.EXPORT:
        lifecycle.run_export(genv, site)
    elif script is Script.IMPORT:
        from instance_cloudimage.seed.reseed import reseed_imported_disk

        # Only once the disk's data is complete, and before a URI-only disk's staging file is
        # copied out, so the new seed reaches that disk too.
        lifecycle.run_import(genv, site, after_write=lambda path: reseed_imported_disk(genv, site, path))
    elif script is Script.RENAME:
        lifecycle.run_rename(genv, site)


def os_script_main(verb: str, environ: Mapping[str, str] | None = None,
                   argv: Sequence[str] | None = None) -> int:
    """What scripts/<verb> calls: parse the Ganeti environment once, then dispatch."""
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    script = Script(verb)
    # Every log line starts with this: a malformed OS_NAME (env.py refuses it) must not garble them.
    name = environ.get("OS_NAME", "")
    prog = f"{name if OS_NAME_RE.match(name) else 'cloudimage'} {verb}"

    def body() -> None:
        hide_values(values_to_hide(parse_os_params(environ)))
        paths = installed_paths(argv[0]) if argv else Paths()
        genv = parse_environment(environ, script)
        hide_values(s for uri in genv.uris() for s in uri_secrets(uri))
        dispatch(script, genv, paths, argv[1:])

    return guarded(prog, debug_level_of(environ), body)


# --- the instance-cloudimage command -----------------------------------------------------------

def parse_option_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for number, item in enumerate(pairs, 1):
        name, sep, value = item.partition("=")
        # Security: never echo the argument; without '=' it may be the value itself.
        if not sep:
            raise ParameterError(f"-O expects name=value; argument {number} has no '='")
        if not name.strip():
            raise ParameterError(f"-O expects name=value; argument {number} has no name")
        out[name.strip()] = value
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


def simulated_environment(args: argparse.Namespace) -> dict[str, str]:
    """A Ganeti-like environment for a local create onto ``--disk``."""
    disk = Path(args.disk).absolute()
    if not disk.exists():
        create_disk_file(disk, args.disk_size)
    st = disk.stat()
    is_block = stat.S_ISBLK(st.st_mode)

    env = {
        "OS_API_VERSION": "20",
        "OS_NAME": "cloudimage",
        "OS_VARIANT": args.variant,
        "DEBUG_LEVEL": "1" if args.debug else "0",
        "INSTANCE_NAME": args.instance_name,
        "INSTANCE_UUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, args.instance_name)),
        "INSTANCE_OS": f"cloudimage+{args.variant}",
        "HYPERVISOR": "kvm",
        "DISK_COUNT": "1",
        "DISK_0_PATH": os.fspath(disk),
        "DISK_0_ACCESS": "rw",
        "DISK_0_SIZE": str(target_size(os.fspath(disk)) // (1024 * 1024)),
        "DISK_0_BACKEND_TYPE": "block" if is_block else "file:loop",
        "NIC_COUNT": "0",
    }
    for name, value in parse_option_pairs(args.os_param).items():
        env["OSP_" + name.upper().replace("-", "_")] = value
    return env


def cmd_create(args: argparse.Namespace) -> None:
    hide_values(values_to_hide(parse_option_pairs(args.os_param)))
    paths = Paths(Path(args.config_dir), Path(args.cache_dir))
    genv = parse_environment(simulated_environment(args), Script.CREATE)
    run_create(genv, load_site_config(paths))


def cmd_install(args: argparse.Namespace) -> None:
    paths = Paths(Path(args.config_dir), Path(args.cache_dir))
    variants = install_os(Path(args.os_dir), paths)
    log.info("installed OS %s in %s with %d variants: %s", Path(args.os_dir).name, args.os_dir,
             len(variants), " ".join(variants))
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
                   help="an OS parameter, as gnt-instance add -O would pass it")
    p.add_argument("--instance-name", default="demo.example.org", help="instance name (default: %(default)s)")
    add_site_options(p)
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("install", help="install the Ganeti OS definition on this node")
    p.add_argument("--os-dir", default="/srv/ganeti/os/cloudimage",
                   help="OS definition directory; its name is the OS name (default: %(default)s)")
    add_site_options(p)
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
