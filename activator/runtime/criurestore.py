"""Restoring an instance through CRIU's RPC directly, without runc.

Measured on the busybox app (bench/coldstart.py --breakdown): `runc restore` took ~36 ms, of which CRIU's own
restore was ~8 ms; the same restore through CRIU's RPC takes ~10 ms. runc's share is its work around CRIU
(cgroups, mount preparation, state, a version check, notify round trips), none of which an instance of ours needs
from runc: the namespace, root filesystem and external mounts are prepared by the sandbox, and what CRIU does
not restore from the dump itself (the seccomp filter, capabilities, no_new_privs and rlimits all come from the
image) is the cgroups, which cgroups.create() makes with runc's own device rules and the service's limits.

The request carries what runc's would (read from runc's debug log): the images and work directories, the root
filesystem, the external mounts (the host devices runc maps; extmounts.py's, through the instance's CRIU
config), the network namespace to join (inherited as extRootNetNS), the app's output in place of the template's
pipes (keys from the checkpoint's descriptors.json), file locks and evasive devices. No cgroup work is asked of
CRIU (in runc's mode it mounts every hierarchy in a "cgroup yard" first).

A Restorer is made while the sandbox is prepared, so off the critical path for prepared slots: `criu swrk` is
started idle, with every descriptor it needs, and moved into the instance's cgroups (so whatever it restores
starts in them). Both cost milliseconds in the daemon: moving a task between cgroup v1 hierarchies waits for an
RCU grace period after a quiet spell. An idle swrk costs one sleeping process (~0.8 MB of its own memory). The
restore itself is then one request and one answer.

Wherever cgroups.direct() says the cgroups can be made here: device rules as files on cgroup v1 or a hybrid, as
a BPF device program on a pure v2 host (devicefilter.py); only a kernel that loads no such program restores
through runc. Templates are still run and dumped with runc, and cold starts run through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from activator.errors import RuncError

from . import cgroups, criulog, ksm

CLONE_NEWNET = 0x40000000
#: the host devices runc maps into a container as external bind mounts on restore
HOST_DEVICES = ("/dev/null", "/dev/random", "/dev/full", "/dev/tty", "/dev/zero", "/dev/urandom")
LOG = "restore.log"
#: CRIU stops each restored task at rt_sigreturn with a hardware breakpoint by default. Setting one allocates a
#: perf event, which waits for a full RCU grace period: 10-25 ms on a host that was idle, most of a small app's
#: restore (seen with perf: ptrace_set_breakpoint_addr -> perf_event_alloc -> synchronize_rcu). Fault 130
#: (FI_NO_BREAKPOINTS) makes CRIU step the task to rt_sigreturn with PTRACE_SYSCALL instead, its path on hosts
#: without breakpoints: a handful of syscall stops, tens of microseconds.
NO_BREAKPOINTS = {"CRIU_FAULT": "130"}


#: the inherit-fd keys a restore may name: the template's stdout/stderr pipes (runc's descriptors.json) and the
#: service's listening socket (handoff); anything else in a checkpoint's descriptors.json is not ours to honour
_OUTPUT_KEY = re.compile(r"pipe:\[[0-9]{1,20}\]")
_INHERIT_KEY = re.compile(r"tcp-listen:[0-9]{1,5}|extRootNetNS")


def inherit_key(key: str) -> str:
    if not isinstance(key, str) or not _INHERIT_KEY.fullmatch(key):
        raise RuncError(f"CRIU restore: inherit-fd key {key!r} refused (tcp-listen:PORT only)")
    return key


def output_keys(descriptors: Path) -> set[str]:
    """The dumped app's stdout and stderr, where they were pipes (runc's descriptors.json: what fds 0-2 were);
    they get the instance's output file. A record of anything but strings, or a pipe key of another shape, is
    refused in one line."""
    try:
        said = json.loads(descriptors.read_text())
    except (OSError, ValueError) as e:
        raise RuncError(f"CRIU restore: {descriptors} unreadable: {e}") from None
    if not isinstance(said, list) or not all(isinstance(d, str) for d in said):
        raise RuncError(f"CRIU restore: {descriptors} is not a list of descriptor names")
    keys = {d for d in said[1:3] if d.startswith("pipe:")}
    for key in keys:
        if not _OUTPUT_KEY.fullmatch(key):
            raise RuncError(f"CRIU restore: {descriptors}: descriptor {key!r} refused (pipe:[INODE] only)")
    return keys


class Restorer:
    """An idle `criu swrk`, in the instance's cgroups, holding what the restore request will name."""

    def __init__(self, popen: subprocess.Popen[bytes], sock: socket.socket, fds: dict[str, int],
                 work: Path, inherit: dict[str, int] | None = None) -> None:
        self.popen = popen
        self.sock = sock
        # inherit-fd keys to descriptors swrk was started with (same numbers): a listening socket (handoff)
        self.inherit = inherit or {}
        # images and work: ours, kept open (CRIU opens them as /proc/<client>/fd/N); net and output: swrk's own
        # (inherited, same numbers; our copies are closed)
        self.fds = fds
        self.work = work

    @classmethod
    def spawn(cls, *, criu: str, images: Path, work: Path, netns: Path, output: Path, procs: list[Path],
              mergeable: bool, inherit: dict[str, int] | None = None) -> Restorer:
        """Blocking. `inherit`: descriptors of ours for CRIU to use in place of what the dump names by these keys
        (`tcp-listen:PORT`: the service's listening socket, scripts/criu-patches/0002)."""
        inherit = inherit or {}
        from activator.statedir import open_private

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        fds: dict[str, int] = {}
        try:
            fds["images"] = os.open(images, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds["work"] = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds["net"] = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            fds["output"] = open_private(output)
            popen = subprocess.Popen(
                [criu, "swrk", str(theirs.fileno())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(), *fds.values(), *inherit.values()),
                start_new_session=True,
                preexec_fn=ksm.mark_mergeable if mergeable else None, env=os.environ | NO_BREAKPOINTS)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            ours.close()
            raise
        finally:
            theirs.close()
        for name in ("net", "output"):  # swrk has its own copies now
            os.close(fds[name])
        restorer = cls(popen, ours, fds, work, inherit)
        try:
            cgroups.join(procs, popen.pid)
        except BaseException:
            restorer.discard()
            raise
        return restorer

    async def restore(self, *, root: Path, config: Path, descriptors: Path) -> int:
        """The restored app's pid. Raises RuncError (what a failed `runc restore` raises) naming CRIU's log.
        Cancelled: CRIU is killed; releasing the sandbox (cgroups.remove) takes care of what it had restored."""
        from .preflight import require_pycriu

        rpc = require_pycriu().rpc_pb2

        try:
            req = rpc.criu_req(type=rpc.RESTORE)
            o = req.opts
            o.images_dir_fd, o.work_dir_fd = self.fds["images"], self.fds["work"]
            o.log_level, o.log_file = 4, LOG
            o.root = str(root)
            o.config_file = str(config)  # network-lock skip, tcp-close, where the external mounts are
            o.file_locks = o.evasive_devices = True
            o.empty_ns = CLONE_NEWNET
            o.manage_cgroups = False
            for dev in HOST_DEVICES:
                m = o.ext_mnt.add()
                m.key = m.val = dev
            f = o.inherit_fd.add()
            f.key, f.fd = "extRootNetNS", self.fds["net"]
            for key, fd in self.inherit.items():
                f = o.inherit_fd.add()
                f.key, f.fd = inherit_key(key), fd
            for key in output_keys(descriptors):
                f = o.inherit_fd.add()
                f.key, f.fd = key, self.fds["output"]
            loop = asyncio.get_running_loop()
            self.sock.setblocking(False)
            await loop.sock_sendall(self.sock, req.SerializeToString())
            data = await loop.sock_recv(self.sock, 1 << 16)
            if not data:
                raise RuncError(f"CRIU ended without an answer; see {self.work / LOG}", self.work / LOG)
            resp = rpc.criu_resp()
            resp.ParseFromString(data)
            if not resp.success:
                why = criulog.first_errors(self.work / LOG) or \
                    f"{os.strerror(resp.cr_errno) if resp.cr_errno else 'no log'} ({resp.cr_errmsg or 'no message'})"
                raise RuncError(f"CRIU restore failed: {why}", self.work / LOG)
            return int(resp.restore.pid)
        except BaseException:
            self.kill()
            raise
        finally:
            self._close()
            # It exits once it has answered. Waited for here, not reaped behind (which saved 0.3-1.7 ms): until it
            # has exited it sits in the instance's cgroups holding whatever was handed to it, the service's
            # listening socket under handoff among them, where the handoff mode looks for who holds that socket.
            await asyncio.to_thread(self.popen.wait)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def discard(self) -> None:
        """Blocking. An unused one (the slot is released)."""
        self.kill()
        self._close()
        self.popen.wait()

    def _close(self) -> None:
        self.sock.close()
        for name in ("images", "work"):
            fd = self.fds.pop(name, None)
            if fd is not None:
                os.close(fd)

