"""Command line: `activator run|validate|reload|status|top|wake|stop|start|scale|logs|inspect|checkpoint|cleanup|
schema`. The services file is `-c FILE` (default /etc/activator/config.yaml), before or after the command.

Errors a user can cause come out as one line, `activator: error: ...`, and a non-zero exit (2 for a bad config,
1 otherwise); never a traceback. Anything else is a bug: it is reported in one line too, with exit code 70, and
its traceback is shown with --log-level debug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from . import __version__, statedir
from .config.document import Config
from .config.parse import load_config
from .config.service import ServiceConfig
from .config.settings import Settings
from .core import liveview
from .errors import ActivatorError, ConfigError, PreflightError, combined, escape, one_line
from .errors import terminal_safe as terminal_safe  # where tests and callers have found it
from .runtime import preflight

log = logging.getLogger("activator")


_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _Escaped(logging.Filter):
    """Every log message on one line, whatever it quotes (an app's, an image's or a client's words): escaped by
    the filter the CLI's own output uses (errors.escape)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = one_line(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


class _JournalPriority(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers: time, level, logger, message, and the message's own
    `key=value` fields (service=, instance=) as fields of their own."""

    FIELDS = re.compile(r"\b(service|instance)=([^\s,;:]+)")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        out |= {k: v for k, v in self.FIELDS.findall(message)}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _setup_logging(level: str, fmt_name: str = "text") -> None:
    """One line per event. Under journald (JOURNAL_STREAM is set) each line starts with its syslog priority,
    `<3>` and so on, which journald turns into the entry's level and strips; it adds its own timestamps.
    Anywhere else (a terminal, a pipe, a file) each line has its own timestamp. `--log-format json`: one JSON
    object per line, anywhere."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Escaped())
    if fmt_name == "json":
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
        return
    if os.environ.get("JOURNAL_STREAM"):
        handler.addFilter(_JournalPriority())
        fmt = "<%(priority)d>%(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _run(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_factory())


def cmd_validate(cfg: Config, args: argparse.Namespace) -> int:
    """What `run` would refuse at start, refused here, every problem on its line; what the file would make the
    daemon do (each service's addresses, what a reload would change) said."""
    from .daemon import control
    from .statedir import StateDir

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
        raise ActivatorError(f"a reload of it would be refused: {_daemon_said(e, sock)}") from None
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
    from .checkpoints.host import load_trust
    from .checkpoints.images import ImageSource
    from .daemon import control
    from .daemon.listeners import bind_listener
    from .runtime import cgroups, volumeowner, volumes

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

    from .checkpoints.images import resolve_user

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


def _daemon_said(e: ActivatorError, sock: object) -> str:
    return str(e).removeprefix(f"{sock}: ")


def cmd_reload(cfg: Config | None, args: argparse.Namespace) -> int:
    """What `systemctl reload` runs: the daemon re-reads its own file and says what it changed, or why not."""
    from .daemon import control
    sock = _control_socket(cfg, args.config)
    _same_file_as_the_daemon(sock, args.config)
    try:
        r = control.request(sock, "reload", timeout=120)
    except control.NotRunning:
        raise  # its own message says how to start one
    except ActivatorError as e:
        raise ActivatorError(f"reload refused, the running configuration stays: {_daemon_said(e, sock)}") from None
    print(f"reloaded {r['config']}: {'; '.join(r['changes'])}")
    return 0


def _same_file_as_the_daemon(sock: Any, path: str) -> None:
    """A daemon re-reads only the file it was started with: asked with another one (same state dir), it would
    apply its own and the operator would believe theirs was. Refused, naming both. A daemon that was given a
    relative path is not second-guessed (its working directory is not ours); its answer names its file."""
    from .daemon import control

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


def _reload_refused(args: argparse.Namespace, local: ConfigError) -> int:
    """The file does not parse here: the running daemon is asked anyway, so its log and metrics say so too. One
    line: the daemon's refusal, or (no daemon) what is wrong with the file."""
    from .daemon import control

    said: ActivatorError = local
    try:
        cmd_reload(None, args)
    except control.NotRunning:
        pass
    except ActivatorError as e:
        said = e
    print(f"activator: error: {said}", file=sys.stderr)
    return 2


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from .daemon.server import Activator

    def announce(act: Activator) -> None:
        if cfg.settings.metrics:
            print(f"activator: metrics on http://{cfg.settings.metrics}/metrics", flush=True)

    def service(svc: ServiceConfig, problem: str | None) -> None:
        # svc has the addresses of `listen: systemd` sockets filled in
        for addr in svc.listen:
            print(f"activator: {svc.name} ready on {addr}" if problem is None else
                  f"activator: {svc.name} NOT serving on {addr}: no checkpoint ({problem})", flush=True)

    async def main() -> int:
        act = Activator(cfg, on_ready=announce, on_service=service)
        await act.serve()
        return 1 if act.teardown_failures else 0  # each failed cleanup step was logged

    return _run(main)


TRANSFER_VERBS = ("export", "import", "push", "pull")
#: checkpoint verbs about keys and signatures: no services file needed when the key is named on the command line
KEY_VERBS = ("keygen", "sign")
#: `inspect` of an archive not signed by a key trusted here: its layer is unpacked up to this, and its CRIU images
#: (pages aside) decoded only if each is at most INSPECT_IMAGE (a crafted one could inflate or nest without end)
INSPECT_UNTRUSTED = 256 * 2**20
INSPECT_IMAGE = 8 * 2**20
CHECKPOINT_VERBS = ("build", *TRANSFER_VERBS, *KEY_VERBS)
#: what each checkpoint verb takes
CHECKPOINT_WHAT = {"build": "SERVICE", "export": "SERVICE", "import": "FILE", "push": "SERVICE", "pull": "SERVICE",
                   "keygen": "PATH", "sign": "FILE"}
DEFAULT_CONFIG = "/etc/activator/config.yaml"


def cmd_keys(cfg: Config | None, args: argparse.Namespace) -> int:
    """`checkpoint keygen PATH` and `checkpoint sign FILE [--key KEY]`."""
    from .checkpoints import ociarchive, signing, transfer

    verb, what = args.verb, args.what
    if what is None:
        raise ActivatorError(f"usage: activator checkpoint {verb} {'PATH' if verb == 'keygen' else 'FILE --key KEY'}")
    if verb == "keygen":
        pub, kid = signing.generate(Path(what).absolute())
        print(f"{what}: signing key {kid} (keep it on the builder host only, mode 0600); its public key is {pub}:"
              " list it in settings.checkpoint_trust.keys on every host that imports or pulls")
        return 0
    where = f"{cfg.path}: settings.checkpoint_trust" if cfg is not None else "--key"
    key_path = Path(args.key) if args.key else (cfg.settings.checkpoint_trust.sign_key if cfg is not None else None)
    if key_path is None:
        raise ActivatorError("activator checkpoint sign: name the key (--key KEY, or settings.checkpoint_trust."
                             "sign_key)")
    key = signing.load_private(key_path.absolute(), where)
    archive = Path(what).absolute()
    image = ociarchive.read(archive)
    sig = signing.sign(key, image.digest)
    transfer.seal(archive, sig)
    print(f"{what}: signed by {sig.key} (image {image.digest[:19]})")
    return 0


def cmd_checkpoint(cfg: Config, args: argparse.Namespace) -> int:
    verb, what = args.verb, args.what
    if what is None:  # `checkpoint export` where export is a service's name: built, as before verbs existed
        if verb != "build" and any(s.name == verb for s in cfg.services):
            return _checkpoint_build(cfg, args, verb)
        raise ActivatorError(f"usage: activator checkpoint {verb} {CHECKPOINT_WHAT[verb]}"
                             + (" -o FILE" if verb == "export" else ""))
    if verb in KEY_VERBS:
        return cmd_keys(cfg, args)
    if verb in TRANSFER_VERBS:
        return _checkpoint_transfer(cfg, args, verb, what)
    return _checkpoint_build(cfg, args, what)


def checkpoint_argv(argv: list[str]) -> list[str]:
    """`checkpoint SERVICE` (the verb left out) is `checkpoint build SERVICE`, and options written between
    `checkpoint` and its verb (`checkpoint -c FILE export SERVICE`) go after the verb: both as the command line
    was before the verbs were sub-commands."""
    valued = {"-c", "--config", "-o", "--output", "--service", "--key", "--log-level", "--log-format"}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in valued else 1
    if i >= len(argv) or argv[i] != "checkpoint":
        return argv
    head, rest = argv[:i + 1], argv[i + 1:]
    j = 0
    while j < len(rest) and rest[j].startswith("-") and rest[j] not in ("-h", "--help"):
        j += 2 if rest[j] in valued else 1
    if j >= len(rest) or rest[j].startswith("-"):
        return argv  # nothing after it, or --help: argparse says what it takes
    verb = rest[j] if rest[j] in CHECKPOINT_VERBS else "build"
    return [*head, verb, *rest[:j], *rest[j + (verb == rest[j]):]]


def _checkpoint_build(cfg: Config, args: argparse.Namespace, name: str) -> int:
    from .checkpoints.host import open_host
    from .daemon import control
    from .statedir import StateDir

    svc = cfg.service(name)
    sock = StateDir.of(cfg).control_socket
    if sock.exists():
        # A daemon runs on this state dir: it does the rebuild itself, so its instances are not disturbed.
        try:
            if not args.rebuild:
                control.request(sock, "status")  # only if it really answers
                print(f"{svc.name}: checkpoint is in use by the running activator (use --rebuild to replace it)")
                return 0
            r = control.request(sock, f"rebuild {svc.name}", timeout=600)
            print(f"{svc.name}: checkpoint rebuilt by the running activator in {r['build_seconds']:.1f}s: {r['dir']} "
                  f"(listens on {', '.join(map(str, r['listening_ports']))}; {r['pages_bytes'] / 2**20:.1f} MiB of "
                  "pages); new instances use it, running ones finish on the old one")
            return 0
        except control.NotRunning:
            pass  # a socket file a dead run left: build here

    async def main() -> int:
        state = StateDir.of(cfg)
        builder = None
        pushed = ""
        try:
            builder = open_host(state, cfg).builder
            ck = None if args.rebuild else await builder.current(svc)
            source = "stored"
            if ck is None:  # a build: the template runs on the instance network (a current one touches nothing)
                if builder.network is not None and svc.network == "bridge":
                    await asyncio.to_thread(builder.network.open)
                ck, source = await builder.ensure(svc, rebuild=args.rebuild)
            builder.store.sweep_retired(svc.name)  # no daemon holds the lock, so no instance uses the old one
            if source == "built" and builder.exchange.shares(svc):
                pushed = await builder.exchange.push(svc)
        finally:
            if builder is not None and builder.network is not None:
                await asyncio.to_thread(builder.network.close)  # undoes only what open() made, if it ran
            state.unlock()
        verb = {"built": f"built in {ck.build_seconds:.1f}s", "pulled": "pulled from the checkpoint registry",
                "stored": "is current"}[source]
        print(f"{svc.name}: checkpoint {verb}: {ck.dir} (listens on {', '.join(map(str, ck.listening_ports))}; "
              f"{ck.pages_bytes / 2**20:.1f} MiB of pages){f'; pushed to {pushed}' if pushed else ''}")
        return 0

    return _run(main)


def _checkpoint_transfer(cfg: Config, args: argparse.Namespace, verb: str, what: str) -> int:
    """export/import/push/pull: by the running daemon if there is one (it owns the store), else here."""
    from .checkpoints import ociarchive, signing, transfer
    from .checkpoints.host import open_host
    from .daemon import control
    from .statedir import StateDir

    if args.key and verb != "export":
        raise ActivatorError(f"activator checkpoint {verb}: --key is for export and sign")
    # Read (and checked) before anything is exported: a daemon that runs exports, and the archive is sealed here.
    key = signing.load_private(Path(args.key).absolute(), "--key") if args.key else None
    if verb == "export":
        if not args.output:
            raise ActivatorError(f"usage: activator checkpoint export {what} -o FILE")
        target = str(Path(args.output).absolute())
        if any(c.isspace() for c in target):
            raise ActivatorError(f"{target}: choose a path without spaces")
    if verb == "import":
        target = str(Path(what).absolute())
        image = ociarchive.read(Path(target))
        svc = transfer.service_of(image, cfg, args.service)
        if any(c.isspace() for c in target):
            raise ActivatorError(f"{target}: choose a path without spaces")
    else:
        svc = cfg.service(what)
    if verb in ("push", "pull") and cfg.settings.checkpoint_registry is None:
        raise ActivatorError(f"{cfg.path}: settings.checkpoint_registry is not set; add it "
                             "(e.g. {repository: registry.example:5000/activator}) to push or pull checkpoints")
    sock = StateDir.of(cfg).control_socket
    request = {"export": f"export {svc.name} {target if verb == 'export' else ''}",
               "import": f"import {target if verb == 'import' else ''} {args.service or ''}".rstrip(),
               "push": f"push {svc.name}", "pull": f"pull {svc.name}"}[verb]
    r: dict[str, Any] | None = None
    if sock.exists():
        try:
            r = control.request(sock, request, timeout=1800)
        except control.NotRunning:
            r = None  # a socket file a dead run left: do it here

    async def main() -> dict[str, Any]:
        state = StateDir.of(cfg)
        try:
            builder = open_host(state, cfg).builder
            exchange = builder.exchange
            if verb == "export":
                with_key = key or exchange.sign_key
                doc = await exchange.export(svc, Path(target), with_key)
                return {"path": target, "size": doc.size, "digest": doc.digest,
                        "signed": f"signed by {signing.key_id(with_key.public_key())}" if with_key else ""}
            if verb == "push":
                return {"ref": await exchange.push(svc)}
            if verb == "import":
                ck = await exchange.import_archive(Path(target), svc, rename=bool(args.service))
                # no daemon runs, so no instance has the one it replaced mounted: gone now, not at the next start
                await asyncio.to_thread(builder.store.sweep_retired, svc.name)
                return {"dir": str(ck.dir), "pages_bytes": ck.pages_bytes}
            wanted, image, _ = await builder.wanted(svc)
            pulled = await exchange.pull(svc, wanted, image)
            assert pulled is not None  # not quiet: an absent one is an error
            return {"dir": str(pulled.dir), "ref": exchange.registry_ref(svc, wanted)}
        finally:
            state.unlock()

    if r is None:
        t0 = time.monotonic()
        out: dict[str, Any] = {}

        async def run() -> int:
            out.update(await main())
            return 0

        _run(run)
        r = out | {"seconds": time.monotonic() - t0}
    elif verb == "export" and key is not None:  # the daemon exported it: signed here with the key named
        doc = transfer.seal(Path(target), signing.sign(key, r["digest"]))
        r |= {"size": doc.size, "signed": f"signed by {signing.key_id(key.public_key())}"}
    took = f" in {r['seconds']:.1f}s" if "seconds" in r else ""
    if verb == "export":
        signed = r.get("signed") or "UNSIGNED: hosts that import it refuse it; `activator checkpoint sign FILE`"
        print(f"{svc.name}: checkpoint exported{took} to {r['path']} ({_size(r['size'])}, {r['digest'][:19]}, "
              f"{signed})")
    elif verb == "push":
        print(f"{svc.name}: checkpoint pushed{took} to {r['ref']}")
    elif verb == "import":
        print(f"{svc.name}: checkpoint imported{took}: {r['dir']}; new instances use it")
    else:
        print(f"{svc.name}: checkpoint pulled{took} from {r['ref']}: {r['dir']}; new instances use it")
    return 0


def cmd_cleanup(cfg: Config, args: argparse.Namespace) -> int:
    from .checkpoints.host import clean_leftovers, host_network, runc_for
    from .checkpoints.images import ImageSource
    from .statedir import StateDir

    async def main() -> int:
        preflight.check_root()
        state = StateDir.of(cfg)
        state.lock()
        try:
            network = host_network(cfg)
            images = ImageSource(state.root, cfg.settings.images)
            cleaned = await clean_leftovers(state, runc_for(state), images, network)
            if network is not None:
                await asyncio.to_thread(network.close)  # the bridge and firewall rules go too: nothing runs
        finally:
            state.unlock()
        print("\n".join(cleaned) if cleaned else "nothing to clean")
        return 0

    return _run(main)


def _size(n: float) -> str:
    return liveview.size(n)


def _age(seconds: float) -> str:
    return liveview.age(seconds)


def _control_socket(cfg: Config | None, path: str) -> Any:
    """The running daemon's control socket: from the parsed file, or, when the file no longer parses (an edit
    under way), from its settings.state_dir read leniently (or the default): only the daemon is asked."""
    from .config import compose, yamlload
    from .config.settings import Settings
    from .statedir import StateDir

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


def cmd_status(cfg: Config | None, args: argparse.Namespace) -> int:
    from .daemon import control

    where = _control_socket(cfg, args.config)
    if args.watch:
        return _watch(where, cfg.path if cfg else args.config, args.interval, args.count)
    try:
        st = control.request(where, "status")
    except ActivatorError as e:
        if args.json:  # a script reading stdout gets an answer too, not nothing
            print(json.dumps({"running": False, "socket": str(where), "error": str(e)}, indent=2))
        raise
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"activator pid {st['pid']}, up {_age(st['uptime_seconds'])}, {cfg.path if cfg else args.config}"
          f"{'' if st['ready'] else ' (starting: checkpoints not all ready)'}")
    if st.get("retiring"):
        print(f"old definitions finishing their connections after a reload: {', '.join(st['retiring'])}")
    for svc in st["services"]:
        ck = svc["checkpoint"]
        ck_text = f"checkpoint {_age(ck['age_seconds'])} old, {_size(ck['pages_bytes'])} of pages" if ck else \
            "no checkpoint yet"
        extra = []
        if svc["waiting"]:
            extra.append(f"{svc['waiting']} waiting")
        if svc["starting"]:
            extra.append(f"{svc['starting']} starting")
        if svc["backoff_seconds"]:
            extra.append(f"backing off {svc['backoff_seconds']:.1f}s")
        if svc["restore_backoff_seconds"]:
            extra.append(f"restores backing off {svc['restore_backoff_seconds']:.1f}s")
        if svc.get("handoff"):
            extra.append("handoff (its apps accept from its socket)")
        if svc.get("depends_on"):
            extra.append(f"depends on {', '.join(svc['depends_on'])}")
        if svc.get("kept_for"):
            extra.append(f"kept for {', '.join(svc['kept_for'])}")
        if svc.get("stopped"):
            extra.append(f"STOPPED (activator stop): connections refused until `activator start {svc['name']}`")
        if svc.get("checkpoint_problem"):
            extra.append(f"NO CHECKPOINT, connections refused, next build in {svc['checkpoint_retry_seconds']:.0f}s: "
                         f"{svc['checkpoint_problem']}")
        print(f"\n{svc['name']}  on {' '.join(svc['listen'])}  {len(svc['instances'])}/{svc['max_instances']} "
              f"instance(s), {svc['open_connections']} open connection(s); {ck_text}"
              + (f"; {', '.join(extra)}" if extra else ""))
        if svc["instances"]:
            print(f"  {'INSTANCE':<22} {'HOW':<10} {'AGE':>6} {'CONNS':>6} {'SERVED':>7} {'START':>9}")
        for i in svc["instances"]:
            ms = i["start_ms"]
            print(f"  {i['name']:<22} {i['how']:<10} {_age(i['age_seconds']):>6} {i['connections']:>6} "
                  f"{i['served']:>7} {ms:>7.{1 if ms < 10 else 0}f}ms")
        if svc.get("standby"):
            standbys = svc.get("standbys", [])
            memory = sum(s["memory_bytes"] or 0 for s in standbys)
            print(f"  standby: {len(standbys)}/{svc['standby']} frozen, {_size(memory)} charged"
                  + (f" ({', '.join(s['name'] for s in standbys)})" if standbys else ""))
    return 0


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: refresh between 0.1 and 3600 seconds")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': a number of refreshes, at least 1")
    return int(text)


def _watch(where: Any, path: object, interval: float, count: int | None) -> int:
    """The live view: a frame every `interval` seconds, drawn over the last one on a terminal (printed one after
    another otherwise), until Ctrl-C or `count` frames."""
    from .daemon import control

    tty = sys.stdout.isatty()
    prev: dict[str, Any] | None = None
    t_prev = 0.0
    shown = 0
    try:
        while count is None or shown < count:
            st = control.request(where, "status")
            now = time.monotonic()
            header = (f"activator pid {st['pid']}, up {_age(st['uptime_seconds'])}, {path}  "
                      f"{time.strftime('%H:%M:%S')}  (every {interval:g}s{', Ctrl-C to quit' if tty else ''})")
            lines = liveview.frame(st, prev, now - t_prev, header)
            sys.stdout.write(("\x1b[H\x1b[J" if tty else "") + "\n".join(lines) + "\n" + ("" if tty else "\n"))
            sys.stdout.flush()
            prev, t_prev, shown = st, now, shown + 1
            if count is None or shown < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_logs(cfg: Config, args: argparse.Namespace) -> int:
    """An app's output: what its reaped instances wrote (kept, applog.py), then its live instances' own files;
    with -f, what they write from then on (new instances included) until interrupted."""
    from .runtime import applog
    from .statedir import StateDir

    svc = cfg.service(args.service)  # a one-line error naming the known services
    state = StateDir.of(cfg)
    # Escaped wherever it goes (a pipe often ends on a terminal: `| tail`); --raw for the bytes as written.
    out = sys.stdout.buffer if args.raw else _TerminalSafe(sys.stdout.buffer)

    def live() -> list[Path]:
        if not state.instances.is_dir():
            return []
        return sorted((d / "output.log" for d in state.instances.iterdir()
                       if applog.owner(d) == svc.name and not (d / "slot").exists()
                       and (d / "output.log").is_file()), key=lambda p: p.stat().st_mtime)

    for path in applog.kept(state.logs, svc.name):
        with open(path, "rb") as f:
            shutil.copyfileobj(f, out)
        out.flush()
    offsets: dict[Path, int] = {}
    while True:
        for path in live():
            try:
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    data = f.read(1 << 20)
            except OSError:  # reaped meanwhile: its output is in the kept file now
                continue
            if data:
                if path not in offsets:
                    out.flush()
                    out.write(f"--- {path.parent.name} (running) ---\n".encode())
                out.write(data)
                out.flush()
            offsets[path] = offsets.get(path, 0) + len(data)
        if not args.follow:
            out.flush()
            return 0
        time.sleep(0.5)


def cmd_control(cfg: Config, args: argparse.Namespace) -> int:
    """activator wake|scale|stop|start SERVICE: asks the running daemon (root only, over its control socket)."""
    from .daemon import control
    from .statedir import StateDir

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


class _TerminalSafe:
    """A binary stream shown through errors.terminal_safe; a UTF-8 character split between two writes is held
    until its end arrives (else both halves would be shown escaped)."""

    def __init__(self, raw: Any) -> None:
        import codecs

        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def write(self, data: bytes) -> int:
        self.raw.write(escape(self.decoder.decode(data), keep="\n\t").encode())
        return len(data)

    def flush(self) -> None:
        self.raw.write(escape(self.decoder.decode(b"", final=True), keep="\n\t").encode())
        self.raw.flush()


def _say(line: str) -> None:
    """A line of `activator inspect`: what it shows comes from an archive or an app (annotations, file names,
    process names, mapped paths), so every line is escaped (errors.escape), whoever wrote it."""
    print(one_line(line))


def _names_an_image(what: str) -> bool:
    """An archive file or a registry reference, not a service name (those have neither '/' nor ':')."""
    return Path(what).exists() or "/" in what or ":" in what


def _inspect_image(cfg: Config | None, what: str, as_json: bool) -> int:
    """A checkpoint image, from an archive file or a registry reference, made by activator or not."""
    import tempfile

    from .checkpoints import ociarchive, signing, transfer
    from .checkpoints.registry import Registry
    from .checkpoints.store import contents
    from .config.settings import RegistrySettings

    with tempfile.TemporaryDirectory(prefix="activator-inspect-") as tmp:
        pulled_sig: signing.Signature | None = None
        if Path(what).exists():
            image = ociarchive.read(Path(what))
        elif what.startswith(("/", ".")):  # a path, never a registry reference
            raise ActivatorError(f"{what}: no such file")
        else:
            settings = (cfg.settings.checkpoint_registry if cfg is not None else None) or \
                RegistrySettings(repository="localhost/unused")
            if not Registry(settings).pull(what, Path(tmp, "image.tar")):
                raise ActivatorError(f"{what}: no such file, and the registry has no such image")
            image = ociarchive.read(Path(tmp, "image.tar"))
            with contextlib.suppress(ActivatorError):  # no signature beside it: shown as unsigned
                if Registry(settings).pull(what + transfer.SIG_SUFFIX, Path(tmp, "sig.tar")):
                    pulled_sig = transfer.signature_of(Path(tmp, "sig.tar"), what)
        a = image.annotations
        d = transfer.describe(a)
        # The signature first: an image signed by a key trusted here is unpacked as an import would; any other
        # (this is the command one runs on an untrusted archive) within a small bound, and its CRIU images are
        # decoded only if each is small, so that a crafted archive cannot fill the disk or the memory.
        trust, trust_problem = None, ""
        if cfg is not None and cfg.settings.checkpoint_trust.keys:
            t = cfg.settings.checkpoint_trust
            try:
                trust = signing.Trust.load(t.keys, t.insecure_unsigned, f"{cfg.path}: settings.checkpoint_trust")
            except ActivatorError as e:
                trust_problem = str(e)
        trusted = False
        try:
            signature = pulled_sig or signing.of_annotations(image.envelope, what)
            signed = signing.describe(signature, image.digest, trust)
            trusted = trust is not None and signature is not None and signed.endswith(", trusted here")
        except signing.SignatureError:
            signed = "a malformed signature (refused on import)"
        if trust_problem:
            signed += f" (not checked: settings.checkpoint_trust is unusable: {trust_problem})"
        held: dict[str, Any] = {}
        if d["engine.name"]:  # a checkpoint image: what its layer holds (Podman's and ours keep CRIU's in checkpoint/)
            layer = Path(tmp, "layer")
            layer.mkdir()
            try:
                ociarchive.unpack_layer(image, layer, max_bytes=transfer.MAX_LAYER if trusted else INSPECT_UNTRUSTED)
                held["files"] = sorted(p.name + ("/" if p.is_dir() else "") for p in layer.iterdir())
                dump = layer / "checkpoint"
                small = all(f.stat().st_size <= INSPECT_IMAGE for f in dump.glob("*.img")
                            if not f.name.startswith("pages-"))
                if (dump / "pstree.img").exists() and (trusted or small):
                    held |= contents(dump)
            except ImportError:
                pass  # no pycriu: the annotations are still worth showing
            except ActivatorError as e:
                held["unread"] = str(e).split(": ", 1)[-1]
            except Exception as e:  # pycriu raises whatever its decoder meets in a crafted file
                held["unread"] = f"its CRIU images do not decode ({type(e).__name__})"
        info = {"source": what, "digest": image.digest, "ref": image.ref, "layers": [vars(b) for b in image.layers],
                "size": image.size, "annotations": a, "described": d, "signature": signed,
                "architecture": image.config.get("architecture", ""), **held}
        if as_json:  # ensure_ascii: every control character and non-ASCII character is a \\u escape
            print(json.dumps(info, indent=2))
            return 0
        engine = d["engine.name"]
        _say(f"{what}: {'checkpoint image' if engine else 'OCI image (no checkpoint annotations)'} {image.digest}")
        _say(f"  made by    {engine or '?'} {d['engine.version']}; container {d['container.name'] or '?'}; "
              f"created {a.get('org.opencontainers.image.created', image.config.get('created', '?'))}")
        _say(f"  from       image {d['rootfsImageName'] or '?'} ({d['rootfsImageID'][:19] or '?'})")
        _say(f"  made on    {d['host.arch'] or '?'}, kernel {d['host.kernel'] or '?'}, "
              f"CRIU {d['criu.version'] or '?'}, {d['runtime.name'] or '?'} {d['runtime.version']}, "
              f"cgroup {d['cgroup.version'] or '?'}, "
              f"{d['distribution.name']} {d['distribution.version']}")
        _say(f"  signature  {signed}")
        _say(f"  size       {_size(image.size)} in {len(image.layers)} layer(s) "
              f"({', '.join(b.media_type.rsplit('.', 1)[-1] for b in image.layers)})")
        if held.get("files"):
            _say(f"  holds      {' '.join(held['files'])}")
        if held.get("unread"):
            _say(f"  contents   not shown: {held['unread']}")
        if engine and engine != transfer.ENGINE:
            _say(f"  serving    not by activator: made by {engine} (docs/multi-host.md says what it would take)")
        for k in sorted(a):
            if k.startswith(transfer.OWN):
                _say(f"  {k.removeprefix(transfer.OWN):<10} {a[k]}")
        if held.get("processes"):
            _say("  processes  PID  PPID  THREADS  VMAS  COMM")
            for p in held["processes"]:
                _say(f"             {p['pid']:>3} {p['ppid']:>5} {p['threads']:>8} {p['vmas']:>5}  {p['comm']}")
    return 0


def cmd_inspect(cfg: Config, args: argparse.Namespace) -> int:
    from .checkpoints.store import CheckpointStore, contents
    from .statedir import StateDir

    if not any(s.name == args.service for s in cfg.services) and _names_an_image(args.service):
        return _inspect_image(cfg, args.service, args.json)
    svc = cfg.service(args.service)
    ck = CheckpointStore(StateDir.of(cfg)).load(svc.name)
    if ck is None:
        raise ActivatorError(
            f"service '{svc.name}' has no checkpoint in {cfg.settings.state_dir}; "
            f"build one with `activator checkpoint {svc.name}` (or start `activator run`)"
        )
    try:
        held = contents(ck.images)
    except ImportError:
        raise ActivatorError("reading a checkpoint needs pycriu, which is not installed in this Python; "
                             "run 'make setup' (as root) to install it") from None
    except (OSError, KeyError, IndexError) as e:
        raise ActivatorError(f"service '{svc.name}': cannot read checkpoint {ck.images}: {e}; "
                             f"rebuild it with `activator checkpoint {svc.name} --rebuild`") from None
    current = ck.origin.service_fingerprint == svc.checkpoint_fingerprint()
    info = {
        "service": svc.name, "dir": str(ck.dir), "created": ck.created, "build_seconds": ck.build_seconds,
        "matches_config": current, "provenance": ck.provenance or "built here",
        "origin": vars(ck.origin), "process": {"args": list(ck.process.args),
                                                                          "cwd": ck.process.cwd,
                                                                          "uid": ck.process.uid},
        **held,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    o = ck.origin
    _say(f"{svc.name}: checkpoint {ck.dir}")
    _say(f"  built      {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ck.created))} "
          f"in {ck.build_seconds:.1f}s; {'matches' if current else 'does NOT match'} the service definition")
    _say(f"  from       image {o.image_id}, CRIU {o.criu}, runc {o.runc}, kernel {o.kernel}")
    _say(f"  source     {ck.provenance or 'built here'}")
    _say(f"  command    {' '.join(ck.process.args)} (cwd {ck.process.cwd}, uid {ck.process.uid})")
    _say(f"  listening  {', '.join(map(str, held['listening_ports'])) or 'nothing'}")
    _say(f"  memory     {_size(held['pages_bytes'])} of pages in {held['image_files']} image files")
    mapped = held["pages_by_mapping"]
    for label, n in mapped[:8]:
        _say(f"             {n:>7} pages {label}")
    if len(mapped) > 8:
        _say(f"             {sum(n for _, n in mapped[8:]):>7} pages in {len(mapped) - 8} other mappings")
    _say("  processes  PID  PPID  THREADS  VMAS  COMM")
    for p in held["processes"]:
        _say(f"             {p['pid']:>3} {p['ppid']:>5} {p['threads']:>8} {p['vmas']:>5}  {p['comm']}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .config.document import json_schema
    from .core import reference

    if args.markdown:
        sys.stdout.write(reference.markdown())
        return 0
    print(json.dumps(json_schema(), indent=2))
    return 0


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
        p_.add_argument("--interval", type=_interval, default=1.0, help="seconds between refreshes (default 1)")
        p_.add_argument("--count", type=_count, default=None, help="stop after this many refreshes")
    for verb, text in (("wake", "restore an instance of a service now, without a client"),
                       ("stop", "stop serving a service (connections refused, instances drained and stopped) "
                                "until `activator start`, without editing the file"),
                       ("start", "serve a stopped service again")):
        add(verb, cmd_control, text).add_argument("service")
    sc = add("scale", cmd_control, "restore instances of a service now until N are up (at most max_instances)")
    sc.add_argument("service")
    sc.add_argument("instances", type=int)
    logs = add("logs", cmd_logs, "show an app's output: its reaped instances' (kept in state_dir/logs) and its "
               "running ones'")
    logs.add_argument("service")
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
    _setup_logging(args.log_level, args.log_format)
    loaded: Config | None = None  # for a full disk's line: whose state_dir
    try:
        if args.fn is None:
            return cmd_schema(args)
        if not Path(args.config).exists() and not getattr(args, "file", None):
            if args.fn is cmd_checkpoint and args.verb in KEY_VERBS and (args.verb == "keygen" or args.key):
                return cmd_keys(None, args)
            if args.fn is cmd_inspect and _names_an_image(args.service):
                return _inspect_image(None, args.service, args.json)
        try:
            cfg = load_config(getattr(args, "file", None) or args.config)
            loaded = cfg
        except ConfigError as e:
            if args.fn not in (cmd_status, cmd_reload):
                raise
            # status: the daemon is fine, the file is only needed to find it. reload: the daemon reads the file
            # itself, refuses it, logs it and counts it (activator_reloads_total{result="refused"}).
            if args.fn is cmd_reload:
                return _reload_refused(args, e)
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
