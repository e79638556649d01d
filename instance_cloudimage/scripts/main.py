"""The Ganeti OS scripts' entry: parse the environment once, dispatch to a verb, one line per error.

One top-level handler turns a UserError into one line on stderr and a non-zero exit, and keeps
tracebacks for bugs (or for everything when DEBUG_LEVEL > 0).  SIGTERM raises, so the ExitStack
of a running create still unmounts and detaches what it set up.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

from instance_cloudimage.ganeti.env import (
    OS_NAME_RE,
    GanetiEnv,
    Script,
    debug_level_of,
    parse_environment,
    parse_os_params,
)
from instance_cloudimage.ganeti.uri import uri_secrets
from instance_cloudimage.params.table import values_to_hide
from instance_cloudimage.runtime.errors import CloudImageError, CommandError, ConfigError, UserError
from instance_cloudimage.runtime.log import console_logging, hide_values, printable, setup_logging
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig, installed_paths, load_site_config
from instance_cloudimage.verbs.create import run_create
from instance_cloudimage.verbs.verify import run_verify

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
        with console_logging():
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


def dispatch(script: Script, genv: GanetiEnv, paths: Paths, argv: Sequence[str]) -> None:
    if script is Script.VERIFY:
        run_verify(genv, paths, argv)
        return
    if script is Script.CREATE:
        run_create(genv, load_site_config(paths))
        return
    try:
        site = load_site_config(paths)
    except ConfigError as e:
        if script is not Script.RENAME:
            raise
        log.warning("%s; renaming with the default settings", e)  # rename never fails for this
        site = SiteConfig(paths=paths)
    # Imported here: import and rename bring PyYAML, which a create without a seed never needs.
    if script is Script.EXPORT:
        from instance_cloudimage.verbs.export import run_export

        run_export(genv, site)
    elif script is Script.IMPORT:
        from instance_cloudimage.seed.reseed import reseed_imported_disk
        from instance_cloudimage.sources.trust import trust_of_parameters
        from instance_cloudimage.verbs.import_disk import run_import

        # Only once the disk's data is complete, and before a URI-only disk's staging file is
        # copied out, so the new seed reaches that disk too.  An untrusted image's filesystem is
        # never mounted: only a seed partition or seed disk is rewritten.
        may_mount = trust_of_parameters(genv.params, site).may_mount
        run_import(genv, site, after_write=lambda path: reseed_imported_disk(genv, site, path, may_mount=may_mount))
    elif script is Script.RENAME:
        from instance_cloudimage.verbs.rename import run_rename

        run_rename(genv, site)


def os_script_main(verb: str, environ: Mapping[str, str] | None = None,
                   argv: Sequence[str] | None = None) -> int:
    """What scripts/<verb> calls: parse the Ganeti environment once, then dispatch."""
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    script = Script(verb)
    # Every log line starts with this: a malformed OS_NAME (ganeti/env.py refuses it) must not garble them.
    name = environ.get("OS_NAME", "")
    prog = f"{name if OS_NAME_RE.match(name) else 'cloudimage'} {verb}"

    def body() -> None:
        hide_values(values_to_hide(parse_os_params(environ)))
        paths = installed_paths(argv[0]) if argv else Paths()
        genv = parse_environment(environ, script)
        hide_values(s for uri in genv.uris() for s in uri_secrets(uri))
        dispatch(script, genv, paths, argv[1:])

    return guarded(prog, debug_level_of(environ), body)
