"""The error hierarchy.

Every error a user (administrator or instance owner) can cause is a ``UserError``: the top-level
handler prints its one-line message (plus an optional hint) without a traceback.  Anything else
escaping ``main()`` is a bug and keeps its traceback.

Security: messages must never contain an OS parameter's *value* (Ganeti keeps script output in
its logs, and private/secret parameters arrive as plain ``OSP_*`` variables).  Name the parameter,
not what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence


class CloudImageError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UserError(CloudImageError):
    """Caused by input: an OS parameter, a variant, an image, a URL, the site configuration."""


class ConfigError(UserError):
    """The site configuration or a variant file is invalid (an administrator's error)."""

    exit_code = 2


class EnvironmentError_(UserError):
    """The environment Ganeti (or the simulated one) passed is missing or malformed."""


class ParameterError(UserError):
    """An OS parameter is invalid."""


class ImageFetchError(UserError):
    """The image could not be obtained from its source."""


class ChecksumMismatch(UserError):
    """The image's bytes do not match the expected checksum."""


class UnsafeImage(UserError):
    """The image is refused because writing it could leak host data or harm the host."""


class UnsupportedFormat(UserError):
    """The image's format is not one we write."""


class ImageTooLarge(UserError):
    """The image does not fit onto the instance's disk."""


class DiskTooSmall(ImageTooLarge):
    """The image does not fit onto the instance's disk; ``needed`` is the size it needs, if known."""

    def __init__(self, message: str, hint: str | None = None, *, needed: int | None = None) -> None:
        super().__init__(message, hint)
        self.needed = needed


class ConversionError(UserError):
    """Writing the image onto the disk failed."""


class SeedError(UserError):
    """The guest agent's metadata could not be written."""


class HookFailed(UserError):
    """An administrator's hook failed or was refused."""


class GrowError(UserError):
    """The root partition or its filesystem could not be grown to fill the disk."""


class CommandError(CloudImageError):
    """An external command failed.  Carries argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{self.argv[0]} failed with exit code {returncode}: {last}")

    @property
    def last_line(self) -> str:
        """The last line of stderr (usually the reason), else the exit code."""
        text = self.stderr.strip()
        return text.splitlines()[-1] if text else f"exit code {self.returncode}"


class CommandNotFound(UserError):
    """A host tool is not installed."""

    def __init__(self, tool: str, package: str | None = None) -> None:
        hint = f"install the Debian package {package}" if package else "install it on this node"
        super().__init__(f"required tool '{tool}' was not found", hint)
        self.tool = tool
