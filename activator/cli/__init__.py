"""Command line: `activator run|validate|reload|status|top|wake|stop|start|scale|logs|inspect|checkpoint|cleanup|
schema`. The services file is `-c FILE` (default /etc/activator/config.yaml), before or after the command.

Errors a user can cause come out as one line, `activator: error: ...`, and a non-zero exit (2 for a bad config,
1 otherwise); never a traceback. Anything else is a bug: it is reported in one line too, with exit code 70, and
its traceback is shown with --log-level debug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activator import __version__, statedir
from activator.config.document import Config
from activator.config.parse import load_config
from activator.config.settings import Settings
from activator.errors import ActivatorError, ConfigError, one_line
from activator.errors import terminal_safe as terminal_safe  # where tests and callers have found it

from .checkpoint import CHECKPOINT_VERBS, CHECKPOINT_WHAT, KEY_VERBS, checkpoint_argv, cmd_checkpoint, cmd_keys
from .cleanup import cmd_cleanup
from .control import cmd_control, cmd_reload, reload_refused
from .inspection import cmd_inspect, inspect_image, names_an_image
from .logformat import setup_logging
from .observe import cmd_logs, cmd_status, refresh_count, refresh_interval
from .run import cmd_run
from .validate import cmd_schema, cmd_validate

__all__ = ["CHECKPOINT_VERBS", "DEFAULT_CONFIG", "build_parser", "checkpoint_argv", "main", "terminal_safe"]

log = logging.getLogger("activator")

DEFAULT_CONFIG = "/etc/activator/config.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="activator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"activator {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one JSON object per line (time, level, logger, message, service, instance)")

    def config_option(parser: argparse.ArgumentParser) -> None:
        # SUPPRESS: given before the command or after it, whichever was given counts (main() fills the default)
        parser.add_argument("-c", "--config", default=argparse.SUPPRESS,
                            help=f"the services file (default {DEFAULT_CONFIG})")

    config_option(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[Config, argparse.Namespace], int] | None, help: str,
            under: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = under.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        config_option(sp)
        sp.set_defaults(fn=fn)
        return sp

    add("run", cmd_run, "listen on every service's addresses and restore instances on demand")
    v = add("validate", cmd_validate, "check a services file as `run` would at start, without starting anything: "
            "the file (every problem, one line each), the binaries and state_dir, each image and its user, each "
            "listen, metrics and agent address free (or the running daemon's), each profile, volume and key; then "
            "each service's addresses, and what a reload of the running daemon would change")
    v.add_argument("file", nargs="?", help="services YAML file (same as -c)")
    v.add_argument("--file-only", action="store_true",
                   help="check the file alone (what the unit's ExecStartPre does: its sockets may be systemd's)")
    add("reload", cmd_reload, "make the running daemon re-read its services file (what SIGHUP does), and say "
        "what changed")
    status = add("status", cmd_status, "show the running daemon's services, instances and checkpoints")
    status.add_argument("--json", action="store_true", help="machine-readable output ({\"running\": false, ...} "
                                                            "when no daemon answers)")
    status.add_argument("--watch", "-w", action="store_true",
                        help="a live view like `docker stats`: services, instances, connections, starts per second, "
                             "memory and CPU, refreshed every --interval seconds until Ctrl-C (also `activator top`)")
    top = add("top", cmd_status, "the running daemon's live view (status --watch)")
    top.set_defaults(watch=True, json=False)
    for p_ in (status, top):
        p_.add_argument("--interval", type=refresh_interval, default=1.0, help="seconds between refreshes (default 1)")
        p_.add_argument("--count", type=refresh_count, default=None, help="stop after this many refreshes")
    for verb, text in (("wake", "restore an instance of a service now, without a client"),
                       ("stop", "stop serving a service (connections refused, instances drained and stopped) "
                                "until `activator start`, without editing the file"),
                       ("start", "serve a stopped service again")):
        add(verb, cmd_control, text).add_argument("service", help="a service's name in the file")
    sc = add("scale", cmd_control, "restore instances of a service now until N are up (at most max_instances)")
    sc.add_argument("service", help="a service's name in the file")
    sc.add_argument("instances", type=int, metavar="N", help="how many instances to have running")
    logs = add("logs", cmd_logs, "show an app's output: its reaped instances' (kept in state_dir/logs) and its "
               "running ones'")
    logs.add_argument("service", help="a service's name in the file")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what the instances write")
    logs.add_argument("--raw", action="store_true", help="the app's bytes as it wrote them (control characters "
                      "and escape sequences included: not for a terminal)")
    ins = add("inspect", cmd_inspect, "show what a service's checkpoint holds and what it was built from; or a "
              "checkpoint image's (an archive FILE or a registry REF: no services file needed)")
    ins.add_argument("service", metavar="SERVICE | FILE | REF")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ck = add("checkpoint", cmd_checkpoint, "build a service's checkpoint if missing or stale (`checkpoint SERVICE` "
             "is `checkpoint build SERVICE`); move one between hosts (export, import, push, pull: an OCI image, "
             "through a file or settings.checkpoint_registry); make and use signing keys (keygen, sign)")
    verbs = ck.add_subparsers(dest="verb", required=True, metavar="VERB")
    what_help = {"SERVICE": "a service of the services file", "FILE": "a checkpoint archive",
                 "PATH": "where the private key goes (the public one beside it, PATH.pub)"}
    for verb, text in (
            ("build", "build a service's checkpoint if it is missing or stale (through the running daemon if there "
                      "is one)"),
            ("export", "write a service's checkpoint to an OCI image archive, signed with --key or "
                       "settings.checkpoint_trust.sign_key"),
            ("import", "install a checkpoint archive made on another host, once its signature and contents are "
                       "checked"),
            ("push", "push a service's checkpoint to settings.checkpoint_registry"),
            ("pull", "pull a service's checkpoint from settings.checkpoint_registry"),
            ("keygen", "make an Ed25519 signing key for checkpoints (no services file needed)"),
            ("sign", "sign a checkpoint archive (no services file needed with --key)")):
        vp = add(verb, cmd_checkpoint, text, verbs)
        what = CHECKPOINT_WHAT[verb]
        vp.add_argument("what", nargs="?", metavar=what, help=what_help[what])
        vp.set_defaults(rebuild=False, output=None, service=None, key=None)
        if verb == "build":
            vp.add_argument("--rebuild", action="store_true", help="rebuild even if current")
        if verb == "export":
            vp.add_argument("-o", "--output", help="the archive to write (an OCI image archive, skopeo's oci-archive)")
        if verb == "import":
            vp.add_argument("--service", help="the service it is for, if not the one it was exported from")
        if verb in ("export", "sign"):
            vp.add_argument("--key", help="the private key to sign with (default: settings.checkpoint_trust."
                                          "sign_key)")
    add("cleanup", cmd_cleanup, "remove instances, mounts and namespaces left by a crashed run")
    schema = add("schema", None, "print the JSON Schema of the services file (for editors), or with --markdown "
                 "the configuration reference")
    schema.add_argument("--markdown", action="store_true",
                        help="print the configuration reference instead (docs/configuration.md): every key's type, "
                             "default, range, an example, and whether a change takes a reload, a checkpoint rebuild "
                             "or a restart")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(checkpoint_argv(sys.argv[1:] if argv is None else argv))
    if not hasattr(args, "config"):
        args.config = DEFAULT_CONFIG
    setup_logging(args.log_level, args.log_format)
    loaded: Config | None = None  # for a full disk's line: whose state_dir
    try:
        if args.fn is None:
            return cmd_schema(args)
        if not Path(args.config).exists() and not getattr(args, "file", None):
            if args.fn is cmd_checkpoint and args.verb in KEY_VERBS and (args.verb == "keygen" or args.key):
                return cmd_keys(None, args)
            if args.fn is cmd_inspect and names_an_image(args.service):
                return inspect_image(None, args.service, args.json)
        try:
            cfg = load_config(getattr(args, "file", None) or args.config)
            loaded = cfg
        except ConfigError as e:
            if args.fn not in (cmd_status, cmd_reload):
                raise
            # status: the daemon is fine, the file is only needed to find it. reload: the daemon reads the file
            # itself, refuses it, logs it and counts it (activator_reloads_total{result="refused"}).
            if args.fn is cmd_reload:
                return reload_refused(args, e)
            print(f"activator: warning: {e}", file=sys.stderr)
            return int(args.fn(None, args))
        return int(args.fn(cfg, args))
    except ConfigError as e:
        for line in e.lines:
            print(f"activator: error: {line}", file=sys.stderr)
        return 2
    except ActivatorError as e:
        for line in e.lines:
            print(f"activator: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A full disk can meet any write (a state file, an unpacked layer, a dump): the operator's problem, said
        # as such wherever it happened; the daemon's startup has already stopped what it started.
        if (full := statedir.out_of_space(loaded.settings.state_dir if loaded else Settings().state_dir, e)):
            log.debug("no space", exc_info=e)
            print(f"activator: error: {full}", file=sys.stderr)
            return 1
        log.debug("internal error", exc_info=e)
        detail = one_line(" ".join(str(e).split())[:200])
        print(f"activator: internal error (a bug): {type(e).__name__}: {detail}; run with --log-level debug "
              "for the traceback", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
