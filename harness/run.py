"""Running host commands: log the exact command line first, copy output to a log file, bound
the run with a deadline, and fail with what was run, the exit status and the output tail."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("harness.run")


class CommandError(Exception):
    def __init__(self, argv: Sequence[str], status: int | None, tail: str, log_path: Path | None) -> None:
        what = "timed out" if status is None else f"exited with status {status}"
        where = f"; full output in {log_path}" if log_path else ""
        super().__init__(f"`{shlex.join(argv)}` {what}{where}\n{tail}")
        self.argv, self.status, self.tail, self.log_path = list(argv), status, tail, log_path


def run(argv: Sequence[str], *, cwd: Path | None = None, timeout: float, log_path: Path | None = None,
        env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None) -> str:
    """Run ``argv`` to completion within ``timeout`` seconds; return its output (stdout+stderr).
    The process group is killed on timeout or Ctrl-C, so nothing is left behind."""
    log.info("$ %s%s", f"cd {shlex.quote(str(cwd))} && " if cwd else "", shlex.join(argv))
    full_env = {**os.environ, **(env or {})}
    sink = open(log_path, "a") if log_path else None
    lines: list[str] = []
    proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if sink:
                sink.write(line)
            if on_line:
                on_line(line)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(argv, timeout)
        status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise CommandError(argv, None, "".join(lines[-30:]), log_path) from None
    except BaseException:
        _kill(proc)
        raise
    finally:
        if sink:
            sink.close()
    if status:
        raise CommandError(argv, status, "".join(lines[-30:]), log_path)
    return "".join(lines)


def _kill(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
