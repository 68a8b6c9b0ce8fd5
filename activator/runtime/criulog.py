"""What a CRIU log says went wrong, in a form that fits the one-line error a user gets.

CRIU logs every run at level 4; a failure's cause is in its `Error (file:line): ...` lines, often not in what runc
or the RPC answer reports ("criu failed: type NOTIFY"). One line is noise on every run on hosts whose root lacks
CAP_SYS_RESOURCE and is skipped (docs/host-notes.md).
"""

from __future__ import annotations

import re
from pathlib import Path

HARMLESS = ("rlimit: Can't setup RLIMIT_NOFILE for self",)
#: causes whose fix is not obvious from CRIU's words
HINTS = {
    "Can't get rlimit": "CRIU needs CAP_SYS_RESOURCE to dump an app that runs as another user than root, and this "
                        "host's root lacks it (see CapBnd in /proc/self/status); remove 'userns: host' (in its own "
                        "user namespace, the default, the app is checkpointed) or run the app as root here",
}
_ERROR = re.compile(r"^\([0-9. ]+\)\s+(?:\d+: )?Error \([^)]*\): (.*)$")


def first_errors(log: Path, limit: int = 2) -> str | None:
    """The first `limit` meaningful Error lines, joined with ' / ', or None if there are none (or no log)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    found: list[str] = []
    for line in text.splitlines():
        m = _ERROR.match(line.strip())
        if m is None or any(h in m.group(1) for h in HARMLESS):
            continue
        found.append(" ".join(m.group(1).split())[:160])
        if len(found) == limit:
            break
    if not found:
        return None
    hints = [h for cause, h in HINTS.items() if any(cause in f for f in found)]
    return " / ".join(found) + "".join(f" ({h})" for h in hints)
