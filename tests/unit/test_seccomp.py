"""Docker-format seccomp profiles turned into the OCI spec's filter: pure logic, no engine."""

from __future__ import annotations

import json

import pytest

from activator.runtime import seccomp
from activator.runtime.spec import DEFAULT_CAPS


def test_docker_profile_conversion_follows_caps_arch_and_kernel() -> None:
    profile = json.loads(seccomp.DEFAULT_PROFILE.read_text())
    oci = seccomp.to_oci(profile, list(DEFAULT_CAPS), machine="x86_64", kernel="6.1.0")
    allowed = {n for r in oci["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
               for n in r["names"]}
    assert oci["architectures"][0] == "SCMP_ARCH_X86_64" and oci["defaultAction"] == "SCMP_ACT_ERRNO"
    assert {"read", "accept4", "execve"} <= allowed
    assert "unshare" not in allowed and "mount" not in allowed and "setns" not in allowed  # CAP_SYS_ADMIN only
    assert "arch_prctl" in allowed and "s390_runtime_instr" not in allowed  # by architecture
    assert "chroot" in allowed  # CAP_SYS_CHROOT is in Docker's default set
    with_admin = seccomp.to_oci(profile, [*DEFAULT_CAPS, "CAP_SYS_ADMIN"], machine="x86_64", kernel="6.1.0")
    assert "unshare" in {n for r in with_admin["syscalls"] for n in r["names"] if r["action"] == "SCMP_ACT_ALLOW"}
    old = seccomp.to_oci(profile, list(DEFAULT_CAPS), machine="x86_64", kernel="4.4.0")
    assert len(old["syscalls"]) < len(oci["syscalls"])  # minKernel rules dropped on an old kernel
    with pytest.raises(seccomp.ProfileError):
        seccomp.to_oci({"syscalls": []}, list(DEFAULT_CAPS))
