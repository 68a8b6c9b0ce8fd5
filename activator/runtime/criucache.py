"""CRIU's kernel-feature cache (/run/criu.kdat): made valid at every daemon start.

Without it every CRIU run re-probes the kernel (~30-40 ms here). CRIU writes the cache only when /run is a tmpfs,
and a stale /run/criu.kdat.tmp (left by a CRIU that died while writing it) blocks every later attempt, because
CRIU opens it with O_EXCL. On hosts where /run is not a tmpfs (these build machines), the cache is made in a
private mount namespace with a tmpfs on /run and copied out; CRIU loads it from a non-tmpfs /run all the same.
CRIU checks the cache against the running kernel itself (and ignores one from another kernel); making it afresh at
each start keeps it from being stale after an upgrade in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path

log = logging.getLogger("activator")

KDAT = Path("/run/criu.kdat")
STALE_AFTER = 60.0  # a CRIU writing the cache takes milliseconds; an older .tmp is a dead one's


def _is_tmpfs(path: Path) -> bool:
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        best = ("", "")
        for line in f:
            fields = line.split()
            point, fstype = fields[4], fields[fields.index("-") + 1]
            if (str(path) + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best[0]):
                best = (point, fstype)
        return best[1] == "tmpfs"
    return False


def refresh(criu: str = "criu") -> bool:
    """Blocking. Make /run/criu.kdat current; False (logged) if it could not be made: CRIU then works, slower."""
    tmp = KDAT.with_name(KDAT.name + ".tmp")
    with contextlib.suppress(OSError):
        if time.time() - tmp.stat().st_mtime > STALE_AFTER:
            tmp.unlink()
            log.info("removed a stale %s that kept CRIU from saving its kernel-feature cache", tmp)
    try:
        if _is_tmpfs(KDAT.parent):
            KDAT.unlink(missing_ok=True)
            subprocess.run([criu, "check"], capture_output=True, timeout=60)
            return KDAT.exists()
        out = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs -o size=4m tmpfs /run && "{criu}" check >/dev/null 2>&1; cat {KDAT}'],
            capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("CRIU's kernel-feature cache could not be made (%s): every restore re-probes the kernel", e)
        return False
    if out.returncode != 0 or not out.stdout:
        log.warning("CRIU's kernel-feature cache could not be made: every restore re-probes the kernel (~30 ms)")
        return False
    new = KDAT.with_name(KDAT.name + f".activator-{os.getpid()}")
    new.write_bytes(out.stdout)
    os.chmod(new, 0o644)
    os.rename(new, KDAT)
    return True
