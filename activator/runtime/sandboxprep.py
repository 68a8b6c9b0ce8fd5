"""Preparing one sandbox: everything runc or CRIU needs before the app runs.

In order: the instance's private directory, its network namespace (owned by the template's user namespace, or
made outside the instance's: userns.py) plugged into the bridge, the overlay root filesystem over the image as
the service's id range sees it (an idmapped mount), the volumes bound again where that range may pass, and then
either the bundle alone (`runc run`), or for a restore through CRIU directly its external mounts, its own
cgroups, the restore's CRIU config and an idle `criu swrk` (criurestore.py). Blocking: sandbox.py runs it in a
thread. Each step records what it made in the SandboxState as it makes it, so release() undoes exactly that.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from activator.config.sections import Resources
from activator.errors import ActivatorError
from activator.net.netns import NetNamespace
from activator.statedir import write_private

from . import applog, cgroups, criurestore, extmounts, rootfs
from .extmounts import DevEntry
from .runc import restore_config
from .sandboxstate import SandboxState
from .spec import ProcessSpec, runtime_spec
from .userns import holding, idmapped_mount
from .volumes import Bind


class Dump(Protocol):
    """What preparing a restore needs of a checkpoint (activator.checkpoints.store.Checkpoint is one)."""

    @property
    def images(self) -> Path: ...

    @property
    def external(self) -> dict[str, str]: ...

    @property
    def dev(self) -> tuple[DevEntry, ...]: ...


def prepare(
    sb: SandboxState, lower: list[Path], process: ProcessSpec, resources: Resources, hostname: str,
    seccomp: dict[str, Any] | None, template: bool, restore: Dump | None, binds: tuple[Bind, ...],
    handoff: tuple[int, socket.socket] | None,
) -> None:
    lay = sb.layout
    # Private: the bundle holds the environment (secrets), the upper dir the app's writes, criu-work its logs.
    lay.dir.mkdir(mode=0o700, parents=True)
    if sb.service is not None:
        applog.record_owner(lay.dir, sb.service)
    if sb.idmap is not None:
        # In a user namespace, runc and CRIU reach the root filesystem and the volumes (below) by path as the
        # instance's root: its group may pass through this directory, nobody else (instances/ is 0711).
        os.chown(lay.dir, 0, sb.idmap.host)
        os.chmod(lay.dir, 0o710)
    lay.bundle.mkdir(mode=0o700)
    lay.criu_work.mkdir(mode=0o700)
    if sb.slot:
        (lay.dir / "slot").touch()
    userns_path = None
    if template and sb.idmap is not None:
        # The template's network namespace belongs to its user namespace (both made here, ahead of runc), so
        # `runc exec` (a readiness command), which joins the user namespace first, can join it. Instances
        # are restored into a user namespace CRIU makes and a network namespace made outside it (CRIU patch).
        userns_path = lay.dir / "userns"
        with holding(sb.idmap, net=True) as pid:
            sb.netns = NetNamespace.create_owned(sb.netns.name, pid)
            userns_path.touch(mode=0o400)
            rootfs.bind(Path(f"/proc/{pid}/ns/user"), userns_path)
    else:
        sb.netns = NetNamespace.create(sb.netns.name)
    if sb.network is not None:
        sb.attachment = sb.network.allocate(sb.name, sb.egress)
        sb.network.plug(sb.attachment, sb.netns)
    sysfs = None
    if sb.idmap is not None:
        sysfs = lay.dir / "sys"
        sb.netns.mount_sysfs(sysfs)
    # The merged root takes the upper dir's mode: it must be the image root's, not our private 0700, or a
    # non-root app could not even look up its own files.
    lay.upper.mkdir(mode=0o700)
    os.chmod(lay.upper, os.stat(lower[-1]).st_mode & 0o7777)
    if sb.idmap is not None:
        # The image's files as the range sees them, without a copy (userns.py); the upper dir (what the app
        # writes, later the checkpoint's diff layer) is the range's own.
        idmapped_mount(lower[-1], lay.dir / "image", sb.idmap)
        lower = [*lower[:-1], lay.dir / "image"]
        os.chown(lay.upper, sb.idmap.host, sb.idmap.host)
        binds = rebind(sb, binds)
    rootfs.mount_overlay(lower, lay.upper, lay.overlay_work, lay.rootfs)
    sb.mounted = True
    criu_config = sb.runc.criu_config
    direct = cgroups.direct()
    if template:
        criu_config = sb.runc.criu_dump_config
    elif restore is not None and (restore.external or sb.map_memory or not direct):
        paths = extmounts.prepare(lay.dir / "ext", restore.dev, restore.external,
                                  sb.idmap.host if sb.idmap is not None else None) if restore.external else {}
        # Through runc on a pure cgroup v2 host, CRIU is told no cgroup root (runc 1.1 names the container's only
        # for v1 hierarchies): it would restore the app into the cgroup it was dumped in, its template's, made
        # anew, shared by every instance, without the limits runc set on the instance's own.
        cgroup_root = f"/{cgroups.PARENT}/{sb.name}" if not direct and cgroups.unified() else None
        if direct:  # volumes too: runc would map them itself, CRIU alone is told (dumped keyed by target)
            paths |= {b.target: b.host for b in binds}
            if sysfs is not None:  # the same: a bind in the spec
                paths["/sys"] = sysfs
        criu_config = lay.dir / "criu.conf"
        write_private(criu_config, restore_config(paths, sb.map_memory, cgroup_root))
        if direct:  # restored through CRIU directly: its cgroups are ours to make
            try:
                procs = cgroups.create(sb.name, resources.memory, resources.cpus, resources.pids)
            except OSError as e:
                raise ActivatorError(f"resources: the kernel refused this instance's limits ({e.strerror}: "
                                     f"memory {resources.memory}, cpus {resources.cpus}, pids {resources.pids})"
                                     ) from None
            inherit = {}
            if handoff is not None:  # the app's listener on this port becomes the service's own socket
                port, listener = handoff
                inherit[f"tcp-listen:{port}"] = listener.fileno()
                sb.handoff_inode = os.fstat(listener.fileno()).st_ino
            sb.restorer = criurestore.Restorer.spawn(
                criu=sb.runc.criu, images=restore.images, work=lay.criu_work, netns=sb.netns.path,
                output=lay.output, procs=procs, mergeable=sb.mergeable, inherit=inherit)
    spec = runtime_spec(
        process,
        rootfs=str(lay.rootfs),
        netns_path=str(sb.netns.path),
        cgroups_path=f"/{cgroups.PARENT}/{sb.name}",
        hostname=hostname,
        resources=resources,
        criu_config=str(criu_config),
        seccomp=seccomp,
        binds=binds,
        idmap=sb.idmap,
        userns_path=str(userns_path) if userns_path is not None else None,
        sysfs=str(sysfs) if sysfs is not None else None,
    )
    write_private(lay.bundle / "config.json", json.dumps(spec))


def rebind(sb: SandboxState, binds: tuple[Bind, ...]) -> tuple[Bind, ...]:
    """Each volume bound again inside this instance's directory, where the instance's root may pass: the
    volumes themselves live under state_dir/volumes (root only), and a host path's parents may be private."""
    out = []
    for i, b in enumerate(binds):
        here = sb.layout.dir / "vol" / str(i)
        if b.idmapped and sb.idmap is not None:
            # Passable (the instance's 0710 directory keeps others out): the restore opens every volume here
            # as the instance's root, and a 0700 vol/ made first by this branch hid the plain binds after it.
            here.parent.mkdir(mode=0o755, exist_ok=True)
            idmapped_mount(b.host, here, sb.idmap)
        else:
            rootfs.bind(b.host, here)
        out.append(Bind(here, b.target, b.read_only))
    return tuple(out)
