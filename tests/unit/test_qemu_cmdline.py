"""The QEMU command line and memory layout derived from a typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.launch import platform_for
from harness.machine.base import Boot
from harness.machine.qemu import QemuConfig, nested_vmx_available, parse_size, qemu_command

G = 1 << 30


def command(config: QemuConfig, seam: Path | None = Path("/t/seam")) -> list[str]:
    return qemu_command(config, Boot(Path("/k/bzImage"), Path("/k/initrd"), "quiet"), (4321, 4322), seam,
                        Path("/t/qmp"))


def arg_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_default_machine():
    argv = command(QemuConfig())
    assert arg_after(argv, "-machine") == ["q35,accel=tcg"]
    assert arg_after(argv, "-cpu") == ["max,vendor=GenuineIntel,+ss"]
    assert arg_after(argv, "-smp") == ["2,sockets=1,cores=2,threads=1"]
    append = arg_after(argv, "-append")[0]
    for needed in ("console=ttyS0", "8250.nr_uarts=4", "nohibernate", "setcpuid=movdir64b", "panic=-1",
                   "retain_initrd", "tsc=nowatchdog", "quiet"):
        assert needed in append.split()
    # COM1 is the console, COM2 the module, in that order.
    assert arg_after(argv, "-serial") == ["chardev:con0", "chardev:seam0"]
    # The console over loopback TCP without Nagle (test_console_stall: no byte lost).
    assert "socket,id=con0,host=127.0.0.1,port=4321,nodelay=on" in arg_after(argv, "-chardev")
    # The command channel: COM4 (0x2E8, IRQ 3: the guest's ttyS3), over TCP as well.
    assert "socket,id=cmd0,host=127.0.0.1,port=4322,nodelay=on" in arg_after(argv, "-chardev")
    assert arg_after(argv, "-device") == ["isa-serial,chardev=cmd0,index=3"]
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_no_module_leaves_com2_unconnected():
    assert arg_after(command(QemuConfig(), seam=None), "-serial") == ["chardev:con0", "null"]


def test_numa_nodes_sum_memory_and_split_cpus():
    argv = command(QemuConfig(cpus=4, sockets=2, numa=("1G", "3G")))
    assert arg_after(argv, "-m") == ["4096M"]
    assert arg_after(argv, "-numa") == ["node,nodeid=0,memdev=ram0,cpus=0-1", "node,nodeid=1,memdev=ram1,cpus=2-3"]


def test_erratum_cpu_model():
    argv = command(QemuConfig(cpu_family_model=(6, 0x8F)))
    assert arg_after(argv, "-cpu") == ["max,vendor=GenuineIntel,+ss,family=6,model=143"]


@pytest.mark.parametrize("machine,memory,expected", [
    ("q35", "2G", [(0, 2 * G)]),
    ("q35", "4G", [(0, 2 * G), (4 * G, 2 * G)]),
    ("q35", "2560M", [(0, 2560 << 20)]),
    ("pc", "4G", [(0, 3 * G), (4 * G, G)]),
    ("pc", "3G", [(0, 3 * G)]),
])
def test_ram_layout(machine, memory, expected):
    assert QemuConfig(machine=machine, memory=memory).ram_ranges() == expected


def test_platform_matches_machine():
    platform = platform_for(QemuConfig(cpus=6, sockets=2, memory="4G"))
    assert [(c.apic_id, c.package) for c in platform.cpus] == [(0, 0), (1, 0), (2, 0), (4, 1), (5, 1), (6, 1)]
    assert platform.cmrs == ((1 << 20, 2 * G - (1 << 20)), (4 * G, 2 * G))


@pytest.mark.parametrize("bad", [{"cpus": 3, "sockets": 2}, {"cpus": 1, "numa": ("1G", "1G")}])
def test_inconsistent_config_is_refused(bad):
    with pytest.raises(ValueError):
        QemuConfig(**bad)


def test_parse_size():
    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 * G and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_launch_error_cleans_up_and_names_the_problem(tmp_path):
    from harness.machine.base import LaunchError
    from harness.machine.qemu import QemuMachine
    from harness.seam.module import TdxModule
    from harness.seam.trace import Trace

    trace_file = open(tmp_path / "trace.jsonl", "w")
    machine = QemuMachine(QemuConfig(), Boot(tmp_path / "missing-bzImage", tmp_path / "initrd"),
                          TdxModule(trace=Trace(sink=trace_file)), tmp_path / "run")
    with pytest.raises(LaunchError, match=r"kernel .*missing-bzImage does not exist"):
        machine.start()
    sock_dir = machine._sock_dir  # made by start(), removed by the stop() of its failure path
    assert sock_dir is not None and not sock_dir.exists() and trace_file.closed


def test_memory_hotplug_slots():
    assert arg_after(command(QemuConfig(memory="2G", dimm_slots=2, maxmem="8G")), "-m") == ["2G,slots=2,maxmem=8G"]
    with pytest.raises(ValueError, match="dimm_slots and maxmem"):
        QemuConfig(dimm_slots=1)


def test_base_append_is_replaceable():
    append = arg_after(command(QemuConfig(base_append="console=ttyS0 hibernate=no")), "-append")[0]
    assert append.split() == ["console=ttyS0", "hibernate=no", "quiet"]


def test_nested_vmx_needs_kvm_and_the_nested_parameter(tmp_path):
    kvm, nested = tmp_path / "kvm", tmp_path / "nested"
    assert not nested_vmx_available(kvm, nested)  # neither exists
    kvm.write_text("")
    nested.write_text("N\n")
    assert not nested_vmx_available(kvm, nested)
    nested.write_text("Y\n")
    assert nested_vmx_available(kvm, nested)
