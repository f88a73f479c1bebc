"""One backoff for everything batchd tries again later: polls, cancels, deletions, writes on a full disk."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Backoff:
    """When to try something again: after ``initial`` seconds, doubling up to ``maximum`` while it keeps
    failing (or finding nothing new), back to the start once it succeeds.

    Times are monotonic: a clock jump neither hastens nor stalls a retry.
    """

    initial: float
    maximum: float
    #: The wait in force (0: not backing off).
    interval: float = 0.0
    due_at: float = 0.0
    failures: int = 0

    def due(self) -> bool:
        return time.monotonic() >= self.due_at

    def waiting(self) -> bool:
        """Whether a failure's pause is running now."""
        return bool(self.interval) and not self.due()

    def seconds_left(self) -> float:
        return max(0.0, self.due_at - time.monotonic())

    def failed(self) -> float:
        """It failed (or found nothing new): wait longer than last time. Returns the wait."""
        self.failures += 1
        self.interval = self.initial if not self.interval else min(self.interval * 2, self.maximum)
        self.due_at = time.monotonic() + self.interval
        return self.interval

    def succeeded(self) -> bool:
        """It went through: no wait. Returns whether it had been failing."""
        was_failing = bool(self.interval)
        self.interval = self.due_at = 0.0
        self.failures = 0
        return was_failing

    def next_after(self, changed: bool) -> None:
        """For something done periodically (a poll): the shortest wait after a change, longer and
        longer while nothing changes."""
        if changed:
            self.interval, self.failures = 0.0, 0
        self.failed()

    def now(self) -> None:
        """Make the next try due at once, keeping the current wait for the one after."""
        self.due_at = 0.0
