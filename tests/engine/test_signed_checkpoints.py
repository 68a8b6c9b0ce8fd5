"""A checkpoint from elsewhere is data, never root (issue 30 items 1 and 2), played against the real engine.

The attacker holds an archive exported by a genuine builder and can write anything: edit its record, recompute
every digest, sign with a key of their own, move a genuine signature onto their image, push to the registry.
What they cannot do is sign with the builder's key. Each attack is refused in one line before anything of the
archive is unpacked; the genuine archive, signed by the trusted key, imports and serves (the positive control).

Even a record that does carry a trusted signature (a builder host that was itself fooled or compromised) decides
nothing this host can compute: the importer derives the process spec, seccomp filter, capabilities, /dev and
external mounts from the service and the image, as for its own build. The proof is the attack found in review: a
record asking for a device node at ../../../var/tmp, every capability and no seccomp filter, with the pages
emptied so that the restore fails and the cold-start fallback runs the record's process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.checkpoints import ociarchive, signing, transfer
from activator.runtime.spec import capability_set
from tests.archives import make_key, rewrite
from tests.conftest import http_get, passable, write_config
from tests.daemonproc import ACTIVATOR

HELLO = {"image": "activator-demo/busybox:latest", "port": 8080,
         "command": ["httpd", "-f", "-p", "8080", "-h", "/www"]}
POC = Path("/var/tmp/activator-poc-null")
pytestmark = pytest.mark.engine
#: Linux capability numbers (include/uapi/linux/capability.h), for reading /proc/PID/status
CAP_BITS = {name: i for i, name in enumerate((
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE"))}


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ACTIVATOR, *argv], capture_output=True, text=True, timeout=300)


def one_line(r: subprocess.CompletedProcess[str], says: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def nothing_left(state: Path) -> None:
    assert not (state / "checkpoints" / "hello").exists()
    assert not list((state / "checkpoints").glob(".build-*"))
    assert not list((state / "images").glob("*/rootfs")), "refused before the image was unpacked"


class Builder:
    """A genuine builder host (its own state dir and key) and what it exported."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = make_key(root / "keys", "builder")
        self.public = Path(f"{self.key}.pub")
        (root / "builder").mkdir()
        self.config = write_config(root / "builder", {"hello": HELLO}, checkpoint_trust={"sign_key": str(self.key)})
        r = cli("checkpoint", "hello", "-c", str(self.config))
        assert r.returncode == 0, r.stderr
        self.archive = root / "hello.tar"
        r = cli("checkpoint", "export", "hello", "-o", str(self.archive), "-c", str(self.config))
        assert r.returncode == 0, r.stderr
        assert f"signed by {signing.key_id(signing.load_public(self.public, ''))}" in r.stdout, r.stdout
        self.meta = json.loads((root / "builder" / "state" / "checkpoints" / "hello" / "meta.json").read_text())

    def importer(self, tmp: Path, **trust: Any) -> Path:
        (tmp / "here").mkdir(exist_ok=True)
        return write_config(tmp / "here", {"hello": HELLO},
                            checkpoint_trust={"keys": [str(self.public)], **trust})


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builder]:
    root = passable(tmp_path_factory.mktemp("builder"))
    b = Builder(root)
    yield b
    cli("cleanup", "-c", str(b.config))


def test_unsigned_or_wrongly_signed_archives_are_refused_before_anything_is_unpacked(
        builder: Builder, tmp_path: Path) -> None:
    here = builder.importer(tmp_path)
    state = tmp_path / "here" / "state"
    genuine = ociarchive.read(builder.archive)
    attacker = make_key(tmp_path / "keys", "attacker")

    def crafted(name: str) -> Path:
        out = tmp_path / f"{name}.tar"
        rewrite(builder.archive, out, tmp_path, lambda meta: meta["checkpoint"].update(build_seconds=0.5))
        return out

    unsigned = crafted("unsigned")
    one_line(cli("checkpoint", "import", str(unsigned), "-c", str(here)), "the checkpoint image is not signed")
    nothing_left(state)
    # The order: an unsigned archive whose layer would not even decompress is refused as unsigned, so nothing of
    # it was read past its manifest.
    broken = tmp_path / "broken.tar"
    data = bytearray(unsigned.read_bytes())
    image = ociarchive.read(unsigned)
    member = image.members["blobs/sha256/" + image.layers[0].digest.partition(":")[2]]
    data[member.offset_data:member.offset_data + 64] = bytes(64)
    broken.write_bytes(bytes(data))
    one_line(cli("checkpoint", "import", str(broken), "-c", str(here)), "the checkpoint image is not signed")
    nothing_left(state)

    foreign = crafted("foreign")
    assert cli("checkpoint", "sign", str(foreign), "--key", str(attacker)).returncode == 0
    one_line(cli("checkpoint", "import", str(foreign), "-c", str(here)), "which is not in settings.checkpoint_trust")
    nothing_left(state)

    # The builder's genuine signature, moved onto the attacker's image: it names another manifest digest.
    moved = crafted("moved")
    sig = signing.of_annotations(genuine.envelope, "genuine")
    assert sig is not None
    with pytest.raises(signing.SignatureError):
        transfer.seal(moved, sig)  # our own tool refuses; the attacker writes the envelope by hand
    _set_envelope(moved, tmp_path, {signing.ANNOTATION: sig.to_text()})
    one_line(cli("checkpoint", "import", str(moved), "-c", str(here)), f"signature is for image {genuine.digest[:19]}")
    nothing_left(state)

    # A signature that claims the right digest and the trusted key id, but whose bytes are the attacker's.
    forged = crafted("forged")
    forged_doc = ociarchive.read(forged)
    fake = signing.Signature(forged_doc.digest, sig.key, bytes(64))
    _set_envelope(forged, tmp_path, {signing.ANNOTATION: fake.to_text()})
    one_line(cli("checkpoint", "import", str(forged), "-c", str(here)), "does not verify")
    nothing_left(state)

    for junk in ("{", json.dumps({"format": signing.FORMAT, "manifest": 1}), "x" * 100_000):
        bad = crafted("junk")
        _set_envelope(bad, tmp_path, {signing.ANNOTATION: junk})
        one_line(cli("checkpoint", "import", str(bad), "-c", str(here)), "its signature is malformed")
        nothing_left(state)

    # An archive made for another service, genuinely signed: not this one's, unless the operator says so.
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", {"web": HELLO}, checkpoint_trust={"keys": [str(builder.public)]})
    one_line(cli("checkpoint", "import", str(builder.archive), "-c", str(other)), "--service NAME")
    r = cli("checkpoint", "import", str(builder.archive), "--service", "web", "-c", str(other))
    assert r.returncode == 0, r.stderr

    # inspect, the command one runs on an untrusted archive, says so too.
    r = cli("inspect", str(foreign), "-c", str(here))
    assert r.returncode == 0 and "NOT trusted here" in r.stdout, r.stdout
    r = cli("inspect", str(builder.archive), "-c", str(here))
    assert r.returncode == 0 and "trusted here" in r.stdout and "NOT" not in r.stdout, r.stdout

    # Controls: the genuine archive imports; an unsigned one does with the lab switch on, loudly.
    r = cli("checkpoint", "import", str(builder.archive), "-c", str(here))
    assert r.returncode == 0, r.stderr
    lab = tmp_path / "lab"
    lab.mkdir()
    lab_config = write_config(lab, {"hello": HELLO}, checkpoint_trust={"insecure_unsigned": True})
    r = cli("checkpoint", "import", str(unsigned), "-c", str(lab_config))
    assert r.returncode == 0 and "insecure_unsigned is on" in r.stderr, r.stderr


def _set_envelope(archive: Path, tmp: Path, envelope: dict[str, str]) -> None:
    """Rewrite index.json by hand, as an attacker would (no tool of ours writes a signature that does not fit)."""
    work = tmp / f"env-{time.monotonic_ns()}"
    work.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(work)], check=True)
    index = json.loads((work / "index.json").read_text())
    index["manifests"][0]["annotations"] = {**index["manifests"][0].get("annotations", {}), **envelope}
    (work / "index.json").write_text(json.dumps(index))
    archive.unlink()
    subprocess.run(["tar", "-cf", str(archive), "-C", str(work), "oci-layout", "index.json", "blobs"], check=True)


def test_the_runc_dev_set_an_import_gets_is_what_a_template_had(builder: Builder) -> None:
    """An imported checkpoint's /dev comes from transfer.RUNC_DEV, not the archive: it must be what runc really
    makes, or imported instances would differ from local ones."""
    made = [tuple(sorted(d.items())) for d in builder.meta["dev"]]
    derived = [tuple(sorted(vars(d).items())) for d in transfer.RUNC_DEV]
    assert made == derived


@pytest.mark.asyncio
async def test_a_record_asking_for_root_gets_only_what_this_host_derives(  # type: ignore[no-untyped-def]
        builder: Builder, tmp_path: Path, start) -> None:
    """The review's proof of concept, replayed against a record that even carries the trusted signature."""
    POC.unlink(missing_ok=True)
    shutil.rmtree("/tmp/activator-poc-dir", ignore_errors=True)
    all_caps = [f"CAP_{c}" for c in CAP_BITS]

    def root_please(meta: dict[str, Any]) -> None:
        ck = meta["checkpoint"]
        ck["dev"] = [*builder.meta["dev"],
                     {"name": f"../../../../..{POC}", "kind": "chr", "mode": 0o666, "rdev": os.makedev(1, 3),
                      "target": ""},
                     {"name": "../../../../../tmp/activator-poc-dir", "kind": "dir", "mode": 0o777, "rdev": 0,
                      "target": ""}]
        ck["external"] = {**builder.meta["external"], "dev]:/\naction-script /bin/false\nexternal mnt[x": "/x"}
        ck["process"] = {**builder.meta["process"], "capabilities": all_caps, "uid": 0, "gid": 0}
        ck["seccomp"] = None
        ck["kernel_path"] = True
        ck["listening_ports"] = [1, 2, 3]

    crafted = tmp_path / "root-please.tar"
    rewrite(builder.archive, crafted, tmp_path, root_please)
    assert cli("checkpoint", "sign", str(crafted), "--key", str(builder.key)).returncode == 0

    # Imported into the state dir the daemon below (the start fixture) uses.
    here = write_config(tmp_path, {"hello": HELLO}, checkpoint_trust={"keys": [str(builder.public)]})
    r = cli("checkpoint", "import", str(crafted), "-c", str(here))
    assert r.returncode == 0, r.stderr
    installed = tmp_path / "state" / "checkpoints" / "hello"
    meta = json.loads((installed / "meta.json").read_text())
    for key in ("dev", "external", "process", "seccomp", "kernel_path", "listening_ports"):
        assert meta[key] == builder.meta[key], key  # derived here, exactly as the builder derived its own
    # The pages emptied: the restore fails, and the cold-start fallback (the default) runs the record's process.
    for pages in (installed / "criu").glob("pages-*.img"):
        os.truncate(pages, 0)

    services = yaml.safe_load(here.read_text())["services"]
    run = await start({"hello": {**HELLO, "listen": services["hello"]["listen"], "restore_timeout": "10s"}},
                      checkpoint_trust={"keys": [str(builder.public)]})
    port = run.port("hello")
    reply = await http_get(port)
    assert b"200 OK" in reply, reply
    assert not POC.exists() and not Path("/tmp/activator-poc-dir").exists()
    (inst,) = run.act.services["hello"].instances
    pid = await inst.sandbox.pid()
    assert pid is not None
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    allowed = sum(1 << CAP_BITS[c.removeprefix("CAP_")] for c in capability_set((), ()))
    assert int(status["CapEff"], 16) & ~allowed == 0, status["CapEff"]
    assert int(status["CapBnd"], 16) & ~allowed == 0, status["CapBnd"]
    assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"


@pytest.mark.skipif(not (shutil.which("docker-registry") and shutil.which("skopeo")),
                    reason="needs docker-registry and skopeo (make setup installs them)")
def test_a_puller_takes_only_images_its_builder_signed(builder: Builder, tmp_path: Path) -> None:
    """Through a registry: the signature travels as TAG.sig beside the image. A puller holds the public key and no
    signing key (push: false); the attacker can push anything to the registry but cannot sign as the builder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        reg = f"127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "registry.yml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "error"}, "http": {"addr": reg},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry")}}}))
    registry = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "registry.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(reg.rsplit(":", 1)[1])), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the registry did not start"
                time.sleep(0.1)
        repo = {"repository": f"{reg}/t", "tls_verify": False}
        pusher = yaml.safe_load(builder.config.read_text())
        pusher["settings"]["checkpoint_registry"] = {**repo, "pull": False}
        (tmp_path / "pusher.yaml").write_text(yaml.safe_dump(pusher))
        r = cli("checkpoint", "push", "hello", "-c", str(tmp_path / "pusher.yaml"))
        assert r.returncode == 0, r.stderr
        ref = r.stdout.strip().rsplit(" ", 1)[-1]
        assert ref.startswith(f"{reg}/t/hello:ck-"), r.stdout

        (tmp_path / "b").mkdir()
        puller = write_config(tmp_path / "b", {"hello": HELLO}, checkpoint_registry={**repo, "push": False},
                              checkpoint_trust={"keys": [str(builder.public)]})
        r = cli("checkpoint", "pull", "hello", "-c", str(puller))
        assert r.returncode == 0, r.stderr  # the control: signed by the builder, pulled
        shutil.rmtree(tmp_path / "b" / "state" / "checkpoints" / "hello")

        def sig_image(out: Path, text: str) -> None:
            """A TAG.sig image whose annotation is `text` (what only an attacker writes)."""
            layer = tmp_path / "sig-layer.tar"
            layer.unlink(missing_ok=True)
            subprocess.run(["tar", "-cf", str(layer), "--files-from", "/dev/null"], check=True)
            ociarchive.write(out, layer, {signing.ANNOTATION: text}, ref="signature", arch="amd64",
                             created="2026-01-01T00:00:00Z")

        def skopeo(src: Path, dest: str) -> None:
            subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci-archive:{src}",
                            f"docker://{dest}"], check=True, capture_output=True, timeout=120)

        # The attacker moves the builder's tag to an image of their own: the puller fetches the image by the
        # digest the builder's signature names, so it gets the builder's image, not the tag's.
        evil = tmp_path / "evil.tar"
        rewrite(builder.archive, evil, tmp_path, lambda meta: meta["checkpoint"].update(build_seconds=0.25))
        skopeo(evil, ref)
        r = cli("checkpoint", "pull", "hello", "-c", str(puller))
        assert r.returncode == 0, r.stderr
        meta = json.loads((tmp_path / "b" / "state" / "checkpoints" / "hello" / "meta.json").read_text())
        evil_digest = ociarchive.read(evil).digest
        assert evil_digest not in meta["provenance"] and "signed by" in meta["provenance"], meta["provenance"]
        assert meta["build_seconds"] != 0.25  # the builder's record, not the attacker's
        shutil.rmtree(tmp_path / "b" / "state" / "checkpoints" / "hello")
        # ... a signature document that nests without end, or is junk: one line, nothing downloaded, no crash.
        for junk in ("[" * 4000, "{}", "x" * 10):
            bad = tmp_path / "bad-sig.tar"
            bad.unlink(missing_ok=True)
            sig_image(bad, junk)
            skopeo(bad, ref + transfer.SIG_SUFFIX)
            one_line(cli("checkpoint", "pull", "hello", "-c", str(puller)), "malformed")
        # ... another service's genuine image and signature, copied under this one's name (same definition, so
        # the same tag): refused, the signature covers the service it was made for.
        (tmp_path / "c").mkdir()
        web = write_config(tmp_path / "c", {"web": HELLO}, checkpoint_registry={**repo, "push": False},
                           checkpoint_trust={"keys": [str(builder.public)]})
        web_ref = ref.replace("/t/hello:", "/t/web:")
        skopeo(builder.archive, web_ref)
        genuine = signing.of_annotations(ociarchive.read(builder.archive).envelope, "genuine")
        assert genuine is not None
        transfer.signature_image(genuine, tmp_path / "genuine-sig.tar", tmp_path)
        skopeo(tmp_path / "genuine-sig.tar", web_ref + transfer.SIG_SUFFIX)
        one_line(cli("checkpoint", "pull", "web", "-c", str(web)), "was made for service 'hello', not 'web'")
        # ... and its signature too, with a key of their own.
        attacker = make_key(tmp_path / "keys", "attacker")
        key = signing.load_private(attacker, "")
        transfer.signature_image(signing.sign(key, ociarchive.read(evil).digest), tmp_path / "sig.tar", tmp_path)
        skopeo(tmp_path / "sig.tar", ref + transfer.SIG_SUFFIX)
        one_line(cli("checkpoint", "pull", "hello", "-c", str(puller)), "is not in settings.checkpoint_trust.keys")
        assert not (tmp_path / "b" / "state" / "checkpoints" / "hello").exists()
    finally:
        registry.terminate()
        registry.wait(timeout=10)


REDIS = {"image": "activator-demo/redis:latest", "port": 6379}
TOMCAT = {"image": "activator-demo/tomcat:latest", "port": 8080, "readiness": {"http_path": "/", "timeout": "120s"},
          "environment": {"JAVA_OPTS": "-XX:+UseSerialGC -Xms32m -Xmx256m -Xss256k -XX:-UsePerfData "
                                       "-XX:TieredStopAtLevel=1", "MALLOC_ARENA_MAX": "2"},
          "resources": {"memory": "512m"}}


@pytest.mark.asyncio
async def test_multithreaded_apps_pass_the_dump_check_and_serve_imported(  # type: ignore[no-untyped-def]
        tmp_path: Path, start) -> None:
    """The positive control for dumpcheck beyond busybox: Redis and Tomcat (threads whose seccomp chain CRIU
    dumps on the leader only, flagged TSYNC) built on one state dir, signed, imported into another, and served."""
    key = make_key(tmp_path / "keys", "builder")
    services = {"redis": REDIS, "tomcat": TOMCAT}
    (tmp_path / "builder").mkdir()
    made = write_config(tmp_path / "builder", services, checkpoint_trust={"sign_key": str(key)})
    here = write_config(tmp_path, services, checkpoint_trust={"keys": [f"{key}.pub"]})
    for name in services:
        assert cli("checkpoint", name, "-c", str(made)).returncode == 0
        r = cli("checkpoint", "export", name, "-o", str(tmp_path / f"{name}.tar"), "-c", str(made))
        assert r.returncode == 0, r.stderr
        r = cli("checkpoint", "import", str(tmp_path / f"{name}.tar"), "-c", str(here))
        assert r.returncode == 0, r.stderr
    cli("cleanup", "-c", str(made))
    run = await start(services, checkpoint_trust={"keys": [f"{key}.pub"]})
    assert run.metric("activator_checkpoint_builds_total", "redis") == 0  # the imported ones are used
    reader, writer = await asyncio.open_connection("127.0.0.1", run.port("redis"))
    writer.write(b"PING\r\n")
    assert await asyncio.wait_for(reader.readline(), 30) == b"+PONG\r\n"
    writer.close()
    assert b"200" in (await http_get(run.port("tomcat"))).split(b"\r\n", 1)[0]
