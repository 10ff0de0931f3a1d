"""Bochs machine config: the bochsrc it renders, the RAM layout and CPU topology the module is
given, the boot loader config. No emulator needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.images.iso import IsoError, isolinux_cfg
from harness.machine.bochs import (
    BASE_APPEND,
    BochsConfig,
    BochsFiles,
    platform_for_bochs,
    render_bochsrc,
)
from harness.machine.bochs_install import BochsInstall
from harness.seam.platform import PlatformConfig

GIB = 1 << 30
MIB = 1 << 20


def files(seam_port: int | None = 4321) -> BochsFiles:
    return BochsFiles(bios=Path("/c/BIOS-bochs-latest"), vgabios=Path("/c/vgabios.bin"), iso=Path("/c/boot.iso"),
                      log=Path("/run/bochs.log"), console_port=1234, seam_port=seam_port,
                      command_port=5678)


def directives(text: str) -> dict[str, str]:
    """bochsrc lines as {directive: options}; comments dropped."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(":")
            assert key not in out, f"directive {key} twice"
            out[key] = value.strip()
    return out


def test_default_bochsrc_is_headless_vmx_with_console_and_module_as_tcp_clients():
    rc = directives(render_bochsrc(BochsConfig(), files()))
    assert rc["display_library"] == "term, options=\"hideIPS\""
    assert rc["cpu"] == ("model=tigerlake, count=1:1:1, ips=20000000, quantum=32, reset_on_triple_fault=0, "
                         "ignore_bad_msrs=1")
    assert rc["memory"] == "guest=1024, host=1024"
    assert rc["com1"] == "enabled=1, mode=socket-client, dev=127.0.0.1:1234"
    assert rc["com2"] == "enabled=1, mode=socket-client, dev=127.0.0.1:4321"
    assert rc["com4"] == "enabled=1, mode=socket-client, dev=127.0.0.1:5678"  # the command channel
    assert rc["ata0-master"] == "type=cdrom, path=/c/boot.iso, status=inserted"
    assert rc["boot"] == "cdrom"
    assert rc["romimage"] == "file=/c/BIOS-bochs-latest, options=fastboot"
    assert rc["vgaromimage"] == "file=/c/vgabios.bin"
    assert rc["log"] == "/run/bochs.log"
    assert rc["panic"] == "action=fatal"  # a Bochs panic or guest triple fault ends Bochs
    assert rc["clock"] == "sync=none, time0=utc"
    assert rc["pci"] == "enabled=1, chipset=i440fx"


def test_bochsrc_without_module_leaves_com2_unconnected():
    rc = directives(render_bochsrc(BochsConfig(), files(seam_port=None)))
    assert rc["com2"] == "enabled=1, mode=null"


def test_bochsrc_topology_memory_model_and_ips():
    config = BochsConfig(memory="6G", cpus=4, sockets=2, cpu_model="arrow_lake", ips=20_000_000)
    rc = directives(render_bochsrc(config, files()))
    assert rc["cpu"].startswith("model=arrow_lake, count=2:2:1, ips=20000000,")
    assert rc["memory"] == "guest=6144, host=6144"


def test_bochsrc_rendering_is_pure():
    assert render_bochsrc(BochsConfig(), files()) == render_bochsrc(BochsConfig(), files())


@pytest.mark.parametrize("bad", ["/a b/boot.iso", "/a,b/boot.iso", '/a"b/boot.iso'])
def test_bochsrc_refuses_paths_its_parser_would_split(bad):
    with pytest.raises(ValueError, match="Bochs cannot take the path"):
        render_bochsrc(BochsConfig(), BochsFiles(Path("/b"), Path("/v"), Path(bad), Path("/l"), 1, 2, 3))


@pytest.mark.parametrize(("memory", "ranges"), [
    ("512M", [(0, 512 * MIB)]),
    ("1G", [(0, GIB)]),
    ("3G", [(0, 3 * GIB)]),
    # 3..4 GiB of the configured size sits behind the PCI hole: the BIOS reports 3 GiB only.
    ("3584M", [(0, 3 * GIB)]),
    ("4G", [(0, 3 * GIB)]),
    ("6G", [(0, 3 * GIB), (4 * GIB, 2 * GIB)]),
])
def test_ram_ranges_follow_the_bochs_bios_e820(memory, ranges):
    assert BochsConfig(memory=memory).ram_ranges() == ranges


def test_platform_cmrs_are_the_ram_above_1m_and_cpus_the_bochs_apic_ids():
    platform = platform_for_bochs(BochsConfig(memory="6G", cpus=4, sockets=2))
    assert platform.cmrs == ((MIB, 3 * GIB - MIB), (4 * GIB, 2 * GIB))
    assert [(c.apic_id, c.package) for c in platform.cpus] == [(0, 0), (1, 0), (2, 1), (3, 1)]


def test_platform_keeps_the_base_settings():
    platform = platform_for_bochs(BochsConfig(), PlatformConfig(module_present=False))
    assert platform.module_present is False
    assert [c.apic_id for c in platform.cpus] == [0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cpus": 3, "sockets": 2}, "split evenly"),
    ({"cpus": 3}, "power-of-two"),
    ({"cpus": 6, "sockets": 2}, "power-of-two"),
    ({"memory": "1000K"}, "whole MiB"),
    ({"ips": 1000}, "too low"),
    ({"smp_quantum": 64}, "quantum"),
])
def test_config_refuses_what_bochs_cannot_build(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BochsConfig(**kwargs)


def test_cmdline_order_and_base():
    config = BochsConfig(extra_append="tdx_sw_module.timeout_ms=60000")
    assert config.cmdline("quiet") == f"{BASE_APPEND} tsc_early_khz=20000 quiet tdx_sw_module.timeout_ms=60000"
    assert "console=ttyS0,115200" in BASE_APPEND and "8250.nr_uarts=4" in BASE_APPEND
    assert "reboot=t" in BASE_APPEND  # a reboot must end Bochs like QEMU's -no-reboot
    assert "setcpuid=movdir64b" not in BASE_APPEND  # tigerlake has MOVDIR64B


def test_isolinux_cfg_boots_the_image_kernel_at_once():
    cfg = isolinux_cfg("console=ttyS0,115200 panic=-1")
    assert "PROMPT 0" in cfg and "TIMEOUT 0" in cfg
    assert "  KERNEL /bzImage\n" in cfg
    assert "  APPEND initrd=/initrd.img console=ttyS0,115200 panic=-1\n" in cfg


@pytest.mark.parametrize("bad", ["a\nb", "x" * 3000])
def test_isolinux_cfg_refuses_what_the_kernel_cannot_take(bad):
    with pytest.raises(IsoError):
        isolinux_cfg(bad)


def test_install_command_runs_trixies_loader_with_its_libc_first():
    install = BochsInstall(Path("/c/bochs/3.0/root"), "3.0+dfsg-1")
    cmd = install.command("-q", "-f", "rc")
    assert cmd[0] == "/c/bochs/3.0/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert cmd[1] == "--library-path"
    assert cmd[2].split(":")[0] == "/c/bochs/3.0/root/usr/lib/x86_64-linux-gnu"
    assert cmd[3:] == ["/c/bochs/3.0/root/usr/bin/bochs-bin", "-q", "-f", "rc"]
    assert install.env() == {"LTDL_LIBRARY_PATH": "/c/bochs/3.0/root/usr/lib/x86_64-linux-gnu/bochs/plugins",
                             "BXSHARE": "/c/bochs/3.0/root/usr/share/bochs"}


def test_kernel_tsc_frequency_follows_ips():
    """Bochs's TSC counts instructions: the kernel must not believe CPUID's 2.4 GHz."""
    assert BochsConfig(ips=10_000_000).clock_append() == "tsc_early_khz=10000"
    assert "tsc_early_khz=50000" in BochsConfig(ips=50_000_000).cmdline()
