"""The README, followed as a newcomer would, against the real engine (issue 31 item 8): its own-image quickstart
(the shell block run as it is, the YAML as it is) gives the output it shows, and every troubleshooting line that
needs the host (root, an image, a user, a port in use, a build, a reload, CRIU, Podman) is what activator prints
when that mistake is made. tests/unit/test_readme.py checks the lines a file alone produces."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import passable
from tests.daemonproc import ACTIVATOR, daemon, stop
from tests.unit.test_readme import HOST_CASES, SHOWN_DIR, case_of, quoted_lines, split_sections

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
OWN_IMAGE = dict(split_sections(README))["Quickstart with your own image"]


def blocks(lang: str) -> list[str]:
    """The section's fenced blocks of that language ("" for a bare fence), each whole."""
    found: list[str] = []
    current: list[str] = []
    opened: str | None = None
    for line in OWN_IMAGE.splitlines():
        if opened is None and line.startswith("```"):
            opened, current = line[3:], []
        elif opened is not None and line == "```":
            if opened == lang:
                found.append("\n".join(current) + "\n")
            opened = None
        elif opened is not None:
            current.append(line)
    return found


def shown(text: str, where: Path) -> list[str]:
    return text.replace(str(where), SHOWN_DIR).splitlines()


def activator(*args: str, cwd: Path, prefix: tuple[str, ...] = ()) -> list[str]:
    out = subprocess.run([*prefix, *ACTIVATOR, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                         env=os.environ | {"PYTHONPATH": str(ROOT)})
    return shown(out.stdout + out.stderr, cwd)


def until_line(proc: subprocess.Popen[str], word: str, seconds: float = 120) -> str:
    """The first line of the daemon's stdout holding word (its announcements), within seconds."""
    assert proc.stdout is not None
    fd, out, deadline = proc.stdout.fileno(), "", time.monotonic() + seconds
    while True:
        for line in out.splitlines():
            if word in line:
                return line
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536).decode() if readable else ""
        assert chunk, f"no line with {word!r}: {out!r}"
        out += chunk


@pytest.fixture(scope="module")
def mysite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The README's own-image directory, made by running its shell block as it is (mysite:1 built)."""
    base = passable(tmp_path_factory.mktemp("newcomer"))
    (sh,) = blocks("sh")
    assert "docker build -t mysite:1 ." in sh
    subprocess.run(["bash", "-euc", sh], cwd=base, check=True, capture_output=True, timeout=600)
    site = base / "mysite"
    (yml,) = blocks("yaml")
    (site / "mysite.yaml").write_text(yml)
    yield site
    subprocess.run(["docker", "rmi", "-f", "mysite:1"], capture_output=True, timeout=120)


def with_settings(site: Path, name: str, text: str) -> Path:
    """A copy of a README file with a state dir of the test's own and no metrics port (what they print is the
    same; the host's defaults stay untouched)."""
    doc = yaml.safe_load(text)
    doc.setdefault("settings", {}).update({"state_dir": str(site / "state"), "metrics": None})
    (site / name).write_text(yaml.safe_dump(doc))
    return site / name


def test_the_quickstart_shows_what_it_says(mysite: Path) -> None:
    (out,) = [b for b in blocks("") if "$ $A validate mysite.yaml" in b]
    said = out.splitlines()
    # validate, as shown (its state_dir is the default one: no daemon there, so no reload plan either)
    got = activator("validate", "mysite.yaml", cwd=mysite)
    assert got == said[1:said.index("$ $A run -c mysite.yaml")]
    cfg = with_settings(mysite, "run.yaml", (mysite / "mysite.yaml").read_text())
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], mysite / "run.log") as proc:
        before = "\n".join(activator("status", "-c", str(cfg), cwd=mysite))
        assert "mysite  on 127.0.0.1:8000  0/1 instance(s), 0 open connection(s)" in before  # nothing runs yet
        with socket.create_connection(("127.0.0.1", 8000), timeout=30) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            body = b""
            while chunk := c.recv(65536):
                body += chunk
        assert body.endswith(b"<h1>hello from mysite</h1>\n")
        after = "\n".join(activator("status", "-c", str(cfg), cwd=mysite))
        assert "mysite  on 127.0.0.1:8000  1/1 instance(s)" in after and " restore " in after
        assert stop(proc) == 0
    log = (mysite / "run.log").read_text()
    for line in said:
        if line.startswith("activator.builder: ") or line.startswith("activator: service=mysite checkpoint"):
            # the README's log lines, less timestamp and level (and the build time and page size, which vary)
            def varying(text: str) -> str:
                text = re.sub(r"built in [\d.]+s", "built in", text)
                return re.sub(r"\([\d.]+ (B|KiB|MiB|GiB) of pages\)", "(SIZE of pages)", text)

            assert varying(line.split(": ", 1)[1]) in varying(log), line


def _image_missing(site: Path) -> list[str]:
    assert subprocess.run(["docker", "image", "inspect", "mysite:2"], capture_output=True).returncode != 0
    (site / "mysite.yaml").write_text((site / "readme.yaml").read_text().replace("mysite:1", "mysite:2"))
    return activator("validate", "mysite.yaml", cwd=site)


def _user_missing(site: Path) -> list[str]:
    (site / "mysite.yaml").write_text((site / "readme.yaml").read_text() + "    user: app\n")
    return activator("validate", "mysite.yaml", cwd=site)


def _port_in_use(site: Path) -> list[str]:
    (site / "mysite.yaml").write_text((site / "readme.yaml").read_text())
    with socket.socket() as other:  # another server on the port (an earlier case's connection may linger)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", 8000))
        other.listen()
        return activator("validate", "mysite.yaml", cwd=site)


def _not_root(site: Path) -> list[str]:
    (site / "mysite.yaml").write_text((site / "readme.yaml").read_text())
    # uid 1000 in a user namespace of its own: not root for activator, the checkout still readable
    return activator("run", "-c", "mysite.yaml", cwd=site,
                     prefix=("unshare", "--user", "--map-user=1000", "--map-group=1000"))


def _wrong_port(site: Path) -> list[str]:
    text = (site / "readme.yaml").read_text().replace("port: 8000 ", "port: 8080 ")
    (site / "mysite.yaml").write_text(text)
    cfg = with_settings(site, "wrong.yaml", text)
    proc = subprocess.Popen([*ACTIVATOR, "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=site)
    try:
        return shown(until_line(proc, "NOT serving"), site)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()


def _reload_other(site: Path) -> list[str]:
    state = {"state_dir": str(site / "state"), "metrics": None}
    doc = yaml.safe_load((site / "readme.yaml").read_text()) | {"settings": state}
    (site / "mysite.yaml").write_text(yaml.safe_dump(doc))
    shutil.copy(site / "mysite.yaml", site / "other.yaml")
    with daemon([*ACTIVATOR, "run", "-c", str(site / "mysite.yaml")], site / "reload.log") as proc:
        refused = activator("reload", "-c", "other.yaml", cwd=site)
        assert activator("reload", "-c", "mysite.yaml", cwd=site) != refused  # control: its own file reloads
        assert stop(proc) == 0
    return refused


def _criu_missing(site: Path) -> list[str]:
    text = "settings:\n  criu: /usr/local/bin/criu-nope\n" + (site / "readme.yaml").read_text()
    (site / "mysite.yaml").write_text(text)
    return activator("validate", "mysite.yaml", cwd=site)


def _podman_unreachable(site: Path) -> list[str]:
    if Path("/run/podman/podman.sock").exists():
        pytest.skip("Podman's API socket exists on this host: the line names an unreachable one")
    (site / "mysite.yaml").write_text("settings:\n  images: {engine: podman}\n" + (site / "readme.yaml").read_text())
    return activator("validate", "mysite.yaml", cwd=site)


#: HOST_CASES' key -> how the mistake is made for real; what activator prints must hold the quoted line
MISTAKES: dict[str, Callable[[Path], list[str]]] = {
    "is not in the local": _image_missing,
    "is not in the image's /etc/passwd": _user_missing,
    "is already in use by another process": _port_in_use,
    "must run as root": _not_root,
    "the app listens on port": _wrong_port,
    "reloads only its own file": _reload_other,
    "CRIU not found": _criu_missing,
    "cannot reach the Podman engine": _podman_unreachable,
}


def test_every_host_case_is_made_for_real() -> None:
    assert set(MISTAKES) == set(HOST_CASES)


@pytest.mark.parametrize(("page", "line"), [pl for pl in quoted_lines() if case_of(pl[1], HOST_CASES)])
def test_a_host_problem_is_printed_as_quoted(mysite: Path, page: str, line: str) -> None:
    key = case_of(line, HOST_CASES)
    assert key is not None
    (mysite / "readme.yaml").write_text(blocks("yaml")[0])
    printed = MISTAKES[key](mysite)
    assert line in printed, f"{page} quotes {line!r}; activator printed {printed}"
