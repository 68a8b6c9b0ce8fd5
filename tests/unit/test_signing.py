"""Signatures of checkpoint images (checkpoints/signing.py): pure logic and key files, no engine.

tests/engine/test_signed_checkpoints.py plays the same attacks against real archives, imports and a registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from activator.checkpoints import signing

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private = tmp_path / "builder"
    public, kid = signing.generate(private)
    assert kid.startswith("ed25519:") and len(kid) == len("ed25519:") + 16
    return private, public


def test_a_signature_by_a_trusted_key_verifies_and_round_trips(keys: tuple[Path, Path]) -> None:
    private, public = keys
    key = signing.load_private(private, "x")
    sig = signing.Signature.from_text(signing.sign(key, DIGEST).to_text(), "x")
    trust = signing.Trust.load([public], False, "x")
    assert trust.verify(sig, DIGEST, "x") == f"signed by {signing.key_id(key.public_key())}"
    assert signing.of_annotations(signing.annotation(sig), "x") == sig
    assert signing.of_annotations({}, "x") is None


def test_every_other_signature_is_refused_in_one_line(keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keys
    key = signing.load_private(private, "x")
    trust = signing.Trust.load([public], False, "img")
    other_key = signing.load_private(signing.generate(tmp_path / "attacker")[0].with_suffix(""), "x")
    good = signing.sign(key, DIGEST)
    cases = {
        "not signed": None,
        "for image sha256:cdcd": signing.sign(key, OTHER),  # a genuine signature of another image
        "not in settings.checkpoint_trust.keys": signing.sign(other_key, DIGEST),
        "does not verify": signing.Signature(DIGEST, good.key, bytes(64)),  # the trusted key id, forged bytes
        "does not verify ": signing.Signature(DIGEST, good.key, good.signature[:-1] + bytes([good.signature[-1] ^ 1])),
    }
    for says, sig in cases.items():
        with pytest.raises(signing.SignatureError) as e:
            trust.verify(sig, DIGEST, "img")
        assert says.strip() in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("img: ")
    # a signature over the payload of another domain (the bare digest) does not pass as one
    bare = signing.Signature(DIGEST, good.key, key.sign(DIGEST.encode()))
    with pytest.raises(signing.SignatureError):
        trust.verify(bare, DIGEST, "img")
    # the lab switch: unsigned accepted, and said; a bad signature is still refused
    lab = signing.Trust.load([public], True, "img")
    assert "UNSIGNED" in lab.verify(None, DIGEST, "img")
    with pytest.raises(signing.SignatureError):
        lab.verify(signing.sign(other_key, DIGEST), DIGEST, "img")


@pytest.mark.parametrize("text", [
    "", "{", "[]", "null", json.dumps({"format": "cosign"}),
    json.dumps({"format": signing.FORMAT, "manifest": DIGEST, "key": "k"}),
    json.dumps({"format": signing.FORMAT, "manifest": DIGEST, "key": "k", "signature": "!!"}),
    json.dumps({"format": signing.FORMAT, "manifest": DIGEST, "key": "k", "signature": "AAAA"}),  # 3 bytes
    json.dumps({"format": signing.FORMAT, "manifest": 7, "key": "k", "signature": "A" * 88}),
    "x" * (signing.MAX_DOC + 1),
])
def test_malformed_signature_documents_are_one_line(text: str) -> None:
    with pytest.raises(signing.SignatureError) as e:
        signing.Signature.from_text(text, "img")
    assert "malformed" in str(e.value) and "\n" not in str(e.value)


def test_key_files_are_checked(keys: tuple[Path, Path], tmp_path: Path) -> None:
    private, public = keys
    assert private.stat().st_mode & 0o777 == 0o600 and public.stat().st_mode & 0o777 == 0o644
    with pytest.raises(signing.SignatureError, match="never overwritten"):
        signing.generate(private)
    os.chmod(private, 0o640)
    with pytest.raises(signing.SignatureError, match="readable by others"):
        signing.load_private(private, "cfg")
    os.chmod(private, 0o600)
    link = tmp_path / "link"
    link.symlink_to(private)
    with pytest.raises(signing.SignatureError):
        signing.load_private(link, "cfg")  # O_NOFOLLOW: a key is named by its own path
    with pytest.raises(signing.SignatureError, match="does-not-exist"):
        signing.load_public(tmp_path / "does-not-exist", "cfg")
    with pytest.raises(signing.SignatureError, match=r"is a private key; list its \.pub here"):
        signing.load_public(private, "cfg")  # the halves mixed up: said as such
    with pytest.raises(signing.SignatureError, match="is a public key; sign_key takes the private half"):
        signing.load_private(public, "cfg")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(signing.SignatureError, match="not a PEM public key"):
        signing.load_public(tmp_path / "junk.pub", "cfg")
    with pytest.raises(signing.SignatureError, match="does not exist; make it first"):
        signing.generate(tmp_path / "no-such-dir" / "key")
    ec = generate_private_key(SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pub").write_bytes(ec)
    with pytest.raises(signing.SignatureError, match="not an Ed25519"):
        signing.load_public(tmp_path / "ec.pub", "cfg")


def test_describe_says_what_inspect_shows(keys: tuple[Path, Path]) -> None:
    private, public = keys
    sig = signing.sign(signing.load_private(private, "x"), DIGEST)
    trust = signing.Trust.load([public], False, "x")
    assert signing.describe(None, DIGEST, trust) == "unsigned"
    assert signing.describe(sig, DIGEST, trust).endswith("trusted here")
    assert "NOT trusted" in signing.describe(sig, OTHER, trust)
    assert "not checked" in signing.describe(sig, DIGEST, None)
