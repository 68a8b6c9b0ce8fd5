"""Whether a new client connection is admitted, and why not: the refusals a client sees (and a probe reports),
with the wait a 503's Retry-After gives; and the tally of refusals the log gets at most once per interval.
Plain logic of the service's state and a time passed in; daemon/service.py counts connections in and out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from activator.errors import Rejected

#: rejected connections are logged as a count at most this often per service (each is counted in metrics)
REJECT_LOG_INTERVAL = 10.0


def refusal(name: str, *, closed: bool, stopped: bool, max_connections: int | None, open_connections: int
            ) -> Rejected | None:
    """Why a new connection would be refused now, before any budget is asked (None: it would not be)."""
    if closed:
        return Rejected("shutting-down", f"service '{name}' is shutting down")
    if stopped:
        return Rejected("stopped", f"service '{name}' is stopped (`activator start {name}` serves it again)")
    if max_connections is not None and open_connections >= max_connections:
        return Rejected("max-connections", f"service '{name}' has {max_connections} open connections")
    return None


def queue_full(name: str, *, waiting: int, max_waiting: int) -> Rejected | None:
    """A connection that must wait for a start, when `waiting` already do."""
    if waiting >= max_waiting:
        return Rejected("queue-full", f"service '{name}' already has {waiting} connections waiting (max_waiting)")
    return None


def no_instance(name: str, *, checkpoint_problem: str | None, has_checkpoint: bool, retry_at: float,
                backoff_until: float, now: float) -> Rejected:
    """Nothing runs and nothing may start: no checkpoint (its build failed; until the next attempt) or backing
    off after failed starts (until it ends)."""
    if not has_checkpoint and checkpoint_problem is not None:
        wait = max(0.0, retry_at - now)
        return Rejected("no-checkpoint", f"service '{name}' is not serving: no checkpoint ({checkpoint_problem}); "
                                         f"next build attempt in {wait:.1f}s", wait)
    wait = max(0.0, backoff_until - now)
    return Rejected("backoff", f"service '{name}' has no instance and is backing off for {wait:.1f}s after failed "
                               "starts", wait)


def backoff_seconds(*, checkpoint_problem: bool, retry_at: float, backoff_until: float, now: float) -> float:
    """Until an instance may be attempted: after failed starts, or (no checkpoint) until the next build."""
    wait = max(0.0, backoff_until - now)
    if checkpoint_problem:
        wait = max(wait, retry_at - now)
    return max(0.0, wait)


@dataclass
class RejectionTally:
    """Refusals by reason since the last log line: at most one line per REJECT_LOG_INTERVAL, and every refusal in
    one (what comes after a line is logged when the interval ends, not lost if nothing else comes)."""

    counts: dict[str, int] = field(default_factory=dict)
    latest: str = ""
    logged_at: float | None = None  # when the last line was logged (None: never)

    def add(self, reason: str, n: int, latest: str, now: float) -> float:
        """Count them; returns how long until the line is due (0: log it now)."""
        self.counts[reason] = self.counts.get(reason, 0) + n
        self.latest = latest
        return 0.0 if self.logged_at is None else max(0.0, self.logged_at + REJECT_LOG_INTERVAL - now)

    def line(self, now: float) -> str | None:
        """The tally as one line, or None if there is nothing to say; counting starts over from `now`."""
        if not self.counts:
            return None
        text = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        self.counts.clear()
        self.logged_at = now
        return f"{text} (latest: {self.latest})"
