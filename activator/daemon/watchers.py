"""What the daemon keeps an eye on while it runs, each a loop the lifecycle owner starts and shutdown cancels:
the connections each service's steering mode steers (sampled, since they send no events), the instance
network's rules (put back when a firewall reload or a neighbour took them), the services' images (told when one
moved on), the services' keep_alive_schedule windows, and systemd's watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from activator.config import schedule
from activator.tasks import spawn

from . import systemd
from .fleet import Fleet
from .service import Service
from .steering import Sample

log = logging.getLogger("activator")

#: how often services' image references are compared with what their checkpoints hold, seconds
IMAGE_CHECK_INTERVAL = 60.0
#: how often kernel-path connections are sampled (conntrack and counters: a few ms of a worker thread each)
METER_INTERVAL = 0.25
#: how often keep_alive_schedule windows are compared with the local time, seconds
SCHEDULE_INTERVAL = 5.0
#: every this many meter ticks (5 s), the iptables accepts are checked
FIREWALL_CHECK_TICKS = 20


async def meter(fleet: Fleet) -> None:
    """Connections a mode steers send no events: each service's mode samples them (steering.Mode.sample; one
    conntrack dump and counter read for all of them) a few times a second, and the service folds the sample.

    The services' samples run side by side, and one still running at the next tick is not started again: a mode
    whose sample is slow (handoff reads the descriptor tables of an app's processes, which an app can make
    large) holds up its own service's counts only, never the others'."""
    tick = 0
    failing = False
    pending: dict[Service, asyncio.Task[Sample]] = {}
    try:
        while True:
            tick += 1
            started = time.monotonic()
            shared = None
            network = fleet.network
            if network is not None and fleet.network_open:
                await keep_network(fleet, tick)
                try:
                    shared = await asyncio.to_thread(network.sample)
                    failing = False
                except Exception as e:  # a netlink hiccup must not end the sampling, nor hold up the other modes'
                    if not failing:  # once until it works again: every tick would flood the log
                        log.warning("sampling the kernel path failed: %s; its counts stand still until it works", e)
                    failing = True
            cost = time.monotonic() - started
            for svc in (*fleet.services.values(), *fleet.retiring):
                if not svc.mode.steers:
                    continue
                # Each tick, a sample still running or not: an app can make its sample slow (large descriptor
                # tables), and must not win time to undo its socket meanwhile
                try:
                    svc.mode.guard()
                except Exception as e:
                    log.warning("service=%s keeping its %s mode's socket failed: %s", svc.name, svc.mode.name, e)
                if svc not in pending:
                    pending[svc] = spawn(svc.mode.sample(list(svc.instances), shared, svc.arrived),
                                         name=f"sample:{svc.name}", awaited=True)
            if pending:
                await asyncio.wait(pending.values(), timeout=METER_INTERVAL)
            for svc, task in list(pending.items()):
                if not task.done():
                    continue
                del pending[svc]
                try:
                    svc.fold(task.result(), svc.clock.now())
                except Exception as e:  # a netlink hiccup must not end the sampling for good
                    log.warning("service=%s sampling its %s mode failed: %s", svc.name, svc.mode.name, e)
            # A kernel sample costs ~10 us per connection (a flood of thousands: tens of ms of the GIL): never
            # more than a tenth of the daemon's time.
            waited = time.monotonic() - started - cost  # on the services' samples, at most METER_INTERVAL
            await asyncio.sleep(max(METER_INTERVAL, 9 * cost) - min(METER_INTERVAL, waited))
    finally:
        for task in pending.values():
            task.cancel()


async def keep_network(fleet: Fleet, tick: int) -> None:
    """Put back what the host's firewall tools took: our tables (checked every tick, ~1 ms) and our iptables
    accepts (every FIREWALL_CHECK_TICKS, two `iptables -C`). Counted, logged; a failed repair is retried."""
    net = fleet.network
    assert net is not None
    for svc in (*fleet.services.values(), *fleet.retiring):
        if svc.mode.failures:
            fleet.metrics.kernel_path_failures.labels(svc.name).inc(svc.mode.failures)
            svc.mode.failures = 0
    try:
        if not await asyncio.to_thread(net.intact):
            await asyncio.to_thread(net.repair)
            fleet.metrics.network_repairs.labels("nftables").inc()
            log.warning("the instance network's nftables tables were missing or out of date (a firewall reload?); "
                        "put back with every instance and service rule")
        if tick % FIREWALL_CHECK_TICKS == 0 and not await asyncio.to_thread(net.firewall_intact):
            await asyncio.to_thread(net.repair_firewall)
            fleet.metrics.network_repairs.labels("iptables").inc()
            log.warning("activator's accepts in iptables were gone (a Docker restart or a firewall reload?); "
                        "put back")
    except Exception as e:  # retried next tick; the services keep their userspace path meanwhile
        if tick % FIREWALL_CHECK_TICKS == 0:
            log.warning("repairing the instance network failed: %s; retrying", e)


async def watch_images(fleet: Fleet) -> None:
    """Tell (activator_checkpoint_outdated, a log line) when a service's image reference has moved on to
    another image than its checkpoint holds, e.g. after a `docker pull`. Not rebuilt on its own: a rebuild
    runs the new image's app, which is an operator's call (`activator checkpoint --rebuild`, a restart)."""
    assert fleet.host is not None
    images = fleet.host.builder.images
    told: set[tuple[str, str]] = set()
    while True:
        await asyncio.sleep(IMAGE_CHECK_INTERVAL)
        resolved: dict[str, Any] = {}  # one engine query per image reference per round
        for service in list(fleet.services.values()):
            ck = service.checkpoint
            if ck is None:
                continue
            ref = service.config.image
            try:
                if ref not in resolved:
                    resolved[ref] = await asyncio.to_thread(images.resolve, ref, service.name)
                image = resolved[ref]
            except Exception as e:  # the engine away, the image removed: not a reason to stop watching
                log.debug("service=%s image check failed: %s", service.name, e)
                continue
            outdated = image.id != ck.origin.image_id
            service.m.checkpoint_outdated.set(int(outdated))
            if outdated and (service.name, image.id) not in told:
                told.add((service.name, image.id))
                log.warning("service=%s image %s is now %s, its checkpoint holds %s; rebuild it with "
                            "`activator checkpoint --rebuild %s` when ready", service.name, service.config.image,
                            image.short_id, ck.origin.image_id[:19], service.name)


async def keep_alive_schedules(fleet: Fleet) -> None:
    """keep_alive_schedule: each service told whether the host's local time is inside one of its windows. Every
    SCHEDULE_INTERVAL seconds, so a window's edge (or a reload that adds one) takes effect within that."""
    while True:
        now = time.localtime()
        for svc in list(fleet.services.values()):
            windows = svc.config.keep_alive_schedule
            svc.keep_warm(bool(windows) and schedule.active(windows, now.tm_wday, now.tm_hour * 60 + now.tm_min))
        await asyncio.sleep(SCHEDULE_INTERVAL)


async def ping_watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval / 3)
