"""Seccomp: Docker's default profile (or the service's own), turned into the OCI spec's linux.seccomp.

profiles/docker-default.json is Docker's own default profile, byte for byte: moby's
profiles/seccomp/default.json as Debian 12 ships it (golang-github-docker-docker-dev 20.10.24+dfsg1, the same
version as Debian's docker.io engine); scripts/update-seccomp-profile.sh refreshes it. It is not hand-written and
must not be edited. (containers-common's /usr/share/containers/seccomp.json is Podman's profile, not Docker's: it
allows unshare, mount and clone with namespace flags to every container, which Docker's refuses without
CAP_SYS_ADMIN.)

The conversion follows moby's setupSeccomp (profiles/seccomp/seccomp_linux.go): the host architecture's entry of
archMap, and each rule kept or dropped by its includes/excludes on architecture, capabilities (compared with the
container's bounding set) and minimum kernel version.

The filter is part of the checkpoint: runc installs it in the template, CRIU dumps it with the process and restores
it into every instance. The profile's hash is therefore part of what a checkpoint was made from.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from activator.config.service import SECCOMP_DEFAULT, SECCOMP_UNCONFINED

DEFAULT_PROFILE = Path(__file__).parent / "profiles" / "docker-default.json"

# platform.machine() -> the arch names moby's profiles use in includes/excludes, and libseccomp's for archMap
_ARCH = {"x86_64": ("amd64", "SCMP_ARCH_X86_64"), "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
         "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"), "s390x": ("s390x", "SCMP_ARCH_S390X"),
         "i686": ("x86", "SCMP_ARCH_X86"), "armv7l": ("arm", "SCMP_ARCH_ARM")}


class ProfileError(ValueError):
    """The profile cannot be read or is not a Docker-format seccomp profile."""


def profile_path(setting: str) -> Path | None:
    """The file a service's `seccomp:` setting names; None for unconfined."""
    if setting == SECCOMP_UNCONFINED:
        return None
    return DEFAULT_PROFILE if setting == SECCOMP_DEFAULT else Path(setting)


def _kernel_at_least(minimum: str, release: str) -> bool:
    def parts(v: str) -> tuple[int, int]:
        major, _, rest = v.partition(".")
        minor = "".join(ch for ch in rest.split(".")[0] if ch.isdigit()) or "0"
        return int(major), int(minor)

    return parts(release) >= parts(minimum)


def to_oci(profile: dict[str, Any], capabilities: list[str], *, machine: str | None = None,
           kernel: str | None = None) -> dict[str, Any]:
    """A Docker-format profile -> the spec's linux.seccomp for a container with these bounding capabilities."""
    arch, scmp_arch = _ARCH.get(machine or platform.machine(), ("", ""))
    release = kernel or os.uname().release
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise ProfileError("not a seccomp profile (no defaultAction)")
    if profile.get("architectures") and profile.get("archMap"):
        raise ProfileError("both 'architectures' and 'archMap' are set; use one")
    out: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if "defaultErrnoRet" in profile:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    arches = list(profile.get("architectures") or [])
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == scmp_arch:
            arches = [scmp_arch, *entry.get("subArchitectures", [])]
            break
    if arches:
        out["architectures"] = arches
    caps = set(capabilities)
    syscalls = []
    for rule in profile.get("syscalls") or []:
        inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
        if arch in exc.get("arches", []) or caps & set(exc.get("caps", [])):
            continue
        if exc.get("minKernel") and _kernel_at_least(exc["minKernel"], release):
            continue
        if inc.get("arches") and arch not in inc["arches"]:
            continue
        if inc.get("caps") and not set(inc["caps"]) <= caps:
            continue
        if inc.get("minKernel") and not _kernel_at_least(inc["minKernel"], release):
            continue
        if rule.get("name") and rule.get("names"):
            raise ProfileError("a rule has both 'name' and 'names'; use one")
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if not names or "action" not in rule:
            raise ProfileError("a rule has no syscall names or no action")
        call: dict[str, Any] = {"names": names, "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            call["errnoRet"] = rule["errnoRet"]
        if rule.get("args"):
            call["args"] = [{k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a} for a in rule["args"]]
        syscalls.append(call)
    out["syscalls"] = syscalls
    return out


def load(setting: str, capabilities: list[str]) -> tuple[dict[str, Any] | None, str]:
    """Blocking. (linux.seccomp or None, a short digest of it for the checkpoint's origin)."""
    path = profile_path(setting)
    if path is None:
        return None, SECCOMP_UNCONFINED
    try:
        profile = json.loads(path.read_bytes())
    except OSError as e:
        raise ProfileError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ProfileError(f"{path} is not JSON: {e}") from None
    oci = to_oci(profile, capabilities)
    digest = hashlib.sha256(json.dumps(oci, sort_keys=True).encode()).hexdigest()[:16]
    return oci, digest
