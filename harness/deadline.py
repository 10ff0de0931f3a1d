"""A monotonic deadline, shared by nested waits so that they spend one time budget between them.

Every blocking call in the harness takes one of these (or a number of seconds it turns into one):
there is no "wait forever". Modelled on labgrid's `Timeout`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# The longest a blocking wait in the harness runs without returning to Python code. A signal's
# Python handler (Ctrl-C's KeyboardInterrupt) runs only between bytecodes of the main thread: when
# the signal arrives just before the main thread blocks on a lock or in select(), or the kernel
# hands it to another thread, the main thread learns of it only when its wait returns. Waiting
# in slices bounds how long a Ctrl-C is ignored (tests/unit/test_orphans.py sends one to another thread).
WAIT_SLICE = 0.5


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock, and the budget it was created with (for messages)."""

    expires_at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """A deadline `seconds` from now. Negative budgets are refused: they are always a bug."""
        if seconds < 0:
            raise ValueError(f"a deadline needs a budget >= 0 seconds, got {seconds}")
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.expires_at - time.monotonic())

    def slice(self, longest: float = WAIT_SLICE) -> float:
        """Seconds for one slice of a wait: the remaining time, at most ``longest``. Callers loop
        until their condition holds or the deadline expires."""
        return min(self.remaining(), longest)

    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at

    def within(self, seconds: float) -> Deadline:
        """The earlier of this deadline and one `seconds` from now: a step's own limit inside an
        overall budget."""
        inner = Deadline.after(seconds)
        return inner if inner.expires_at < self.expires_at else self
