"""Sharing memory between instances of one checkpoint: kernel samepage merging (KSM).

Restored by copy (restore_memory: copy), every instance's pages are private anonymous memory, so ten instances
of one checkpoint cost ten times its pages (restore_memory: map shares the unwritten ones as page cache instead).
With prctl(PR_SET_MEMORY_MERGE) (Linux >= 6.4) a process's anonymous memory becomes mergeable, and the flag is
inherited across fork and execve: set in the runc that restores an instance, it reaches CRIU and the restored app.
ksmd then merges identical pages (copy-on-write), so the instances share what they have not written since the dump.

ksmd costs CPU while it scans. It is run fast for a while after each start of a sharing service (when there is
something new to merge) and slowly otherwise; the settings activator found are put back when it stops.

What it exposes, exactly. ksmd is one host-wide daemon: while activator runs it is on (`run` = 1), and it merges
every page any process on the host has marked mergeable (madvise(MADV_MERGEABLE), or PR_SET_MEMORY_MERGE), not
only activator's: VMs under QEMU mark their guest memory so. activator marks only the processes of services with
share_memory on. Merging is a side channel: a process can tell, by timing a write, whether a page it holds is
shared with someone else's (another instance's, or any other mergeable process's). So it is a per-service
choice, on by default only when the file has a single service (all merged pages of activator's are then that
service's instances'), and the host's own settings are put back at stop; they are saved in the state dir first,
so that a daemon killed with SIGKILL has them put back by the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import time
from pathlib import Path

from activator.statedir import write_private

log = logging.getLogger("activator.ksm")

KSM = Path("/sys/kernel/mm/ksm")
PR_SET_MEMORY_MERGE = 67
_libc = ctypes.CDLL(None, use_errno=True)

#: (pages_to_scan, sleep_millisecs): fast right after an instance starts, slow once its pages are merged
FAST = (2000, 20)  # ~100k pages/s: a Tomcat's ~27k pages within seconds
SLOW = (200, 200)  # ~1k pages/s: keeps up with what changes, costs little
BOOST_SECONDS = 30.0


def available() -> bool:
    return (KSM / "run").exists()


def mark_mergeable() -> None:
    """preexec_fn for the runc that brings up a sharing service's instance (runs in the child, before exec)."""
    _libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)


SETTINGS = ("run", "pages_to_scan", "sleep_millisecs")
#: in the state dir: the host's settings while a run has changed them
SAVED_NAME = "ksm-host-settings.json"


def restore_saved(saved: Path) -> bool:
    """Blocking. Put back the host's settings a killed run saved (and did not restore); True if there were any."""
    try:
        values = json.loads(saved.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        saved.unlink(missing_ok=True)
        return False
    for name in ("pages_to_scan", "sleep_millisecs", "run"):
        value = values.get(name) if isinstance(values, dict) else None
        if isinstance(value, str) and value.isdigit():
            with contextlib.suppress(OSError):
                (KSM / name).write_text(value)
    saved.unlink(missing_ok=True)
    return True


class Ksm:
    """ksmd's settings while activator runs: on, fast after each sharing start, slow otherwise."""

    def __init__(self, saved: Path) -> None:
        self._saved_file = saved  # the host's settings, for the next start if this run is killed
        self._saved: dict[str, str] = {}
        self._fast_until = 0.0
        self._mode: tuple[int, int] | None = None

    def start(self) -> None:
        """Blocking. Turn ksmd on (remembering what it was, on disk before anything changes)."""
        restore_saved(self._saved_file)
        for name in SETTINGS:
            with contextlib.suppress(OSError):
                self._saved[name] = (KSM / name).read_text().strip()
        write_private(self._saved_file, json.dumps(self._saved))
        self._set(SLOW)
        self._write("run", "1")

    def started_instance(self) -> None:
        """An instance of a sharing service came up: scan fast for a while."""
        self._fast_until = time.monotonic() + BOOST_SECONDS
        self._set(FAST)

    def tick(self) -> None:
        if self._mode == FAST and time.monotonic() > self._fast_until:
            self._set(SLOW)

    def stop(self) -> None:
        """Blocking. Put ksmd back as it was."""
        for name in ("pages_to_scan", "sleep_millisecs", "run"):
            if name in self._saved:
                self._write(name, self._saved[name])
        self._saved_file.unlink(missing_ok=True)

    def _set(self, mode: tuple[int, int]) -> None:
        if mode != self._mode:
            self._write("pages_to_scan", str(mode[0]))
            self._write("sleep_millisecs", str(mode[1]))
            self._mode = mode

    def _write(self, name: str, value: str) -> None:
        try:
            (KSM / name).write_text(value)
        except OSError as e:
            log.warning("cannot set /sys/kernel/mm/ksm/%s to %s: %s", name, value, e.strerror)


def stats() -> dict[str, int]:
    """ksmd's counters (pages_shared, pages_sharing, full_scans, ...), for status and benchmarks."""
    out = {}
    for name in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int((KSM / name).read_text())
    return out
