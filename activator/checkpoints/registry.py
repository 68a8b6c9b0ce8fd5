"""Checkpoint images to and from an OCI registry, through skopeo (nothing home-made on the wire).

`skopeo copy oci-archive:FILE docker://REPOSITORY/SERVICE:TAG` and back. TLS and credentials are skopeo's:
`tls_verify` (off only for a plain-HTTP registry on a network you own), `auth_file` (what `skopeo login` or
`docker login` writes), and the host's /etc/containers/policy.json decides which pulls are accepted (signature
policies included). Blocking: callers run these in a thread.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from activator.config.settings import RegistrySettings
from activator.errors import ActivatorError

log = logging.getLogger("activator")

#: what skopeo says when the registry has no such image (the distribution registry, Docker Hub, quay, ...)
ABSENT = ("manifest unknown", "name unknown", "not found", "404")


class RegistryError(ActivatorError):
    pass


@dataclass(frozen=True)
class Registry:
    settings: RegistrySettings
    skopeo: str = "skopeo"

    def ref(self, service: str, tag: str) -> str:
        return f"{self.settings.repository.rstrip('/')}/{service}:{tag}"

    def push(self, archive: Path, ref: str) -> None:
        self._copy(f"oci-archive:{archive}", f"docker://{ref}", "--dest")

    def pull(self, ref: str, dest: Path) -> bool:
        """Copy ref into an archive at dest; False if the registry has no such image."""
        try:
            self._copy(f"docker://{ref}", f"oci-archive:{dest}", "--src")
        except RegistryError as e:
            if any(a in str(e).lower() for a in ABSENT):
                return False
            raise
        return True

    def _copy(self, src: str, dst: str, side: str) -> None:
        if shutil.which(self.skopeo) is None:
            raise RegistryError("settings.checkpoint_registry needs skopeo, which is not installed; run 'make "
                                "setup' (or apt-get install skopeo)")
        argv = [self.skopeo, "copy", "--quiet", f"{side}-tls-verify={'true' if self.settings.tls_verify else 'false'}"]
        if self.settings.auth_file is not None:
            argv.append(f"{side}-authfile={self.settings.auth_file}")
        argv += [src, dst]
        try:
            p = subprocess.run(argv, capture_output=True, timeout=self.settings.timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RegistryError(f"skopeo copy {src} -> {dst} took longer than {self.settings.timeout:g}s "
                                "(settings.checkpoint_registry.timeout)") from None
        if p.returncode:
            err = " ".join(p.stderr.decode(errors="replace").split())
            raise RegistryError(f"skopeo copy {src} -> {dst} failed: {err[-400:]}")
