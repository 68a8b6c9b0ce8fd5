"""The running daemon, found and asked over its control socket: reload, wake, scale, stop, start."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from activator.config.document import Config
from activator.errors import ActivatorError, ConfigError


def control_socket(cfg: Config | None, path: str) -> Any:
    """The running daemon's control socket: from the parsed file, or, when the file no longer parses (an edit
    under way), from its settings.state_dir read leniently (or the default): only the daemon is asked."""
    from activator.config import compose, yamlload
    from activator.config.settings import Settings
    from activator.statedir import StateDir

    if cfg is not None:
        return StateDir.of(cfg).control_socket
    state = Settings().state_dir
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    try:
        raw = yamlload.load(text)
    except yamlload.LoadError:  # not YAML at all any more: the line that names it, if there is one
        raw = None
        if m := re.search(r"^\s*state_dir:\s*['\"]?(/[^'\"\s#]+)", text, re.M):
            state = Path(m.group(1))
    if isinstance(raw, dict):
        top = raw.get(compose.MARK) if isinstance(raw.get(compose.MARK), dict) else raw
        settings = top.get("settings") if isinstance(top, dict) else None
        if isinstance(settings, dict) and isinstance(settings.get("state_dir"), str) \
                and settings["state_dir"].startswith("/"):
            state = Path(settings["state_dir"])
    return state / "control.sock"


def daemon_said(e: ActivatorError, sock: object) -> str:
    return str(e).removeprefix(f"{sock}: ")


def cmd_reload(cfg: Config | None, args: argparse.Namespace) -> int:
    """What `systemctl reload` runs: the daemon re-reads its own file and says what it changed, or why not."""
    from activator.daemon import control
    sock = control_socket(cfg, args.config)
    _same_file_as_the_daemon(sock, args.config)
    try:
        r = control.request(sock, "reload", timeout=120)
    except control.NotRunning:
        raise  # its own message says how to start one
    except ActivatorError as e:
        raise ActivatorError(f"reload refused, the running configuration stays: {daemon_said(e, sock)}") from None
    print(f"reloaded {r['config']}: {'; '.join(r['changes'])}")
    return 0


def _same_file_as_the_daemon(sock: Any, path: str) -> None:
    """A daemon re-reads only the file it was started with: asked with another one (same state dir), it would
    apply its own and the operator would believe theirs was. Refused, naming both. A daemon that was given a
    relative path is not second-guessed (its working directory is not ours); its answer names its file."""
    from activator.daemon import control

    theirs = Path(str(control.request(sock, "status").get("config", "")))
    if not theirs.is_absolute():
        return
    try:
        same = os.path.samefile(theirs, path)
    except OSError:
        same = theirs.resolve() == Path(path).resolve()
    if not same:
        raise ActivatorError(f"reload refused: the running activator reloads only its own file {theirs}, not "
                             f"{path}; edit {theirs}, or restart activator with -c {path}")


def reload_refused(args: argparse.Namespace, local: ConfigError) -> int:
    """The file does not parse here: the running daemon is asked anyway, so its log and metrics say so too. One
    line: the daemon's refusal, or (no daemon) what is wrong with the file."""
    from activator.daemon import control

    said: ActivatorError = local
    try:
        cmd_reload(None, args)
    except control.NotRunning:
        pass
    except ActivatorError as e:
        said = e
    print(f"activator: error: {said}", file=sys.stderr)
    return 2


def cmd_control(cfg: Config, args: argparse.Namespace) -> int:
    """activator wake|scale|stop|start SERVICE: asks the running daemon (root only, over its control socket)."""
    from activator.daemon import control
    from activator.statedir import StateDir

    cfg.service(args.service)  # a one-line error naming the known services
    request = f"{args.command} {args.service}" + (f" {args.instances}" if args.command == "scale" else "")
    r = control.request(StateDir.of(cfg).control_socket, request, timeout=600)
    if args.command == "wake":
        said = f"{r['instances']} instance(s) up" + ("" if r["woken"] else " (it was awake)")
    elif args.command == "scale":
        said = f"{r['instances']} instance(s) up (max_instances {r['max_instances']})"
    elif args.command == "stop":
        said = "stopped: connections refused, no instance, until `activator start`"
    else:
        said = "serving again"
    print(f"{args.service}: {said}")
    return 0
