"""The hole activator makes in the host's iptables for its bridge, and the Docker networks it keeps instances out of.

Docker sets the FORWARD policy to DROP, and a drop in any base chain wins over an accept in ours. Forwarded traffic
to and from the bridge is therefore accepted in Docker's DOCKER-USER chain (or in FORWARD itself when its policy is
DROP without Docker), with rules tagged by a comment so they are found and removed again, and put back when a
Docker restart or an `iptables -F` took them. What instances must not reach through that accept (Docker's own
networks, other instances) is dropped in activator's own nftables table (network.py), where a drop wins.

Blocking (iptables): callers run it in worker threads.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

from activator.errors import ActivatorError

log = logging.getLogger("activator.network")

TAG = "activator"


class FirewallHole:
    """Our two accepts for one bridge, where the host's firewall needs them."""

    def __init__(self, bridge: str) -> None:
        self.bridge = bridge
        self.chain: str | None = None  # where open() put its rules (None: no DROP policy to get past)

    def rules(self) -> list[list[str]]:
        tag = ["-m", "comment", "--comment", f"{TAG} {self.bridge}"]
        return [["-i", self.bridge, *tag, "-j", "ACCEPT"],
                ["-o", self.bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED,DNAT", *tag, "-j", "ACCEPT"]]

    def open(self) -> None:
        if shutil.which("iptables") is None:
            return
        close(self.bridge)  # a previous run's, if any: exactly one set of ours
        chain = "DOCKER-USER" if iptables("-S", "DOCKER-USER").returncode == 0 else None
        if chain is None and "-P FORWARD DROP" in iptables("-S", "FORWARD").stdout:
            chain = "FORWARD"
        if chain is None:
            return
        # The accept gets instance traffic past the DROP policy; what it must not reach (Docker's networks,
        # other instances) is dropped in our own table, where a drop wins over this accept.
        self.chain = chain
        for rule in self.rules():
            out = iptables("-I", chain, *rule)
            if out.returncode != 0:
                raise ActivatorError(f"cannot let instance traffic through the host firewall ({chain}): "
                                     f"{out.stderr.strip()[:200]}")
        log.info("instance traffic accepted in iptables %s (the FORWARD policy is DROP)", chain)

    def intact(self) -> bool:
        if self.chain is None:
            return True
        return all(iptables("-C", self.chain, *rule).returncode == 0 for rule in self.rules())


def iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "LC_ALL": "C"})


def close(bridge: str) -> None:
    """Remove the rules FirewallHole.open() put into iptables (found by their comment), highest number first."""
    if shutil.which("iptables") is None:
        return
    tag = f"/* {TAG} {bridge} */"
    for chain in ("DOCKER-USER", "FORWARD"):
        listing = iptables("-L", chain, "-n", "--line-numbers")
        if listing.returncode != 0:
            continue
        numbers = [int(line.split()[0]) for line in listing.stdout.splitlines()
                   if tag in line and line.split() and line.split()[0].isdigit()]
        for n in sorted(numbers, reverse=True):
            iptables("-D", chain, str(n))


def docker_bridges() -> list[str]:
    """The bridges of the Docker engine's networks (names beyond docker0 and br-*: a network's own
    com.docker.network.bridge.name); none when no engine answers."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            nets = client.api.networks(filters={"driver": "bridge"})
        finally:
            client.close()
    except Exception:  # no engine: no Docker networks to keep instances out of
        return []
    names = []
    for n in nets:
        name = (n.get("Options") or {}).get("com.docker.network.bridge.name")
        if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", name):
            names.append(name)
    return names
