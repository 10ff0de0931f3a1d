"""The far end of a channel, run on a thread while the test waits on the near end."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def guest_thread(body: Callable[[], None]) -> Iterator[None]:
    """Run the guest's side in a thread while the test waits; re-raise its failure."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, name="fake-guest")
    thread.start()
    try:
        yield
    finally:
        thread.join(10)
        assert not thread.is_alive(), "fake guest still running"
    if failures:
        raise failures[0]
