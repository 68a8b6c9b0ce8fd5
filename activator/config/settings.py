"""settings: the daemon's own keys (state_dir, metrics, the engine images come from, the bridge, the checkpoint
registry and trust, the balancer agent).

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .addresses import Address, ListenAddress, Subnet
from .declare import Section, key
from .kinds import HOUR, AbsPath, AbsPaths, Duration, Flag, Text


@dataclass(frozen=True)
class NetworkSettings:
    """The host side of instance networking: one bridge and one subnet, owned by this activator."""

    bridge: str = key(Text(pattern=r"[a-zA-Z][a-zA-Z0-9_-]{0,14}", hint="an interface name, at most 15 characters"),
                      "activator0", doc="the bridge instances are attached to (created and owned by activator)")
    subnet: ipaddress.IPv4Network = key(
        Subnet(), ipaddress.IPv4Network("10.89.0.0/24"),
        doc="instance addresses; the first one is the bridge's (the instances' gateway). Must not overlap any "
            "address or route of the host (Docker's default bridge is 172.17.0.0/16)")


IMAGE_ENGINES = ("docker", "podman")
#: where each engine's Docker-compatible API listens when settings.images.socket is null (docker: DOCKER_HOST first)
DEFAULT_ENGINE_SOCKETS = {"docker": Path("/var/run/docker.sock"), "podman": Path("/run/podman/podman.sock")}


@dataclass(frozen=True)
class ImageSettings:
    """Where images come from: an engine's Docker-compatible API, spoken by the Docker SDK. Nothing runs under
    the engine; it resolves names and hands over image configs and root filesystems."""

    engine: str = key(Text(choices=IMAGE_ENGINES), "docker",
                      doc="docker, or podman (its Docker-compatible API: `systemctl enable --now podman.socket`)")
    socket: Path | None = key(AbsPath(), None, nullable=True,
                              doc="the engine's API socket (null: DOCKER_HOST or /var/run/docker.sock for docker, "
                                  "/run/podman/podman.sock for podman)")

    @property
    def name(self) -> str:
        return "Podman" if self.engine == "podman" else "Docker"


@dataclass(frozen=True)
class RegistrySettings:
    """Where checkpoint images are shared between hosts (docs/multi-host.md): a daemon without a current
    checkpoint pulls one before it builds, and pushes what it builds, so a fleet builds each checkpoint once."""

    repository: str = key(
        Text(pattern=r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)+",
             hint="REGISTRY[:PORT]/PATH, like registry.example:5000/activator"),
        doc="images go to REPOSITORY/SERVICE:TAG (the tag names what the checkpoint was built from)")
    tls_verify: bool = key(Flag(), True, doc="verify the registry's TLS certificate (false only for a plain-HTTP "
                                             "registry on a network you own)")
    auth_file: Path | None = key(AbsPath(), None, nullable=True,
                                 doc="credentials, as `skopeo login --authfile` or `docker login` write them")
    pull: bool = key(Flag(), True, doc="pull a checkpoint before building one")
    push: bool = key(Flag(), True, doc="push every checkpoint built here")
    timeout: float = key(Duration(1, HOUR), 300.0, doc="longest one push or pull may take")


@dataclass(frozen=True)
class TrustSettings:
    """Who may make the checkpoints this host restores from elsewhere (an archive file or the registry): images are
    signed with Ed25519 over their manifest digest (checkpoints/signing.py) and verified before anything of them
    is unpacked. Only a builder host (or CI) holds a signing key; hosts that only pull hold none."""

    keys: tuple[Path, ...] = key(AbsPaths(), (), doc="public keys (PEM, from `activator checkpoint keygen`) whose "
                                                    "signatures this host accepts on imported or pulled checkpoints")
    sign_key: Path | None = key(AbsPath(), None, nullable=True,
                                doc="private key (0600) that signs what this host exports or pushes (null: none)")
    insecure_unsigned: bool = key(Flag(), False, doc="LAB ONLY: accept unsigned checkpoint images (an archive from "
                                                     "anyone then runs as its author wishes in an instance)")


@dataclass(frozen=True)
class AgentSettings:
    """An endpoint for L4 balancers (HAProxy's agent-check): per service, its state here and how warm it is."""

    listen: ListenAddress = key(Address(), doc="HOST:PORT the agent answers on (HAProxy's agent-port)")
    drain_notice: float = key(
        Duration(0, HOUR), 2.0,
        doc="on SIGTERM, answer `drain` this long while still serving, so balancers stop sending before the "
            "listeners close (at least the balancer's agent-inter)")


@dataclass(frozen=True)
class Settings:
    state_dir: Path = key(AbsPath(), Path("/var/lib/activator"),
                          doc="checkpoints, unpacked images, instances and logs (root only)")
    metrics: ListenAddress | None = key(Address(), ListenAddress("127.0.0.1", 9464), nullable=True,
                                        doc="Prometheus scrape endpoint HOST:PORT (null: off)")
    drain_timeout: float = key(Duration(0, HOUR), 10.0,
                               doc="on SIGTERM, how long open connections may finish before they are cut")
    runc: str = key(Text(), "runc", doc="the runc binary (a name on PATH or a path), built with CRIU support")
    criu: str = key(Text(), "criu", doc="the CRIU binary (a name on PATH or a path) runc and activator run")
    images: ImageSettings = key(Section(ImageSettings), factory=ImageSettings,
                                doc="the engine services' images come from (docker, or podman)")
    network: NetworkSettings = key(Section(NetworkSettings), factory=NetworkSettings,
                                   doc="the bridge and subnet instances with network: bridge live on")
    checkpoint_registry: RegistrySettings | None = key(
        Section(RegistrySettings), None, nullable=True,
        doc="share checkpoints through an OCI registry (null: every host builds its own)")
    agent: AgentSettings | None = key(Section(AgentSettings), None, nullable=True,
                                      doc="answer L4 balancers' agent checks (null: off)")
    checkpoint_trust: TrustSettings = key(Section(TrustSettings), factory=TrustSettings,
                                          doc="signing keys for checkpoint images that travel between hosts")

    def __post_init__(self) -> None:
        reg, trust = self.checkpoint_registry, self.checkpoint_trust
        if reg is not None and reg.pull and not trust.keys and not trust.insecure_unsigned:
            raise ValueError("checkpoint_registry.pull: pulled checkpoints must be signed, and "
                             "checkpoint_trust.keys names no key to check them with; add the builder's public key "
                             "(`activator checkpoint keygen PATH` on the builder), or set pull: false")
        if reg is not None and reg.push and trust.sign_key is None and not trust.insecure_unsigned:
            raise ValueError("checkpoint_registry.push: pushed checkpoints are signed, and checkpoint_trust.sign_key "
                             "is not set; name this builder's private key, or set push: false on hosts that only "
                             "pull")
