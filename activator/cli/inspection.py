"""`activator inspect`: what a service's checkpoint holds and what it was built from; or a checkpoint image's,
from an archive file or a registry reference (made by activator or not, trusted or not)."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from activator.config.document import Config
from activator.core.liveview import size
from activator.errors import ActivatorError

from .render import say

#: `inspect` of an archive not signed by a key trusted here: its layer is unpacked up to this, and its CRIU images
#: (pages aside) decoded only if each is at most INSPECT_IMAGE (a crafted one could inflate or nest without end)
INSPECT_UNTRUSTED = 256 * 2**20
INSPECT_IMAGE = 8 * 2**20


def names_an_image(what: str) -> bool:
    """An archive file or a registry reference, not a service name (those have neither '/' nor ':')."""
    return Path(what).exists() or "/" in what or ":" in what


def inspect_image(cfg: Config | None, what: str, as_json: bool) -> int:
    """A checkpoint image, from an archive file or a registry reference, made by activator or not."""
    import tempfile

    from activator.checkpoints import ociarchive, ocilayer, signing, transfer
    from activator.checkpoints.registry import Registry
    from activator.checkpoints.store import contents
    from activator.config.settings import RegistrySettings

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
                ocilayer.unpack_layer(image, layer, max_bytes=transfer.MAX_LAYER if trusted else INSPECT_UNTRUSTED)
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
        say(f"{what}: {'checkpoint image' if engine else 'OCI image (no checkpoint annotations)'} {image.digest}")
        say(f"  made by    {engine or '?'} {d['engine.version']}; container {d['container.name'] or '?'}; "
              f"created {a.get('org.opencontainers.image.created', image.config.get('created', '?'))}")
        say(f"  from       image {d['rootfsImageName'] or '?'} ({d['rootfsImageID'][:19] or '?'})")
        say(f"  made on    {d['host.arch'] or '?'}, kernel {d['host.kernel'] or '?'}, "
              f"CRIU {d['criu.version'] or '?'}, {d['runtime.name'] or '?'} {d['runtime.version']}, "
              f"cgroup {d['cgroup.version'] or '?'}, "
              f"{d['distribution.name']} {d['distribution.version']}")
        say(f"  signature  {signed}")
        say(f"  size       {size(image.size)} in {len(image.layers)} layer(s) "
              f"({', '.join(b.media_type.rsplit('.', 1)[-1] for b in image.layers)})")
        if held.get("files"):
            say(f"  holds      {' '.join(held['files'])}")
        if held.get("unread"):
            say(f"  contents   not shown: {held['unread']}")
        if engine and engine != transfer.ENGINE:
            say(f"  serving    not by activator: made by {engine} (docs/multi-host.md says what it would take)")
        for k in sorted(a):
            if k.startswith(transfer.OWN):
                say(f"  {k.removeprefix(transfer.OWN):<10} {a[k]}")
        if held.get("processes"):
            say("  processes  PID  PPID  THREADS  VMAS  COMM")
            for p in held["processes"]:
                say(f"             {p['pid']:>3} {p['ppid']:>5} {p['threads']:>8} {p['vmas']:>5}  {p['comm']}")
    return 0


def cmd_inspect(cfg: Config, args: argparse.Namespace) -> int:
    from activator.checkpoints import maphazard
    from activator.checkpoints.store import CheckpointStore, contents
    from activator.runtime import preflight
    from activator.statedir import StateDir

    if not any(s.name == args.service for s in cfg.services) and names_an_image(args.service):
        return inspect_image(cfg, args.service, args.json)
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
    state = StateDir.of(cfg)
    maps, why = maphazard.restore_maps(svc.restore_memory, ck.map_hazard,
                                       svc.restore_memory == "copy" or preflight.criu_maps(state.criu_binary))
    memory = {"restore_memory": svc.restore_memory, "maps": maps, "map_hazard": ck.map_hazard, "why_not": why}
    info = {
        "service": svc.name, "dir": str(ck.dir), "created": ck.created, "build_seconds": ck.build_seconds,
        "matches_config": current, "provenance": ck.provenance or "built here",
        "origin": vars(ck.origin), "restores_by": memory, "process": {"args": list(ck.process.args),
                                                                          "cwd": ck.process.cwd,
                                                                          "uid": ck.process.uid},
        **held,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    o = ck.origin
    say(f"{svc.name}: checkpoint {ck.dir}")
    say(f"  built      {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ck.created))} "
          f"in {ck.build_seconds:.1f}s; {'matches' if current else 'does NOT match'} the service definition")
    say(f"  from       image {o.image_id}, CRIU {o.criu}, runc {o.runc}, kernel {o.kernel}")
    say(f"  source     {ck.provenance or 'built here'}")
    say(f"  command    {' '.join(ck.process.args)} (cwd {ck.process.cwd}, uid {ck.process.uid})")
    say(f"  listening  {', '.join(map(str, held['listening_ports'])) or 'nothing'}")
    say(f"  memory     {size(held['pages_bytes'])} of pages in {held['image_files']} image files")
    # Whether its instances map those pages, and if `map` was asked for but is not done, the warning's why
    say(f"  restores   by {'map' if maps else 'copy'} (restore_memory: {svc.restore_memory})")
    if why:
        say(f"             {why}")
    mapped = held["pages_by_mapping"]
    for label, n in mapped[:8]:
        say(f"             {n:>7} pages {label}")
    if len(mapped) > 8:
        say(f"             {sum(n for _, n in mapped[8:]):>7} pages in {len(mapped) - 8} other mappings")
    say("  processes  PID  PPID  THREADS  VMAS  COMM")
    for p in held["processes"]:
        say(f"             {p['pid']:>3} {p['ppid']:>5} {p['threads']:>8} {p['vmas']:>5}  {p['comm']}")
    return 0
