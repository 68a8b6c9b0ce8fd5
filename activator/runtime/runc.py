"""The runc CLI, driven directly (Docker's checkpoint path is slower than a cold boot and cannot restore into
new containers; see docs/host-notes.md).

All our containers live under a private runc root (state_dir/runc), so `runc list` there is exactly the set of
containers activator owns, which is what crash recovery and leak checks rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from activator.errors import RuncError

from . import criulog, ksm, rootfs
from .criurestore import NO_BREAKPOINTS
from .procs import Helper, start_time

RUNC_BIN = "runc"
# Under systemd these are ours, not the containers': runc would try to relay sd_notify for the container
# through NOTIFY_SOCKET (and fail on a long state_dir path), and nothing below us may see LISTEN_FDS.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}


# runc hands this file to CRIU for our containers only (the spec's org.criu.config annotation), instead of
# the host-wide /etc/criu/runc.conf.
# - network-lock skip: an instance's network namespace is new and unreachable while it is restored, and no
#   connection is restored alive (below), so CRIU's network lock (an iptables run on dump and on restore)
#   protects nothing here; skipping it took a small app's restore from ~155 to ~85 ms.
# - tcp-close: a template may hold established connections when it is dumped (a database pool opened at start);
#   they are dumped without their state and restored closed, so the app sees them fail and reconnects, as pools
#   do. Without it CRIU refuses to dump such an app at all.
CRIU_CONFIG = """\
# Written by activator for its own containers; see activator/runtime/runc.py.
network-lock skip
tcp-close
"""


#: what may stand in a CRIU config word: CRIU splits its config lines on blanks and `external mnt[KEY]:VAL` on
#: `]` and `:`, so a newline in a key would add an option of the writer's choosing and a `:` would move the split
_WORD = re.compile(r"[A-Za-z0-9_.+@,=~/-]{1,4096}")


def _key(key: str) -> str:
    """A mount key (extmounts' dev, shm, maskN; a volume's target; /sys), checked for the config line."""
    if isinstance(key, str) and key.startswith("/"):
        return _path(key)
    if not isinstance(key, str) or not _WORD.fullmatch(key):
        raise RuncError(f"CRIU config: mount key {key!r} refused (letters, digits and _ . + @ , = ~ / - only)")
    return key


def _path(path: str | Path) -> str:
    """An absolute, normalised path for the config line (no `..`, `//`, blank, NUL, `]` or `:`)."""
    text = str(path)
    if not _WORD.fullmatch(text) or not text.startswith("/") or text.startswith("//") or \
            os.path.normpath(text) != text:
        raise RuncError(f"CRIU config: path {text!r} refused (absolute and normalised, letters, digits and "
                        "_ . + @ , = ~ / - only)")
    return text


def dump_config(external: dict[str, str]) -> str:
    """For templates: the tmpfs mounts activator makes itself (extmounts.py) are dumped as external."""
    return CRIU_CONFIG + "".join(f"external mnt[{_path(point)}]:{_key(key)}\n"
                                 for key, point in sorted(external.items()))


#: restore_memory: map (scripts/criu-patches/0003): long runs of private memory (anonymous, and the written pages of
#: private file mappings) are mapped copy-on-write from the checkpoint's pages images instead of read into fresh memory
MAP_MEMORY = "mmap-page-image\n"


def restore_config(paths: dict[str, Path], map_memory: bool = False, cgroup_root: str | None = None) -> str:
    """For one instance: where its external mounts are on the host, whether its memory is mapped, and the cgroup
    its processes go to in place of the one they were dumped in."""
    return CRIU_CONFIG + (MAP_MEMORY if map_memory else "") + \
        (f"cgroup-root {_path(cgroup_root)}\n" if cgroup_root else "") + \
        "".join(f"external mnt[{_key(key)}]:{_path(path)}\n" for key, path in sorted(paths.items()))


class Runc:
    def __init__(self, root: Path, binary: str = RUNC_BIN, criu: str = "criu") -> None:
        self.root = root
        self.binary = binary
        self.criu = criu
        self.criu_config = root / "criu.conf"
        #: the CRIU restores by mapping (preflight.criu_maps; open_host asks the binary)
        self.criu_maps = True
        self.criu_dump_config = root / "criu-dump.conf"
        #: cleanup steps the sandboxes of this runc root could not do (logged where they failed); the lifecycle
        #: owner reads them at shutdown for its exit status
        self.failures: list[str] = []

    def write_criu_config(self) -> None:
        from . import extmounts

        self.root.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.criu_config, CRIU_CONFIG), (self.criu_dump_config, dump_config(extmounts.mounts()))):
            if not path.exists() or path.read_text() != text:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.rename(path)

    async def _exec(
        self, *args: str, stdout: int = subprocess.PIPE, stderr: int = subprocess.PIPE, log: Path | None = None,
        mergeable: bool = False, env: dict[str, str] | None = None,
    ) -> tuple[int, str, str]:
        cmd = [self.binary, "--root", str(self.root)]
        if self.criu != "criu":  # only when set: runc releases after 1.1 deprecate the option
            cmd += ["--criu", self.criu]
        if log is not None:
            cmd += ["--log", str(log), "--log-format", "text"]
        # Its own session (procs.Helper): when we give up on it (a restore_timeout, a shutdown), runc is killed
        # with its CRIU, so no container appears that nothing owns and nothing goes on writing into the
        # instance's directory while it is removed.
        helper = await Helper.start(
            [*cmd, *args], stdout=stdout, stderr=stderr, env=_child_env() | (env or {}),
            # Inherited by CRIU and the restored (or started) app: its memory may be merged with its siblings'.
            preexec_fn=ksm.mark_mergeable if mergeable else None,
        )
        rc, out, err = await helper.communicate()
        # stdout and stderr apart: `list` and `state` print JSON on stdout and may still warn on stderr.
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    @staticmethod
    def _explain(what: str, text: str, log: Path | None) -> str:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        if log is not None and log.exists():
            lines += [ln for ln in log.read_text(errors="replace").splitlines() if "level=error" in ln]
        msg = lines[-1] if lines else "no output"
        m = re.search(r'msg="(.*)"', msg)
        detail = (m.group(1) if m else msg).split("\\n", 1)[0].removeprefix(f"runc {what} failed: ")
        return f"runc {what} failed: {detail}"

    async def run(self, name: str, bundle: Path, *, stdout: int, stderr: int, log: Path,
                  mergeable: bool = False) -> None:
        rc, out, err = await self._exec(
            "run", "--detach", "--bundle", str(bundle), name, stdout=stdout, stderr=stderr, log=log,
            mergeable=mergeable,
        )
        if rc != 0:
            raise RuncError(self._explain("run", out + err, log), log)

    async def probe(self, name: str, args: tuple[str, ...], *, timeout: float, output: int, log: Path) -> int | None:
        """Run args in the container (its process spec: user, capabilities, seccomp, limits) and wait; its exit
        status, or None when it took longer than timeout (then it is killed, in the container too)."""
        pid_file = log.with_name(f"probe-{os.getpid()}-{id(args)}.pid")
        helper = await Helper.start(
            [self.binary, "--root", str(self.root), "exec", "--pid-file", str(pid_file), name, *args],
            stdout=output, stderr=output, env=_child_env())
        try:
            rc, _, _ = await asyncio.wait_for(helper.communicate(), timeout)
            return rc
        except TimeoutError:
            # runc exec's own session is killed by communicate(); the process it made lives in the container's
            # pid namespace and has to be killed there, or the dump would take it along.
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            return None
        finally:
            pid_file.unlink(missing_ok=True)

    async def checkpoint(self, name: str, image_path: Path, work_path: Path, *, log: Path) -> None:
        rc, out, err = await self._exec(
            "checkpoint", "--image-path", str(image_path), "--work-path", str(work_path), "--file-locks",
            name, log=log,
        )
        if rc != 0:
            why = self._explain("checkpoint", out + err, log)
            if (criu := criulog.first_errors(work_path / "dump.log")) is not None:
                why += f"; CRIU: {criu}"
            raise RuncError(why, work_path / "dump.log")

    async def restore(
        self, name: str, bundle: Path, image_path: Path, work_path: Path, *, stdout: int, stderr: int, log: Path,
        mergeable: bool = False,
    ) -> None:
        rc, out, err = await self._exec(
            "restore", "--detach", "--bundle", str(bundle), "--image-path", str(image_path),
            "--work-path", str(work_path), "--file-locks", name,
            stdout=stdout, stderr=stderr, log=log, mergeable=mergeable,
            env=NO_BREAKPOINTS,  # runc's CRIU inherits runc's environment (see criurestore.NO_BREAKPOINTS)
        )
        if rc != 0:
            why = self._explain("restore", out + err, log)
            if (criu := criulog.first_errors(work_path / "restore.log")) is not None:
                why += f"; CRIU: {criu}"
            raise RuncError(why, work_path / "restore.log")

    async def delete(self, name: str) -> None:
        """Kill (SIGKILL) and delete; a container that does not exist is fine."""
        rc, out, err = await self._exec("delete", "--force", name)
        if rc != 0 and "does not exist" not in out + err:
            raise RuncError(self._explain("delete", out + err, None))

    def forget(self, name: str) -> list[Path]:
        """Blocking. Undo what a runc killed mid-restore leaves in its root: the rootfs it bind-mounts for
        CRIU (NAME/criu-root) and a state directory for a container it never recorded. Returns the unmounted."""
        d = self.root / name
        if not d.is_dir():
            return []
        points = rootfs.mounts_under(d)
        for point in points:
            rootfs.unmount(point)
        if not (d / "state.json").exists():
            shutil.rmtree(d, ignore_errors=True)
        return points

    def pid(self, name: str) -> int | None:
        """The container's init PID if it is alive, read from runc's own state file (no runc process: this is
        on the restore path). Not a zombie, and still the same process (start time matches)."""
        try:
            st = json.loads((self.root / name / "state.json").read_text())
            pid, started = int(st["init_process_pid"]), int(st["init_process_start"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return pid if start_time(pid) == started else None

    async def list(self) -> list[str]:
        rc, out, _ = await self._exec("list", "--format", "json")
        if rc != 0 or not out.strip() or out.strip() == "null":
            return []
        return [c["id"] for c in json.loads(out)]
