"""A scenario that fails on purpose, for the reproducer tests (tests/scenarios/test_reproduce.py).
The default run never collects it (its name is not test_*.py); it runs only when named."""

from __future__ import annotations

from harness.observe import patterns
from harness.seam import abi
from harness.seam.faults import FaultPlan, FaultRule

KEY_CONFIG_FAILS = FaultRule(leaf=abi.Leaf.TDH_SYS_KEY_CONFIG, status=abi.Status.TDX_KEY_GENERATION_FAILED)


def test_tdx_initializes_although_key_config_fails(boot):
    machine = boot(faults=FaultPlan([KEY_CONFIG_FAILS]))
    log = machine.run("dmesg", 120).output
    assert patterns.INITIALIZED.search(log), "no 'TDX-Module initialized' after an injected KEY.CONFIG failure"
