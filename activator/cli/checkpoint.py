"""`activator checkpoint`: build a service's checkpoint; move one between hosts (export, import, push, pull);
make and use signing keys (keygen, sign)."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from activator.config.document import Config
from activator.core.liveview import size
from activator.errors import ActivatorError

from .loop import run_async

TRANSFER_VERBS = ("export", "import", "push", "pull")
#: checkpoint verbs about keys and signatures: no services file needed when the key is named on the command line
KEY_VERBS = ("keygen", "sign")
CHECKPOINT_VERBS = ("build", *TRANSFER_VERBS, *KEY_VERBS)
#: what each checkpoint verb takes
CHECKPOINT_WHAT = {"build": "SERVICE", "export": "SERVICE", "import": "FILE", "push": "SERVICE", "pull": "SERVICE",
                   "keygen": "PATH", "sign": "FILE"}


def cmd_keys(cfg: Config | None, args: argparse.Namespace) -> int:
    """`checkpoint keygen PATH` and `checkpoint sign FILE [--key KEY]`."""
    from activator.checkpoints import ociarchive, signing, transfer

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
    from activator.checkpoints.host import open_host
    from activator.daemon import control
    from activator.statedir import StateDir

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

    return run_async(main)


def _checkpoint_transfer(cfg: Config, args: argparse.Namespace, verb: str, what: str) -> int:
    """export/import/push/pull: by the running daemon if there is one (it owns the store), else here."""
    from activator.checkpoints import ociarchive, signing, transfer
    from activator.checkpoints.host import open_host
    from activator.daemon import control
    from activator.statedir import StateDir

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

        run_async(run)
        r = out | {"seconds": time.monotonic() - t0}
    elif verb == "export" and key is not None:  # the daemon exported it: signed here with the key named
        doc = transfer.seal(Path(target), signing.sign(key, r["digest"]))
        r |= {"size": doc.size, "signed": f"signed by {signing.key_id(key.public_key())}"}
    took = f" in {r['seconds']:.1f}s" if "seconds" in r else ""
    if verb == "export":
        signed = r.get("signed") or "UNSIGNED: hosts that import it refuse it; `activator checkpoint sign FILE`"
        print(f"{svc.name}: checkpoint exported{took} to {r['path']} ({size(r['size'])}, {r['digest'][:19]}, "
              f"{signed})")
    elif verb == "push":
        print(f"{svc.name}: checkpoint pushed{took} to {r['ref']}")
    elif verb == "import":
        print(f"{svc.name}: checkpoint imported{took}: {r['dir']}; new instances use it")
    else:
        print(f"{svc.name}: checkpoint pulled{took} from {r['ref']}: {r['dir']}; new instances use it")
    return 0
