"""The seccomp filter this host's runc installs for a linux.seccomp, as BPF: what an imported dump must hold.

A dump carries its processes' seccomp filters as BPF programs (CRIU's seccomp.img), and CRIU installs whatever
it finds there. Comparing that with the profile's JSON is impossible (libseccomp and runc compile the JSON into
BPF, with runc's own ENOSYS stub in front), so the reference is the program itself, taken from runc: with
noNewPrivileges, runc 1.1's init installs the filter as late as it can, just before it blocks on the exec fifo
(standard_init_linux.go), so after `runc create` (no `start`) the container's init is alive and already filtered.
We read its chain with ptrace (PTRACE_SECCOMP_GET_FILTER and _METADATA, what CRIU's own dump does) and delete
it: the program is byte for byte what a template of the service gets, as the template is started by the same
runc from the same JSON, up to the order of the blocks in runc's stub (random; see reference()).

The container is a throwaway: a private rootfs under state_dir holding one empty executable file (runc only
looks args[0] up before installing the filter; nothing is ever executed), a tmpfs /dev and a /proc (init opens
its fifo through /proc/self/fd), new namespaces, no capabilities. It costs one `runc create` and `delete`
(~0.2 s), once per host and profile: the result is cached under
state_dir/seccompref (0700), keyed by the filter JSON and the whole `runc --version` (runc's and libseccomp's
versions both shape the program).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activator.errors import ActivatorError

CACHE = "seccompref"
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
PTRACE_SECCOMP_GET_FILTER, PTRACE_SECCOMP_GET_METADATA = 0x420C, 0x420D
WALL = 0x40000000
#: the kernel's BPF_MAXINSNS; sock_filter is 8 bytes
MAX_INSNS = 4096
#: SECCOMP_FILTER_FLAG_TSYNC: CRIU adds it to the chains of threads that share them; not part of the profile
FLAG_TSYNC = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class SeccompRefError(ActivatorError):
    pass


@dataclass(frozen=True)
class Filter:
    """One installed filter: its BPF program (struct sock_filter[], as CRIU stores it) and its flags."""

    program: bytes
    flags: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"program": self.program.hex(), "flags": self.flags}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Filter:
        return cls(bytes.fromhex(str(d["program"])), int(d["flags"]))


class _Metadata(ctypes.Structure):
    _fields_ = [("filter_off", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def read_chain(pid: int) -> tuple[Filter, ...]:
    """Blocking; root. The seccomp filters of a live process, oldest first (index 0 is the first installed)."""
    if _libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        raise _oserror(f"PTRACE_SEIZE of {pid}")
    try:
        if _libc.ptrace(PTRACE_INTERRUPT, pid, None, None) != 0:
            raise _oserror(f"PTRACE_INTERRUPT of {pid}")
        os.waitpid(pid, WALL)
        chain = []
        buf = (ctypes.c_uint64 * MAX_INSNS)()
        for i in range(64):
            n = _libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(i), buf)
            if n < 0:
                if ctypes.get_errno() == 2:  # ENOENT: past the newest
                    break
                raise _oserror(f"PTRACE_SECCOMP_GET_FILTER {i} of {pid}")
            meta = _Metadata(i, 0)
            if _libc.ptrace(PTRACE_SECCOMP_GET_METADATA, pid, ctypes.c_void_p(ctypes.sizeof(meta)),
                            ctypes.byref(meta)) < 0:
                raise _oserror(f"PTRACE_SECCOMP_GET_METADATA {i} of {pid}")
            chain.append(Filter(ctypes.string_at(buf, n * 8), int(meta.flags)))
        return tuple(chain)
    finally:
        _libc.ptrace(PTRACE_DETACH, pid, None, None)


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _runc_version(runc: str) -> str:
    try:
        return subprocess.run([runc, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SeccompRefError(f"cannot run {runc} --version: {e}") from None


def cache_key(linux_seccomp: dict[str, Any], runc_version: str) -> str:
    return hashlib.sha256(json.dumps([linux_seccomp, runc_version], sort_keys=True).encode()).hexdigest()[:32]


def reference(linux_seccomp: dict[str, Any] | None, state_dir: Path, runc: str = "runc") -> tuple[Filter, ...]:
    """Blocking; root. The program this host's runc installs for this linux.seccomp (seccomp.load()'s), as a
    one-filter chain; () for none (unconfined). Cached under state_dir.

    runc 1.1 prepends a stub to libseccomp's program (patchbpf: -ENOSYS for syscalls newer than the profile
    knows) whose blocks come in Go map order, which is random: measured, 3 different stubs in 24 creates of
    the same profile, the libseccomp body after them identical. So a dump's filter equals this one up to the
    stub; dumpcheck.seccomp_matches() says what a stub may be."""
    if linux_seccomp is None:
        return ()
    version = _runc_version(runc)
    cache = state_dir / CACHE
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cache, 0o700)
    path = cache / f"{cache_key(linux_seccomp, version)}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return tuple(Filter.from_json(f) for f in json.loads(path.read_text())["chain"])
    chain = _from_runc(linux_seccomp, cache, runc)
    if len(chain) != 1:
        raise SeccompRefError(f"{runc} installed {len(chain)} seccomp filters in a container made with one; "
                              "cannot tell what an imported checkpoint's filter should be")
    from activator.statedir import write_private

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    write_private(tmp, json.dumps({"runc": version, "chain": [f.to_json() for f in chain]}))
    os.replace(tmp, path)
    return chain


def _spec(rootfs: Path, linux_seccomp: dict[str, Any]) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["/x"], "env": [], "cwd": "/",
                    "capabilities": {k: [] for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True},
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
                  "seccomp": linux_seccomp},
    }


def _from_runc(linux_seccomp: dict[str, Any], cache: Path, runc: str) -> tuple[Filter, ...]:
    work = Path(tempfile.mkdtemp(prefix=".make-", dir=cache))
    name = f"activator-seccompref-{os.getpid()}-{work.name.removeprefix('.make-')}"
    root = ["--root", str(work / "runc")]
    try:
        rootfs = work / "rootfs"
        for d in (rootfs, rootfs / "proc", rootfs / "dev"):
            d.mkdir(mode=0o755)
        (rootfs / "x").touch(mode=0o755)
        (work / "config.json").write_text(json.dumps(_spec(rootfs, linux_seccomp)))
        # Its output to a file, not a pipe: the container's init inherits it and lives on until deleted.
        with open(work / "runc.log", "w+") as out:
            made = subprocess.run([runc, *root, "create", "--bundle", str(work), name], stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=out, timeout=60)
            if made.returncode != 0:
                out.seek(0)
                raise SeccompRefError(f"runc create of a container with this seccomp filter failed: "
                                      f"{(out.read().strip().splitlines() or ['no output'])[-1]}")
        state = subprocess.run([runc, *root, "state", name], capture_output=True, text=True, timeout=60)
        try:
            pid = int(json.loads(state.stdout)["pid"])
        except (ValueError, KeyError, TypeError):
            raise SeccompRefError(f"runc state of {name} said nothing usable: {state.stderr.strip()}") from None
        try:
            return read_chain(pid)
        except OSError as e:
            raise SeccompRefError(f"reading the seccomp filter runc installed failed: {e}") from None
    finally:
        subprocess.run([runc, *root, "delete", "--force", name], capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)
