"""What a command shows that others wrote (an app's output, an archive's annotations), made safe for a
terminal."""

from __future__ import annotations

from typing import Any

from activator.errors import escape, one_line


class TerminalSafe:
    """A binary stream shown through errors.terminal_safe; a UTF-8 character split between two writes is held
    until its end arrives (else both halves would be shown escaped)."""

    def __init__(self, raw: Any) -> None:
        import codecs

        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def write(self, data: bytes) -> int:
        self.raw.write(escape(self.decoder.decode(data), keep="\n\t").encode())
        return len(data)

    def flush(self) -> None:
        self.raw.write(escape(self.decoder.decode(b"", final=True), keep="\n\t").encode())
        self.raw.flush()


def say(line: str) -> None:
    """A line of `activator inspect`: what it shows comes from an archive or an app (annotations, file names,
    process names, mapped paths), so every line is escaped (errors.escape), whoever wrote it."""
    print(one_line(line))
