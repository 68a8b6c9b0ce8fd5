"""What a service's checkpoint is made of on this host, derived from the service and its image alone: the
app's process, whether instances can be reached on their own address (the kernel path), and whether the
checkpoint may move between hosts. A build and an import derive them alike, so an imported checkpoint's record
says what this host would have built, never what the archive claims.
"""

from __future__ import annotations

import logging
from pathlib import Path

from activator.config.service import ServiceConfig
from activator.errors import CheckpointError
from activator.net.network import kernel_path_possible
from activator.runtime.spec import ProcessSpec, capability_set, merge_env, process_args

from .images import ImageInfo, resolve_user

# Builds log under one name wherever their code lives (operators grep for it).
log = logging.getLogger("activator.builder")


def process(svc: ServiceConfig, image: ImageInfo, rootfs: Path) -> ProcessSpec:
    """The app's process as the image and the service make it: what a build runs, and what an imported dump's
    process must be."""
    args = process_args(image.entrypoint, image.cmd, svc.entrypoint, svc.command)
    if not args:
        raise CheckpointError(
            f"service '{svc.name}': image '{svc.image}' has no Cmd or Entrypoint; set 'command'"
        )
    uid, gid, groups = resolve_user(rootfs, svc.user if svc.user is not None else image.user, svc.name)
    return ProcessSpec(
        args=args,
        env=merge_env(image.env, svc.environment, svc.hostname or svc.name),
        cwd=svc.working_dir or image.working_dir or "/",
        uid=uid, gid=gid, additional_gids=groups, capabilities=capability_set(svc.cap_add, svc.cap_drop),
        rlimits=svc.ulimits, read_only=svc.read_only, tmpfs=tuple((t.target, t.options) for t in svc.tmpfs),
    )


def kernel_path(svc: ServiceConfig, addresses: list[str]) -> bool:
    """Can instances be reached on their own address? Refuses an app that listens only on the template's."""
    wildcard = {"0.0.0.0", "::"}
    if any(a in wildcard for a in addresses):
        return kernel_path_possible(svc)
    specific = [a for a in addresses if not a.startswith(("127.", "::1"))]
    if specific:
        raise CheckpointError(
            f"service '{svc.name}': the app listens on {specific[0].removesuffix('/v6only')}:{svc.port} only, "
            "an address its instances will not have; make it listen on every address (0.0.0.0) or on 127.0.0.1")
    if kernel_path_possible(svc):
        log.warning("service=%s the app listens on %s only: its connections go through the activator "
                    "(no kernel path); make it listen on 0.0.0.0 for that", svc.name, ", ".join(addresses))
    return False


def unshareable(svc: ServiceConfig) -> str:
    """Why svc's checkpoint cannot move between hosts ("" if it can)."""
    if svc.volumes:
        return (f"service '{svc.name}' has volumes, whose data does not move with a checkpoint (its memory may "
                "hold what it read of them); each host builds its own")
    return ""
