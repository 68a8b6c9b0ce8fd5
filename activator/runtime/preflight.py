"""Host checks before anything starts, each failing with one line that says how to fix it."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
from typing import Any

from activator.errors import PreflightError

FIX = "run 'make setup' (as root) to install it"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def required_criu(kernel: str) -> tuple[int, int]:
    # Since kernel 6.16 SO_PASSCRED is refused on TCP sockets and CRIU < 4.2 cannot dump a TCP listener.
    return (4, 2) if _version_tuple(kernel)[:2] >= (6, 16) else (3, 17)


def check_root() -> None:
    if os.geteuid() != 0:
        raise PreflightError(
            "activator must run as root: runc, CRIU, overlay mounts and network namespaces need it (try sudo)"
        )


def check_runc(binary: str = "runc") -> str:
    if shutil.which(binary) is None:
        where = "on PATH" if binary == "runc" else f"at '{binary}' (settings.runc)"
        raise PreflightError(f"runc not found {where}; {FIX}")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"runc version (\S+)", out)
    if not m or _version_tuple(m.group(1))[:2] < (1, 1):
        raise PreflightError(f"runc 1.1 or newer is needed, found {m.group(1) if m else 'unknown'}; {FIX}")
    return m.group(1)


def check_criu(binary: str = "criu") -> str:
    if shutil.which(binary) is None:
        where = "on PATH" if binary == "criu" else f"at '{binary}' (settings.criu)"
        raise PreflightError(f"CRIU not found {where}; {FIX}")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"Version:\s*(\S+)", out)
    found = m.group(1) if m else "unknown"
    need = required_criu(os.uname().release)
    if not m or _version_tuple(found)[:2] < need:
        raise PreflightError(
            f"CRIU {found} is too old for kernel {os.uname().release} (needs {need[0]}.{need[1]} or newer); "
            f"{FIX}"
        )
    require_pycriu()
    # A build's GitID says which patches it carries (scripts/criu-patches/: user namespaces need one)
    gitid = re.search(r"GitID:\s*(\S+)", out)
    return f"{found} ({gitid.group(1)})" if gitid else found


def criu_maps(binary: str = "criu") -> bool:
    """Can this CRIU restore by mapping (activator's scripts/criu-patches/0003: `--mmap-page-image`)? One that
    cannot would refuse the restore config's line and fail every restore of a `restore_memory: map` service."""
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--mmap-page-image" in out


def require_pycriu() -> Any:
    """The pycriu module, or a one-line error saying how to get it (it is not on PyPI)."""
    try:
        import pycriu
    except ImportError:
        raise PreflightError(f"pycriu is not installed in this Python ({sys.executable}); {FIX}") from None
    return pycriu


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (what systemd's LimitNOFILE= sets); returns it.

    Every proxied connection costs two descriptors. The default soft limit (1024 on many hosts) would run out at
    a few hundred connections, and a daemon that cannot open a socket must not mistake that for a broken app.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
