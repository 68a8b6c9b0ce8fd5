"""The host as `run`, `checkpoint` and `cleanup` all need it: checked, its state dir locked, leftovers removed.

None of this is the daemon's lifecycle (server.py); the CLI's one-shot commands use it without importing it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activator.config.document import Config
from activator.net.network import HostNetwork
from activator.runtime import ksm, preflight
from activator.runtime.runc import Runc
from activator.runtime.sandbox import Sandbox
from activator.statedir import StateDir

from . import signing
from .builder import CheckpointBuilder
from .images import ImageSource
from .registry import Registry
from .store import CheckpointStore

log = logging.getLogger("activator")


def host_network(config: Config) -> HostNetwork | None:
    """The instance network, if any service is on it (it is made by open(), not here)."""
    if not any(s.network == "bridge" for s in config.services):
        return None
    return HostNetwork(config.settings.network, owner=config.settings.state_dir, config_path=config.path)


@dataclass(frozen=True)
class Host:
    """What `run` and `checkpoint` share once the host is checked and the state dir locked."""

    runc: Runc
    builder: CheckpointBuilder

    @property
    def network(self) -> HostNetwork | None:
        """The instance network, if any service is on it (still to be opened: after crash leftovers are gone)."""
        return self.builder.network

    @property
    def images(self) -> ImageSource:
        return self.builder.images


def open_host(state: StateDir, config: Config) -> Host:
    """Check the host, lock the state dir, and make the tools `run` and `checkpoint` share."""
    preflight.check_root()
    runc_version = preflight.check_runc(state.runc_binary)
    criu_version = preflight.check_criu(state.criu_binary)
    state.lock()
    runc = runc_for(state)
    runc.criu_maps = preflight.criu_maps(state.criu_binary)
    images = ImageSource(state.root, config.settings.images)
    builder = CheckpointBuilder(CheckpointStore(state), images, runc, state.instances, criu_version, runc_version,
                                host_network(config))
    if config.settings.checkpoint_registry is not None:
        builder.exchange.registry = Registry(config.settings.checkpoint_registry)
    builder.exchange.trust, builder.exchange.sign_key = load_trust(config)
    return Host(runc, builder)


def load_trust(config: Config) -> tuple[signing.Trust, Ed25519PrivateKey | None]:
    """settings.checkpoint_trust's keys, read and checked (one line naming the file and key if one is unusable)."""
    t = config.settings.checkpoint_trust
    where = f"{config.path}: settings.checkpoint_trust"
    trust = signing.Trust.load(t.keys, t.insecure_unsigned, where)
    key = signing.load_private(t.sign_key, where) if t.sign_key is not None else None
    if t.insecure_unsigned:
        log.warning("settings.checkpoint_trust.insecure_unsigned is on: UNSIGNED checkpoint images are imported and "
                    "pulled; anyone who can hand this host an archive or write the registry chooses what its "
                    "instances run. Lab use only")
    return trust, key


def runc_for(state: StateDir) -> Runc:
    """The runc activator drives for this state dir, with the CRIU configuration it writes for it."""
    runc = Runc(state.runc_root, state.runc_binary, state.criu_binary)
    runc.write_criu_config()
    return runc


async def clean_leftovers(state: StateDir, runc: Runc, images: ImageSource | None = None,
                          network: HostNetwork | None = None) -> list[str]:
    """Remove everything a previous run of this state dir left: containers, mounts, namespaces, cgroups,
    instance directories, half-built checkpoints, half-unpacked images and the Docker containers used to
    unpack them. Call with the state dir locked (nothing else can be making any of these).

    Every instance a dead run knew of has a directory under instances/ or runc/ (one whose restore runc never
    finished has only the latter); each is released the way a live instance is (Sandbox.release).
    """
    # The steering table first: a dead run's rules still send clients to the instances about to be removed.
    net = await asyncio.to_thread(network.remove_leftovers) if network is not None else []
    containers = await runc.list()
    for name in containers:
        await runc.delete(name)
    names = {d.name for root in (state.instances, state.runc_root) if root.is_dir() for d in root.iterdir()
             if d.is_dir()}
    for name in sorted(names):
        await Sandbox(name, state.instances, runc).release()
    # Replaced checkpoints were kept only for instances that had them mounted; none survive a restart.
    retired = await asyncio.to_thread(CheckpointStore(state).sweep_retired)
    partial = state.leftover_builds()
    for d in partial:
        await asyncio.to_thread(shutil.rmtree, d, True)
    exporters = await asyncio.to_thread(images.remove_leftovers) if images is not None else []
    ksm_restored = await asyncio.to_thread(ksm.restore_saved, state.root / ksm.SAVED_NAME)
    return (net + [f"container {n}" for n in containers] + [f"instance {n}" for n in sorted(names - set(containers))]
            + [f"replaced checkpoint {d}" for d in retired] + [f"partial {d.parent.name}/{d.name}" for d in partial]
            + [f"image export container {c}" for c in exporters]
            + (["the host's KSM settings (put back as they were)"] if ksm_restored else []))
