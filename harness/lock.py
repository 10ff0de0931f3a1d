"""A lock file shared by processes using one cache (parallel pytest workers, a CLI build next to
a test run): one of them builds, the others wait and then find the build done."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from harness.deadline import Deadline

log = logging.getLogger("harness.lock")


class LockTimeout(Exception):
    """Another process held the lock past the deadline."""


@contextlib.contextmanager
def file_lock(path: Path, what: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; ``what`` names the work for the waiting message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = Deadline.after(timeout)
    with open(path, "a") as handle:
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline.expired():
                    raise LockTimeout(f"{path} still locked after {timeout:.0f}s: another process is "
                                      f"still busy with {what}") from None
                if not announced:
                    log.info("waiting for another process to finish %s (lock %s)", what, path)
                    announced = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
