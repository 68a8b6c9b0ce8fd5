"""What a reload changes: the difference between the running configuration and the file as it is now.

Pure: no I/O. The lifecycle owner (server.py) carries a Plan out; `activator validate` shows it beforehand.

A service is
  added      its name is new: it gets listeners, a checkpoint and an instance slot, as at start;
  removed    its name is gone: its listeners close at once, its connections drain (drain_timeout), then it goes;
  changed    anything in its definition differs. If only keys in IN_PLACE differ (what the service's decisions
             read, not what shaped its checkpoint, sandbox, process, listeners or steering rule), the running
             service takes the new definition and keeps its instances: no restore is paid for a new idle_timeout.
             Otherwise it gets a new checkpoint if what shapes the process changed, and a new set of instances;
             the running ones finish their connections on the old definition;
  unchanged  left alone: no connection or instance of it is touched. If only whether it shares memory changed
             (`share_memory: auto` decides from the whole file: adding a second service turns the first one's
             sharing off), that applies to its next instances; the running ones keep theirs until they are
             reaped (a process cannot be made unmergeable from outside), which is safe both ways: an instance
             that no longer shares cannot merge with another service's.

Settings are the daemon's own (state dir, network, metrics address, binaries): a change to them needs a restart,
and a reload that changes them is refused as a whole, except drain_timeout, which applies at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from activator.config.document import Config
from activator.config.service import ServiceConfig
from activator.errors import ConfigError

#: settings a reload may change
RELOADABLE_SETTINGS = frozenset({"drain_timeout", "checkpoint_trust"})

#: service keys a running service takes on a reload without new instances. Each is read when a decision is made
#: (daemon/service.py, its launcher, proxy.py per connection, watchers.py), or re-applied by the reload
#: (daemon/reloading.py: idle timers re-armed, standbys and min_instances refilled, the kernel limit re-installed
#: for max_connections and client_idle_timeout). A connection already open keeps the timeouts it started with.
#: Not here, on purpose: anything that shapes the checkpoint or the sandbox, the listeners, the steering rule
#: (probes, protocol), handoff, http, proxy_protocol, wake_on, fallback, prepared_slots (slots already made are
#: not taken back), refuse_with, stateful, share_memory, resources.
IN_PLACE = frozenset({
    "idle_timeout", "idle_cpu_below", "min_instances", "max_instances", "target_connections", "max_connections",
    "max_waiting", "standby", "backoff", "restore_timeout", "connect_timeout", "client_idle_timeout",
    "client_silent_timeout", "wake_grace", "waiting_page", "keep_alive_schedule", "pre_stop", "stop_signal",
    "stop_grace",
})


@dataclass(frozen=True)
class Change:
    old: ServiceConfig
    new: ServiceConfig
    keys: tuple[str, ...]  # the keys that differ
    new_checkpoint: bool  # something that shapes the process changed

    @property
    def in_place(self) -> bool:
        """The running service takes the new definition; its instances stay."""
        return in_place(self.keys)


@dataclass(frozen=True)
class Plan:
    added: tuple[ServiceConfig, ...]
    removed: tuple[ServiceConfig, ...]
    changed: tuple[Change, ...]
    unchanged: tuple[str, ...]
    resharing: tuple[tuple[str, bool], ...] = ()  # unchanged services whose derived sharing flips: (name, shares)
    settings: tuple[str, ...] = ()  # reloadable settings that changed

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def describe(self) -> list[str]:
        lines = [f"add {s.name} (on {' '.join(str(a) for a in s.listen)})" for s in self.added]
        lines += [f"remove {s.name} (its connections drain first)" for s in self.removed]
        for c in self.changed:
            if c.in_place:
                lines.append(f"change {c.new.name}: {', '.join(c.keys)} (in place: running instances keep serving)")
                continue
            what = "a new checkpoint" if c.new_checkpoint else "the same checkpoint"
            lines.append(f"change {c.new.name}: {', '.join(c.keys)} ({what}; running instances finish on the old "
                         "definition)")
        if self.unchanged:
            lines.append(f"keep {', '.join(self.unchanged)} untouched")
        for name, shares in self.resharing:
            lines.append(f"{name}: memory sharing (share_memory: auto) turns {'on' if shares else 'off'} for its "
                         "next instances; running ones keep theirs until reaped")
        for name in self.settings:
            lines.append(f"settings.{name}: " + ("the next import, pull, export and push use the new keys"
                                                 if name == "checkpoint_trust" else "takes effect now"))
        return lines or ["nothing to change"]


def plan_reload(old: Config, new: Config) -> Plan:
    """Raises ConfigError (one line) when the new file changes what only a restart can change."""
    fixed = [f.name for f in fields(old.settings)
             if f.name not in RELOADABLE_SETTINGS and getattr(old.settings, f.name) != getattr(new.settings, f.name)]
    if fixed:
        raise ConfigError(f"{new.path}: settings.{fixed[0]} changed; settings other than "
                          f"{', '.join(sorted(RELOADABLE_SETTINGS))} take effect on a restart, not a reload: "
                          "revert it, or restart the service")
    before = {s.name: s for s in old.services}
    after = {s.name: s for s in new.services}
    added = tuple(s for s in new.services if s.name not in before)
    removed = tuple(s for s in old.services if s.name not in after)
    changed: list[Change] = []
    unchanged: list[str] = []
    resharing: list[tuple[str, bool]] = []
    for s in new.services:
        o = before.get(s.name)
        if o is None:
            continue
        keys = _differing(o, s)
        if keys:
            changed.append(Change(o, s, tuple(keys), o.checkpoint_fingerprint() != s.checkpoint_fingerprint()))
        else:
            unchanged.append(s.name)
            if old.shares_memory(o) != new.shares_memory(s):
                resharing.append((s.name, new.shares_memory(s)))
    settings = tuple(f.name for f in fields(old.settings) if f.name in RELOADABLE_SETTINGS
                     and getattr(old.settings, f.name) != getattr(new.settings, f.name))
    return Plan(added, removed, tuple(changed), tuple(unchanged), tuple(resharing), settings)


def in_place(keys: tuple[str, ...] | list[str]) -> bool:
    return bool(keys) and all(k in IN_PLACE for k in keys)


def _differing(a: ServiceConfig, b: ServiceConfig) -> list[str]:
    return [f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]

