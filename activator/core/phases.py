"""A client connection's phases, as values: events in, actions out (the sans-I/O style of mitmproxy's layers).
No sockets, no clock (the time is passed in), no tasks; daemon/proxy.py feeds it what its transports and timers
see and carries out what it answers.

    HELD ──first byte / wake_grace of silence / admitted when no wake is needed──> WAKING ──spliced──> SPLICED
      │                                                                              │                  │
      └── EOF or reset before a byte: CLOSED (counted as ignored, wakes nothing) ────┴── any close ─────┴─> CLOSED

Two timers, as deadlines this state holds and the proxy arms: the phase timer (wake_grace while held; then
client_idle_timeout, no byte either way) and the silent timer (client_silent_timeout: a client that never sent a
byte). An action is what the proxy must do now: wake (acquire an instance, stop reading the client meanwhile),
keep reading while held (a first byte, a close or a reset must be seen), (re)arm or disarm a timer, close and
count why.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: a remaining time below this is no time at all (a timer that fired a hair early)
EPSILON = 0.001


class Phase(enum.Enum):
    HELD = "held"  # accepted and admitted; nothing forwarded yet
    WAKING = "waking"  # an instance being acquired and its app dialled
    SPLICED = "spliced"  # bytes pass both ways
    CLOSED = "closed"


class Why(enum.Enum):
    """Why a connection was closed by us (each has its counter)."""

    IGNORED = "ignored"  # it left before sending a byte: a scan, a health check of the port
    IDLE = "idle"  # no byte either way for client_idle_timeout
    SILENT = "silent"  # the client never sent a byte in client_silent_timeout


@dataclass(frozen=True)
class Wake:
    """Acquire an instance and dial it; stop reading the client until spliced."""


@dataclass(frozen=True)
class KeepReading:
    """Held for waking: read on, so the first byte, a close or a reset is seen."""


@dataclass(frozen=True)
class Arm:
    """(Re)arm the phase timer to fire `delay` from now; None disarms it."""

    delay: float | None


@dataclass(frozen=True)
class ArmSilent:
    delay: float | None


@dataclass(frozen=True)
class Close:
    why: Why


Action = Wake | KeepReading | Arm | ArmSilent | Close


@dataclass(frozen=True)
class Timeouts:
    wake_on_connect: bool  # wake_on: connect
    wake_grace: float | None  # with wake_on: data, silence this long wakes anyway (None: only data does)
    idle: float | None  # client_idle_timeout
    silent: float | None  # client_silent_timeout


class ConnectionPhases:
    """One connection's phase and timers. Each method takes an event (and the time it happened) and returns the
    actions, in order."""

    def __init__(self, timeouts: Timeouts, now: float) -> None:
        self.t = timeouts
        self.phase = Phase.HELD
        self.last_activity = now
        self.client_spoke = False

    def admitted(self, now: float, *, needs_wake: bool) -> list[Action]:
        """Accepted and admitted. needs_wake: no instance could take it now (a restore would be needed)."""
        out: list[Action] = []
        if self.t.silent is not None:
            out.append(ArmSilent(self.t.silent))
        if self.t.wake_on_connect or not needs_wake:
            return out + self._wake()
        out.append(KeepReading())
        if self.t.wake_grace is not None:
            out.append(Arm(self.t.wake_grace))
        elif self.t.idle is not None:
            out.append(Arm(self.t.idle))
        return out

    def client_data(self, now: float) -> list[Action]:
        """Bytes from the client (held or passed on)."""
        self.last_activity = now
        out: list[Action] = []
        if not self.client_spoke:
            self.client_spoke = True
            if self.t.silent is not None:
                out.append(ArmSilent(None))  # it has spoken: a quiet session from now on is a feature
        if self.phase is Phase.HELD:
            out += self._wake()
        return out

    def backend_data(self, now: float) -> list[Action]:
        self.last_activity = now
        return []

    def client_gone(self, *, holding_bytes: bool) -> list[Action]:
        """EOF or a reset from the client before the splice. Before waking, with nothing held: it wakes nothing
        and is counted as ignored. Otherwise the EOF is passed on at the splice (nothing to do now)."""
        if self.phase is Phase.HELD and not holding_bytes:
            return self._close(Why.IGNORED)
        return []

    def spliced(self, now: float) -> list[Action]:
        """Header, held bytes and EOF are on their way to the app: from now on bytes pass, and idling counts."""
        if self.phase is not Phase.WAKING:
            return []
        self.phase = Phase.SPLICED
        if self.t.idle is None:
            return []
        self.last_activity = now
        return [Arm(self.t.idle)]

    def timer(self, now: float) -> list[Action]:
        """The phase timer fired."""
        if self.phase is Phase.CLOSED:
            return []
        if self.phase is Phase.HELD and self.t.wake_grace is not None:
            return self._wake()  # silent for wake_grace: a server-speaks-first client
        if self.t.idle is None or self.phase is Phase.WAKING:
            return []
        remaining = self.last_activity + self.t.idle - now
        if remaining > EPSILON:
            return [Arm(remaining)]
        return self._close(Why.IDLE)

    def silent(self) -> list[Action]:
        """client_silent_timeout after it was accepted, the client has not sent a byte: not a quiet session (it
        never began one), a connection holding an instance for nothing."""
        if self.phase is Phase.CLOSED or self.client_spoke:
            return []
        return self._close(Why.SILENT)

    def closed(self) -> None:
        """Closed for any other reason (a side lost, refused while waking, shutdown): no more actions."""
        self.phase = Phase.CLOSED

    def _wake(self) -> list[Action]:
        self.phase = Phase.WAKING
        # While waking and spliced the phase timer is the idle one, armed once spliced (no waking connection
        # is closed for idling: it waits for its instance, bounded by the service's own timeouts).
        return [Arm(None), Wake()]

    def _close(self, why: Why) -> list[Action]:
        self.phase = Phase.CLOSED
        return [Arm(None), ArmSilent(None), Close(why)]
