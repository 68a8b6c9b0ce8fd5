"""Each service's checkpoint, as the running daemon keeps it: the first build (or the check that the stored one is
current), retries with the service's backoff when it fails, and an operator's rebuild. A service is independent
of the others throughout: its build failing refuses its own connections (reason no-checkpoint), nobody else's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from activator.checkpoints.exchange import CheckpointExchange
from activator.config.service import ServiceConfig
from activator.core import liveview
from activator.errors import ActivatorError

from . import systemd
from .fleet import Fleet

log = logging.getLogger("activator")


class Builds:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._checking: set[str] = set()  # services whose checkpoint is being checked or built
        fleet.on_used_up = self.refresh

    def refresh(self, svc: ServiceConfig) -> None:
        """A stateful service's instance is gone: its checkpoint is made again from the volumes as it left them
        (the stored one is marked used, so ensure() rebuilds it), retried like a first build if it fails."""
        log.info("service=%s its instance is gone; making its checkpoint again (stateful)", svc.name)
        self.fleet.tasks.spawn(self.first(svc, quiet=True), name=f"checkpoint-refresh:{svc.name}")

    async def first(self, svc: ServiceConfig, *, quiet: bool = False) -> None:
        """The service's first checkpoint; on failure, retried in the background until one is made. quiet: not
        announced as serving (it was, before its checkpoint was used up)."""
        if not await self._build(svc, quiet=quiet):
            self.fleet.tasks.spawn(self._retry(svc), name=f"checkpoint-retry:{svc.name}")

    async def prune_after(self, first: list[asyncio.Task[None]]) -> None:
        """Unpacked images no checkpoint uses go, once the first builds are done."""
        await asyncio.gather(*first, return_exceptions=True)
        if self.fleet.host is not None:
            await self.fleet.host.builder.prune_images()

    def share(self, svc: ServiceConfig) -> None:
        """A checkpoint built here goes to the checkpoint registry, in the background (serving does not wait)."""
        assert self.fleet.host is not None
        exchange = self.fleet.host.builder.exchange
        if not exchange.shares(svc):
            return

        async def push() -> None:
            try:
                await exchange.push(svc)
            except ActivatorError as e:
                log.warning("service=%s pushing its checkpoint failed: %s (other hosts build their own)", svc.name, e)

        self.fleet.tasks.spawn(push(), name=f"checkpoint-push:{svc.name}")

    async def import_archive(self, path: str = "", name: str = "") -> dict[str, Any]:
        """Install a checkpoint image (activator checkpoint import) and switch new instances to it."""
        from pathlib import Path

        from activator.checkpoints import ociarchive, transfer

        assert self.fleet.host is not None
        image = await asyncio.to_thread(ociarchive.read, Path(path))
        svc = transfer.service_of(image, self.fleet.config, name or None)
        ck = await self.fleet.host.builder.exchange.import_archive(Path(path), svc, rename=bool(name))
        self.fleet.use(svc, ck)
        return {"service": svc.name, "dir": str(ck.dir), "pages_bytes": ck.pages_bytes, "digest": image.digest}

    async def pull(self, name: str = "") -> dict[str, Any]:
        """Pull the checkpoint this host would build from the registry, install it and use it."""
        svc = self.fleet.config.service(name)
        exchange = self._with_registry()
        wanted, image, _ = await exchange.builds.wanted(svc)
        ck = await exchange.pull(svc, wanted, image)
        assert ck is not None  # not quiet: an absent one is an error
        self.fleet.use(svc, ck)
        return {"service": svc.name, "dir": str(ck.dir), "ref": exchange.registry_ref(svc, wanted)}

    async def push(self, name: str = "") -> dict[str, Any]:
        svc = self.fleet.config.service(name)
        return {"service": svc.name, "ref": await self._with_registry().push(svc)}

    async def export(self, name: str = "", path: str = "") -> dict[str, Any]:
        from pathlib import Path

        svc = self.fleet.config.service(name)
        assert self.fleet.host is not None
        from activator.checkpoints import signing

        key = self.fleet.host.builder.exchange.sign_key
        doc = await self.fleet.host.builder.exchange.export(svc, Path(path), key)
        return {"service": svc.name, "path": path, "size": doc.size, "digest": doc.digest,
                "signed": f"signed by {signing.key_id(key.public_key())}" if key is not None else ""}

    def _with_registry(self) -> CheckpointExchange:
        assert self.fleet.host is not None
        if self.fleet.host.builder.exchange.registry is None:
            raise ActivatorError(f"{self.fleet.config.path}: settings.checkpoint_registry is not set")
        return self.fleet.host.builder.exchange

    async def rebuild(self, name: str = "") -> dict[str, Any]:
        """Build a fresh checkpoint for one service and switch new instances to it; running ones carry on."""
        svc = self.fleet.config.service(name)
        assert self.fleet.host is not None
        ck, _ = await self.fleet.host.builder.ensure(svc, rebuild=True)
        self.fleet.use(svc, ck)
        self.share(svc)
        log.info("service=%s checkpoint rebuilt in %.1fs on request", svc.name, ck.build_seconds)
        return {"service": svc.name, "dir": str(ck.dir), "build_seconds": ck.build_seconds,
                "listening_ports": list(ck.listening_ports), "pages_bytes": ck.pages_bytes}

    async def _build(self, svc: ServiceConfig, failures: int = 0, quiet: bool = False) -> bool:
        """One attempt at the service's checkpoint. False (logged, counted, service refusing) if it failed."""
        self._checking.add(svc.name)
        self.tell_progress()
        try:
            return await self._build_once(svc, failures, quiet)
        finally:
            self._checking.discard(svc.name)
            self.tell_progress()

    async def _build_once(self, svc: ServiceConfig, failures: int, quiet: bool) -> bool:
        fleet = self.fleet
        assert fleet.host is not None
        builder = fleet.host.builder
        service = fleet.services.get(svc.name)
        if service is None or service.config is not svc:
            return True  # a reload removed or replaced it before this attempt: its own build is under way
        t0 = time.monotonic()
        try:
            checkpoint, source = await builder.ensure(svc)
        except ActivatorError as e:
            why = str(e)
        except Exception as e:  # a bug must not take the other services down with it
            log.exception("service=%s checkpoint build crashed", svc.name)
            why = f"{type(e).__name__}: {e}"
        else:
            if fleet.services.get(svc.name) is not service:
                return True  # a reload replaced it meanwhile: this checkpoint is for a definition gone
            if source != "stored":
                fleet.tasks.spawn(builder.prune_images(), name="prune-images")
            if source == "built":
                service.m.checkpoint_builds.inc()
                service.m.checkpoint_build_duration.observe(time.monotonic() - t0)
                log.info("service=%s checkpoint built in %.1fs (%s of pages)", svc.name,
                         checkpoint.build_seconds, liveview.size(checkpoint.pages_bytes))
                self.share(svc)
            had = service.checkpoint is not None or quiet
            fleet.use(svc, checkpoint)
            if fleet.ready.is_set() and not had:
                log.info("service=%s serving on %s", svc.name, " ".join(str(a) for a in svc.listen))
                if fleet.on_service:
                    fleet.on_service(svc, None)
            return True
        if fleet.services.get(svc.name) is not service:
            return True
        delay = svc.backoff.delay(failures + 1)
        service.m.checkpoint_build_failures.inc()
        service.checkpoint_failed(why, delay)
        log.error("service=%s not serving: no checkpoint (%s); its connections are refused; next attempt in %gs",
                  svc.name, why, delay)
        if fleet.ready.is_set() and fleet.on_service and failures == 0:
            fleet.on_service(svc, why)
        return False

    def tell_progress(self) -> None:
        """systemd's STATUS= (what `systemctl status` shows) while checkpoints are being checked or built."""
        if self._checking:
            systemd.notify(f"STATUS=checkpoints: checking or building {', '.join(sorted(self._checking))}")
        elif self.fleet.ready.is_set():
            systemd.notify(f"STATUS={self.fleet.status_line()}")

    async def _retry(self, svc: ServiceConfig) -> None:
        failures = 1
        service = self.fleet.services[svc.name]
        while service.checkpoint is None:
            await asyncio.sleep(svc.backoff.delay(failures))
            if self.fleet.services.get(svc.name) is not service:
                return  # a reload removed or replaced it
            if service.checkpoint is not None:
                return  # an operator's `activator checkpoint --rebuild` got there first
            if await self._build(svc, failures):
                return
            failures += 1
