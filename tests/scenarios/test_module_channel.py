"""The shim's channel to the software module (images/kernel/patches/0001, sw_module.c): a module
that stops answering costs one SEAMCALL its deadline (tdx_sw_module.timeout_ms), says so once,
and every later SEAMCALL of that kernel fails at once with VMFAILINVALID instead of waiting the
deadline again with IRQs off. SEAMLDR.INFO (reading tdx_host's seamldr_version) is the SEAMCALL
a TCG guest can issue at will."""

from __future__ import annotations

import errno
import threading
import time

import pytest
from checks import kernel_log

from harness.observe import patterns, tdx_host
from harness.observe.crash import Crash
from harness.seam.abi import SeamldrLeaf

pytestmark = pytest.mark.vm

SHIM_TIMEOUT_MS = 1000
STALL_S = 3.0  # longer than the shim's deadline: the answer comes after it gave up
TIMEOUT_PARAM = "/sys/module/tdx_sw_module/parameters/timeout_ms"


# The stalled SEAMLDR.INFO writes its answer to guest memory after the shim gave up: no MEM_ACK.
@pytest.mark.module_anomalies(r"no MEM_ACK from the guest")
def test_a_module_that_stops_answering_is_latched_dead(boot):
    machine = boot()
    loaded = machine.run(f"{tdx_host.LOAD_TDX_HOST} && echo {SHIM_TIMEOUT_MS} > {TIMEOUT_PARAM}", 60)
    assert loaded.status == 0, loaded.output
    module, answer = machine.module, machine.module.call
    answered = threading.Event()

    def stalled(request, memory):
        if request.fn != SeamldrLeaf.SEAMLDR_INFO:
            return answer(request, memory)
        time.sleep(STALL_S)
        try:
            return answer(request, memory)
        finally:
            answered.set()

    module.call = stalled
    calls = len(module.trace)
    for _ in range(2):
        read = tdx_host.read_attribute(machine, tdx_host.SEAMLDR_VERSION)
        assert read.fails_with(errno.ENODEV), read
    assert answered.wait(STALL_S + 30), "the stalled SEAMLDR.INFO never reached the module"
    # Only the first read reached the module; the second failed in the shim.
    assert [r.leaf for r in module.trace.records[calls:]] == ["SEAMLDR.INFO"]
    log = kernel_log(machine, allow=(Crash.MODULE_UNREACHABLE,))
    log.expect_in_order([patterns.SHIM_EXCHANGE_FAILED, patterns.SHIM_PEER_DEAD])
    assert len(log.all(patterns.SHIM_PEER_DEAD)) == 1
