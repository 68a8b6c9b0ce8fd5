"""User-facing errors.

Anything a user can cause or fix (bad YAML, a missing image, a port in use, an old CRIU) is raised as an
ActivatorError whose message is one line naming the file or service and what to do. The CLI prints it without
a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import overload


def one_line(text: str) -> str:
    """Escape what would break a line or a terminal: control characters and Unicode line separators (they can
    come from the config file or the network, inside names and values quoted in a message)."""
    return escape(text)


def escape(text: str, keep: str = "") -> str:
    """Text that came from outside (an image, an archive, an app, a client) as a terminal may show it, with only
    the characters in `keep` (say newline and tab) left as they are among those that are not printable.

    The one filter every place that shows untrusted text uses (error lines, log lines, `activator inspect`,
    `activator logs`). What it escapes is everything str.isprintable() refuses: C0 controls and DEL; C1 controls
    U+0080-U+009F (CSI U+009B, OSC U+009D, ... act as ESC-sequences on terminals that honour 8-bit controls,
    in UTF-8 too); format characters (bidi embeddings, overrides and isolates U+202A-U+202E and U+2066-U+2069,
    which make text read otherwise than it is stored; zero-width characters; U+061C); line and paragraph
    separators; and bytes that were not UTF-8 (decoded with surrogateescape: shown as \\xNN)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    o = ord(ch)
    if o < 0x100:
        return "\\t" if ch == "\t" else "\\n" if ch == "\n" else f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def terminal_safe(data: bytes) -> bytes:
    """An app's bytes as a terminal may show them (escape()): newlines and tabs kept, valid UTF-8 text kept,
    everything else escaped. An app's output is the image's, untrusted: escape sequences can retitle a window,
    rewrite what is on screen or, on some terminals, answer back as typed input."""
    return escape(data.decode("utf-8", "surrogateescape"), keep="\n\t").encode()


class ActivatorError(Exception):
    """An error with a one-line message meant for the operator (escaped here, whatever it quotes)."""

    def __init__(self, message: str, *args: object) -> None:
        super().__init__(one_line(message), *args)

    @property
    def lines(self) -> tuple[str, ...]:
        """What the operator is shown: one line per problem."""
        return (str(self),)


class ConfigError(ActivatorError):
    """The configuration file is malformed or invalid."""


class ActivatorErrors(ActivatorError):
    """Several problems found in one pass (all of a file's, so that one edit fixes them all): each its own line.
    As a message (a log line, a refused reload) it is the first and how many more there are."""

    def __init__(self, errors: Sequence[ActivatorError]) -> None:
        self.all = tuple(line for e in errors for line in e.lines)
        more = len(self.all) - 1
        super().__init__(self.all[0] + (f" (and {more} more problem{'s' if more > 1 else ''}: `activator validate` "
                                        "lists them all)" if more else ""))

    @property
    def lines(self) -> tuple[str, ...]:
        return self.all


class ConfigErrors(ActivatorErrors, ConfigError):
    """Several problems of one configuration file."""


@overload
def combined(errors: Sequence[ConfigError]) -> ConfigError: ...


@overload
def combined(errors: Sequence[ActivatorError]) -> ActivatorError: ...


def combined(errors: Sequence[ActivatorError]) -> ActivatorError:
    """One error for all of them: itself if there is one, else each on its line (a ConfigError if all are)."""
    if len(errors) == 1:
        return errors[0]
    return ConfigErrors(errors) if all(isinstance(e, ConfigError) for e in errors) else ActivatorErrors(errors)


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
