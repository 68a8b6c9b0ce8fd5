"""The daemon's and the commands' log lines: one per event, escaped, with journald's priority or a timestamp, or
one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

from activator.errors import one_line

_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class Escaped(logging.Filter):
    """Every log message on one line, whatever it quotes (an app's, an image's or a client's words): escaped by
    the filter the CLI's own output uses (errors.escape)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = one_line(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


class _JournalPriority(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers: time, level, logger, message, and the message's own
    `key=value` fields (service=, instance=) as fields of their own."""

    FIELDS = re.compile(r"\b(service|instance)=([^\s,;:]+)")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        out |= {k: v for k, v in self.FIELDS.findall(message)}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt_name: str = "text") -> None:
    """One line per event. Under journald (JOURNAL_STREAM is set) each line starts with its syslog priority,
    `<3>` and so on, which journald turns into the entry's level and strips; it adds its own timestamps.
    Anywhere else (a terminal, a pipe, a file) each line has its own timestamp. `--log-format json`: one JSON
    object per line, anywhere."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Escaped())
    if fmt_name == "json":
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
        return
    if os.environ.get("JOURNAL_STREAM"):
        handler.addFilter(_JournalPriority())
        fmt = "<%(priority)d>%(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
