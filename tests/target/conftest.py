"""The machine of the observation-only scenarios: a host given with ``--target ssh://...`` (a real
TDX host; the software module and fault plans are not used there). Without it they are skipped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.machine.ssh import SshError, SshMachine, SshTarget


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Iterator[SshMachine]:
    url = request.config.getoption("--target")
    if not url:
        pytest.skip("needs a host: --target ssh://user@host[:port] (or TDXH_TARGET)")
    try:
        machine = SshMachine(SshTarget.parse(url, request.config.getoption("--target-key")))
    except ValueError as err:
        raise pytest.UsageError(str(err)) from err
    except SshError as err:
        pytest.fail(str(err), pytrace=False)
    with machine:
        yield machine
