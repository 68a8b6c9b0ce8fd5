"""Signed checkpoint images: who made a checkpoint image is proved by a signature, never by what the image says.

A checkpoint image holds code and memory that CRIU restores as root into an instance, so an image from another
host is data to verify before anything of it is unpacked. The digests inside an archive prove nothing: whoever
crafts one recomputes them. What proves something is an Ed25519 signature over the image's manifest digest by a
key the operator named (`settings.checkpoint_trust.keys`). The manifest covers the config, the one layer (by
digest) and every annotation, so the signature covers the whole image.

    signed payload   b"activator-checkpoint-signature/1\\n" + manifest digest + b"\\n"   (domain-separated)
    signature doc    {"format": ..., "manifest": "sha256:...", "key": KEY_ID, "signature": BASE64}
    KEY_ID           "ed25519:" + the first 16 hex digits of SHA-256 over the raw 32-byte public key

Where the document travels:
- in an archive FILE: the index's descriptor of the manifest carries it as the annotation
  `org.activator.checkpoint.signature` (the index is outside what the manifest digest covers, like an envelope);
- in a registry: beside the image, as a tiny image of its own tagged `TAG.sig` whose manifest carries the same
  annotation (as cosign keeps `sha256-DIGEST.sig` beside an image). skopeo copies manifests, not indexes.

What a valid signature proves: a holder of that private key signed this exact image. Not that the image is benign:
the key holder is trusted like the config author. So only a builder host (or CI) holds a signing key and push
credentials; hosts that only pull hold neither (one compromised puller cannot poison the fleet).

Blocking (files); pure otherwise.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from activator.errors import ActivatorError

FORMAT = "activator-checkpoint-signature/1"
ANNOTATION = "org.activator.checkpoint.signature"
#: a signature document is a few hundred bytes; anything much larger is not one
MAX_DOC = 4096


class SignatureError(ActivatorError):
    pass


def payload(manifest_digest: str) -> bytes:
    """What is signed: the manifest digest, behind a domain tag so that no other signed text can pass as one."""
    return f"{FORMAT}\n{manifest_digest}\n".encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signature:
    manifest: str
    key: str
    signature: bytes

    def to_text(self) -> str:
        return json.dumps({"format": FORMAT, "manifest": self.manifest, "key": self.key,
                           "signature": base64.b64encode(self.signature).decode()}, sort_keys=True,
                          separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str, where: str) -> Signature:
        """Parse a signature document; anything malformed is one line (the text is untrusted)."""
        try:
            if len(text) > MAX_DOC:
                raise ValueError("too long")
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("not an activator checkpoint signature")
            manifest, key, sig = doc["manifest"], doc["key"], base64.b64decode(doc["signature"], validate=True)
            if not (isinstance(manifest, str) and isinstance(key, str) and len(sig) == 64):
                raise ValueError("wrong field types")
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as e:
            raise SignatureError(f"{where}: its signature is malformed ({e}); sign it again with `activator "
                                 "checkpoint sign`") from None
        return cls(manifest, key, sig)


def sign(key: Ed25519PrivateKey, manifest_digest: str) -> Signature:
    return Signature(manifest_digest, key_id(key.public_key()), key.sign(payload(manifest_digest)))


def of_annotations(annotations: Mapping[str, str], where: str) -> Signature | None:
    text = annotations.get(ANNOTATION)
    return None if text is None else Signature.from_text(text, where)


# --- keys -----------------------------------------------------------------------------------------------------


def generate(private_path: Path) -> tuple[Path, str]:
    """Blocking. A new key pair: the private key at private_path (0600, created, never overwritten) and the public
    key beside it as PATH.pub. Returns (public key path, key id)."""
    key = Ed25519PrivateKey.generate()
    public_path = private_path.with_name(private_path.name + ".pub")
    if not private_path.parent.is_dir():
        raise SignatureError(f"{private_path.parent} does not exist; make it first (mkdir -m 700 "
                             f"{private_path.parent}), or choose another PATH")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise SignatureError(f"{p} exists; choose a new name (a key is never overwritten)")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        _create(private_path, pem, 0o600)
        _create(public_path, pub, 0o644)
    except OSError as e:
        with contextlib.suppress(OSError):
            private_path.unlink()
        raise SignatureError(f"{e.filename}: cannot be written ({e.strerror}); choose another PATH") from None
    return public_path, key_id(key.public_key())


def _create(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_key_file(path: Path, what: str, where: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        fix = ("`activator checkpoint keygen PATH` makes a key pair" if what == "signing key" else
               "copy the builder's PATH.pub here (made by `activator checkpoint keygen PATH` on the builder)")
        raise SignatureError(f"{where}: {what} {path}: {e.strerror}; {fix}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 16384:
            raise SignatureError(f"{where}: {what} {path} is not a key file")
        data = os.read(fd, 16384)
        # The halves mixed up are the likeliest mistake: said as such, before any advice about modes.
        if what == "signing key" and b"PUBLIC KEY-----" in data:
            raise SignatureError(f"{where}: sign_key {path} is a public key; sign_key takes the private half (the "
                                 "same path without .pub)")
        if what == "trusted key" and b"PRIVATE KEY-----" in data:
            raise SignatureError(f"{where}: keys: {path} is a private key; list its .pub here, and keep the private "
                                 "key on the builder only")
        if what == "signing key" and st.st_uid != os.geteuid():
            raise SignatureError(f"{where}: signing key {path} is owned by uid {st.st_uid}, not by this user "
                                 f"({os.geteuid()}); chown it (whoever owns it can sign checkpoints every host trusts)")
        if what == "signing key" and st.st_mode & 0o077:
            raise SignatureError(f"{where}: signing key {path} is readable by others (mode "
                                 f"{stat.S_IMODE(st.st_mode):o}); chmod 600 {path} (anyone who reads it can sign "
                                 "checkpoints every host trusts)")
        return data
    finally:
        os.close(fd)


def load_private(path: Path, where: str) -> Ed25519PrivateKey:
    data = _read_key_file(path, "signing key", where)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{where}: signing key {path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{where}: signing key {path} is not an Ed25519 key; make one with `activator "
                             "checkpoint keygen PATH`")
    return key


def load_public(path: Path, where: str) -> Ed25519PublicKey:
    data = _read_key_file(path, "trusted key", where)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{where}: trusted key {path} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{where}: trusted key {path} is not an Ed25519 public key")
    return key


# --- verifying ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    """Which signers this host accepts checkpoint images from (settings.checkpoint_trust)."""

    keys: Mapping[str, Ed25519PublicKey]  # key id -> key
    insecure_unsigned: bool = False

    @classmethod
    def load(cls, paths: Iterable[Path], insecure_unsigned: bool, where: str) -> Trust:
        keys: dict[str, Ed25519PublicKey] = {}
        for p in paths:
            k = load_public(p, where)
            keys[key_id(k)] = k
        return cls(keys, insecure_unsigned)

    def verify(self, sig: Signature | None, manifest_digest: str, where: str) -> str:
        """Accept the image whose manifest has this digest, or raise one line saying why not. Returns who signed
        it ("unsigned (insecure_unsigned)" for an accepted unsigned one)."""
        if sig is None:
            if self.insecure_unsigned:
                return "UNSIGNED (accepted: settings.checkpoint_trust.insecure_unsigned)"
            raise SignatureError(
                f"{where}: the checkpoint image is not signed; only signed images are imported (sign it on the "
                "host that built it: `activator checkpoint sign FILE`, or set settings.checkpoint_trust.sign_key "
                "there)")
        if sig.manifest != manifest_digest:
            raise SignatureError(f"{where}: its signature is for image {sig.manifest[:19]}, not this one "
                                 f"({manifest_digest[:19]}); refused")
        key = self.keys.get(sig.key)
        if key is None:
            trusted = ", ".join(sorted(self.keys)) or "none"
            raise SignatureError(f"{where}: signed by {sig.key}, which is not in settings.checkpoint_trust.keys "
                                 f"(trusted: {trusted}); refused")
        try:
            key.verify(sig.signature, payload(manifest_digest))
        except InvalidSignature:
            raise SignatureError(f"{where}: its signature by {sig.key} does not verify (altered, or signed by "
                                 "another key under that name); refused") from None
        return f"signed by {sig.key}"


def describe(sig: Signature | None, manifest_digest: str, trust: Trust | None) -> str:
    """For `activator inspect`: what a signature says, checked against the trust if there is one."""
    if sig is None:
        return "unsigned"
    if trust is None:
        return f"claims to be signed by {sig.key} (not checked: no settings.checkpoint_trust.keys here)"
    try:
        return trust.verify(sig, manifest_digest, "") + ", trusted here"
    except SignatureError as e:
        return f"signed by {sig.key}: NOT trusted here ({str(e).removeprefix(': ')})"


def annotation(sig: Signature) -> dict[str, Any]:
    return {ANNOTATION: sig.to_text()}
