"""User-facing errors.

Anything a user can cause or fix (bad YAML, a missing image, a port in use, an old CRIU) is raised as an
ActivatorError whose message is one line naming the file or service and what to do. The CLI prints it without
a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


def one_line(text: str) -> str:
    """Escape what would break a line or a terminal: control characters and Unicode line separators (they can
    come from the config file or the network, inside names and values quoted in a message)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class ActivatorError(Exception):
    """An error with a one-line message meant for the operator (escaped here, whatever it quotes)."""

    def __init__(self, message: str, *args: object) -> None:
        super().__init__(one_line(message), *args)


class ConfigError(ActivatorError):
    """The configuration file is malformed or invalid."""


class PreflightError(ActivatorError):
    """The host lacks something activator needs (root, runc, CRIU, dockerd)."""


class ImageError(ActivatorError):
    """The service's image cannot be found or read."""


class CheckpointError(ActivatorError):
    """A checkpoint could not be built or is unusable."""


class RestoreError(ActivatorError):
    """An instance could not be restored from its checkpoint; log is where CRIU's account of it was kept."""

    def __init__(self, message: str, log: Path | None = None, instance: str | None = None) -> None:
        super().__init__(message)
        self.log = log
        self.instance = instance


class RuncError(ActivatorError):
    """A runc command failed; log points at the runc or CRIU log that says why."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


class StartError(ActivatorError):
    """An instance could not be started (cold start) or never became ready."""


class Rejected(ActivatorError):
    """A connection was turned away by admission control; reason is the metric label (queue-full, ...).

    `resources` means the activator itself ran short (file descriptors, memory): never the app's fault."""

    def __init__(self, reason: str, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after  # when trying again may work (a 503's Retry-After), seconds
