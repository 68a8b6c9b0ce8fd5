"""A checkpoint image made by another engine (issue 20, item 4): Podman's `container checkpoint --create-image`
(Debian 12's podman 4.3, with this host's runc and CRIU), saved as an OCI archive, read by `activator inspect`:
the engine, container, image and host it names (Podman 4.3 still writes io.podman.annotations.checkpoint.*), what
its layer holds, and the dumped process tree read with pycriu. activator does not serve it and says so; `import`
refuses it in one line."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.daemonproc import ACTIVATOR

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (make setup installs it)")


def podman(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["podman", *argv], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"podman {' '.join(argv)}: {p.stderr[-2000:]}"
    return p


def test_a_podman_checkpoint_image_is_inspected_and_not_served(tmp_path: Path) -> None:
    name = f"actest-{secrets.token_hex(3)}"
    image = f"localhost/{name}-ckpt:1"
    saved = tmp_path / "busybox.tar"
    subprocess.run(["docker", "save", "activator-demo/busybox:latest", "-o", str(saved)], check=True, timeout=120)
    podman("load", "-i", str(saved))
    try:
        # Podman's default ulimits (nofile, nproc) exceed this machine's hard limits: runc would refuse them.
        podman("run", "-d", "--name", name, "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit",
               "nproc=1024:1024", "localhost/activator-demo/busybox:latest", "httpd", "-f", "-p", "8080", "-h", "/www")
        podman("container", "checkpoint", "--create-image", image, name)
        archive = tmp_path / "podman-checkpoint.tar"
        podman("image", "save", "--format", "oci-archive", "-o", str(archive), image)

        (tmp_path / "cfg").mkdir()
        cfg = write_config(tmp_path / "cfg", {"hello": {"image": "activator-demo/busybox:latest", "port": 8080}})
        r = subprocess.run([*ACTIVATOR, "inspect", str(archive), "-c", str(cfg)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert "checkpoint image sha256:" in out and "made by    podman 4." in out, out
        assert f"container {name}" in out and "activator-demo/busybox:latest" in out, out
        assert "checkpoint/" in out and "spec.dump" in out, out  # Podman's layer layout
        assert "serving    not by activator: made by podman" in out, out
        assert any(line.split()[-1] == "httpd" for line in out.splitlines() if line.strip()[:1].isdigit()), out

        r = subprocess.run([*ACTIVATOR, "checkpoint", "import", str(archive), "--service", "hello", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "made by podman; activator serves only its own" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run(["podman", "rmi", "-f", image, "localhost/activator-demo/busybox:latest"], capture_output=True,
                       timeout=60)
