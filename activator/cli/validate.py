"""`activator validate` (a services file checked as `run` would at start, and what it would do) and `activator
schema` (the file's JSON Schema, or the configuration reference)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activator import statedir
from activator.config.document import Config
from activator.config.service import ServiceConfig
from activator.errors import ActivatorError, ConfigError, PreflightError, combined
from activator.runtime import preflight

from .control import daemon_said


def cmd_validate(cfg: Config, args: argparse.Namespace) -> int:
    """What `run` would refuse at start, refused here, every problem on its line; what the file would make the
    daemon do (each service's addresses, what a reload would change) said."""
    from activator.daemon import control
    from activator.statedir import StateDir

    sock = StateDir.of(cfg).control_socket
    warnings = [] if args.file_only else _check_host(cfg, sock)
    names = ", ".join(s.name for s in cfg.services)
    print(f"{cfg.path}: ok ({len(cfg.services)} service(s): {names})" if cfg.services else
          f"{cfg.path}: ok (no service yet: add one under services: and reload)")
    for svc in cfg.services:
        print(f"  {svc.name} listens on {_addresses(svc)}")
    for note in (*cfg.notes, *warnings):  # Compose keys activator does not act on, and warnings: said, never dropped
        print(f"{cfg.path}: {note}")
    if not sock.exists() or os.geteuid() != 0:
        return 0
    # A daemon runs on this state dir: say what reloading this file would do to it.
    try:
        plan = control.request(sock, f"plan {cfg.path}", timeout=30)
    except control.NotRunning:
        return 0
    except ActivatorError as e:
        raise ActivatorError(f"a reload of it would be refused: {daemon_said(e, sock)}") from None
    print(f"a reload of the running activator would: {'; '.join(plan['changes'])}")
    return 0


def _addresses(svc: ServiceConfig) -> str:
    """A service's effective listen addresses as the daemon binds them: a wildcard said to be every interface."""
    if not svc.listen:
        return f"the sockets systemd passes with FileDescriptorName={svc.name} (listen: systemd)"
    protocols = "/".join(svc.protocol)
    return ", ".join(f"{a} ({protocols}" + ("; every interface of this host)" if a.host in ("0.0.0.0", "::") else ")")
                     for a in svc.listen)


def _check_host(cfg: Config, sock: Any) -> list[str]:
    """What can be checked without starting anything (--file-only skips it), as `run` checks it at start: the
    binaries, state_dir, each image (and the user it runs as) in the engine, each listen address free or already
    the running daemon's for that service, the metrics and agent addresses, profiles, volumes, keys. Every problem
    is raised together (a line each); what only changes how a service is served is returned as warnings."""
    from activator.checkpoints.host import load_trust
    from activator.checkpoints.images import ImageSource
    from activator.daemon import control
    from activator.daemon.sockets import bind_listener
    from activator.runtime import cgroups, volumeowner, volumes

    problems: list[ActivatorError] = []
    warnings: list[str] = []

    def check(fn: Callable[[], object], where: str = "", said: Callable[[str], str] = str) -> None:
        """fn's problem, if it has one, kept (prefixed with the file and key where given)."""
        try:
            fn()
        except ActivatorError as e:
            cls = ConfigError if isinstance(e, ConfigError) else ActivatorError
            problems.append(cls(f"{cfg.path}: {where}: {said(str(e))}") if where else e)

    held: set[tuple[str, str]] = set()
    daemon = False
    if sock.exists() and os.geteuid() == 0:
        with contextlib.suppress(ActivatorError):  # no daemon, or one that does not answer: nothing is held
            st = control.request(sock, "status")
            held = {(svc["name"], addr) for svc in st["services"] for addr in svc["listen"]}
            daemon = True
    for binary, check_binary in (("runc", preflight.check_runc), ("criu", preflight.check_criu)):
        name = getattr(cfg.settings, binary)
        check(lambda c=check_binary, n=name: c(n), f"settings.{binary}")  # type: ignore[misc]
    check(lambda: _check_state_dir(cfg))
    check(lambda: load_trust(cfg))  # a key file missing, unreadable, not a key, or a signing key others can read
    if cfg.settings.checkpoint_registry is not None and shutil.which("skopeo") is None:
        problems.append(ActivatorError(f"{cfg.path}: settings.checkpoint_registry needs skopeo, which is not "
                                       "installed; run 'make setup' (or apt-get install skopeo)"))
    if not daemon:  # a running daemon on this state dir holds them itself
        if cfg.settings.metrics is not None:
            check(lambda: _bindable(cfg.settings.metrics, "settings.metrics", cfg, "set it to null"))
        if cfg.settings.agent is not None:
            check(lambda: _bindable(cfg.settings.agent.listen, "settings.agent.listen", cfg,  # type: ignore[union-attr]
                                    "remove settings.agent"))
    images: ImageSource | None = ImageSource(cfg.settings.state_dir, cfg.settings.images)
    for svc in cfg.services:
        if svc.seccomp.startswith("/") and not Path(svc.seccomp).is_file():
            problems.append(ConfigError(f"{cfg.path}: services.{svc.name}.seccomp: {svc.seccomp} does not exist"))
        if images is not None:
            try:
                _check_image(cfg, svc, images)
            except PreflightError as e:  # no engine at that address: nothing else about images can be said
                problems.append(ActivatorError(f"{cfg.path}: settings.images: {e}"))
                images = None
            except ActivatorError as e:
                problems.append(e)
            except Exception as e:  # the engine stopped answering midway: said, not fatal (the daemon waits too)
                warnings.append(f"services.{svc.name}.image: not checked, the {cfg.settings.images.name} engine "
                                f"did not answer ({type(e).__name__})")
        for addr in svc.listen:
            if (svc.name, str(addr)) not in held:
                check(lambda a=addr, s=svc: bind_listener(a, s, cfg).close())  # type: ignore[misc]
        for i, v in enumerate(svc.volumes):
            if v.external:
                check(lambda v=v: volumes.docker_volume(v.source), f"services.{svc.name}.volumes[{i}]",  # type: ignore[misc]
                      lambda text: text.removeprefix("volumes: "))
            if v.chown or v.idmap:  # what `run` refuses before it makes anything
                check(lambda v=v, s=svc: volumeowner.check(Path(v.source), cfg.settings.state_dir,  # type: ignore[misc]
                                                           "U" if v.chown else "idmap", s.name),
                      f"services.{svc.name}.volumes[{i}]")
        if svc.handoff and not cgroups.direct():
            warnings.append(f"services.{svc.name}.handoff: warning: this host cannot hand off (restores through CRIU "
                            "directly need cgroup v1 device files or a kernel that loads a v2 device program): "
                            "`run` serves it through the activator's other paths instead")
    if problems:
        raise combined(problems)
    return warnings


def _check_state_dir(cfg: Config) -> None:
    """state_dir, or the first of its parents that exists, is a directory (else `run` fails making its layout)."""
    for d in (cfg.settings.state_dir, *cfg.settings.state_dir.parents):
        if d.exists() or d.is_symlink():
            if not d.is_dir():
                raise ActivatorError(f"{cfg.path}: settings.state_dir: {d} is not a directory; remove what is in "
                                     "the way or pick another path")
            if full := statedir.check_space(cfg.settings.state_dir):
                raise ActivatorError(f"{cfg.path}: settings.state_dir: {full}")
            return


def _bindable(addr: Any, key: str, cfg: Config, other: str) -> None:
    """A TCP address the daemon listens on itself (metrics, agent) is free, as `run` needs it at start."""
    import socket

    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr.host, addr.port))
            s.listen(1)
        except OSError as e:
            raise ActivatorError(f"{cfg.path}: {key}: cannot listen on {addr}: {e.strerror}; pick another address "
                                 f"or {other}") from None


def _check_image(cfg: Config, svc: ServiceConfig, images: Any) -> None:
    """The service's image is in the engine, and the user it runs as is in the image's /etc/passwd (and group)."""
    import tempfile

    from activator.checkpoints.images import resolve_user

    try:
        image = images.resolve(svc.image, svc.name)
    except PreflightError:
        raise
    except ActivatorError as e:
        raise ActivatorError(f"{cfg.path}: services.{svc.name}.image: {str(e).split(': ', 1)[-1]}") from None
    user = svc.user if svc.user is not None else image.user
    name, _, group = user.partition(":")
    if name.isdigit() and (not group or group.isdigit()):
        return  # numbers need no lookup
    with tempfile.TemporaryDirectory(prefix="activator-validate-") as tmp:
        if not images.account_files(image, Path(tmp)):
            return
        try:
            resolve_user(Path(tmp), user, svc.name)
        except ActivatorError as e:
            problem = str(e).split(": ", 1)[-1]
            raise ActivatorError(
                f"{cfg.path}: services.{svc.name}.user: {problem}; name a user the image has, or a number"
                if svc.user is not None else
                f"{cfg.path}: services.{svc.name}.image: its USER {user!r}: {problem}; set user: to one it has"
            ) from None


def cmd_schema(args: argparse.Namespace) -> int:
    from activator.config.document import json_schema
    from activator.core import reference

    if args.markdown:
        sys.stdout.write(reference.markdown())
        return 0
    print(json.dumps(json_schema(), indent=2))
    return 0
