"""Reading a paused guest's memory after a silent death, against a fake QMP that serves memsave
from a made-up memory map laid out as Linux 7.3 lays out its variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.machine import postmortem
from harness.machine.postmortem import CONSOLE_NBCON_STATE, NbconState

SYMBOLS = {"panic_cpu": 0xFFFFFFFF81830ACC, "log_buf": 0xFFFFFFFF818A7308, "log_buf_len": 0xFFFFFFFF818A7300,
           "univ8250_console": 0xFFFFFFFF818BE620}
LOG_BUF = 0xFFFFFFFF819CA038


@dataclass
class FakeQmp:
    memory: dict[int, bytes]  # address -> bytes from there
    saved: list[int] = field(default_factory=list)

    def command(self, name: str, **args: Any) -> Any:
        assert name == "memsave" and args["cpu-index"] == 0
        address = args["val"] % (1 << 64)  # int64 on the wire
        self.saved.append(address)
        Path(args["filename"]).write_bytes(self.memory[address][:args["size"]])

    def hmp(self, command_line: str) -> str:
        assert command_line == "info registers -a"
        return "CPU#0\nRIP=ffffffff8126ccf1"

    def status(self) -> str:
        return "shutdown"


def record(record_id: int, text: str) -> bytes:
    return record_id.to_bytes(8, "little") + text.encode()


def guest(panic_cpu: int, nbcon_atom: int) -> FakeQmp:
    ring = (record(7, "mce: [Hardware Error]: Machine check: Processor context corrupt")
            + record(8, "Kernel panic - not syncing: Fatal machine check") + bytes(64))
    return FakeQmp({
        SYMBOLS["panic_cpu"]: panic_cpu.to_bytes(4, "little"),
        SYMBOLS["univ8250_console"] + CONSOLE_NBCON_STATE: nbcon_atom.to_bytes(4, "little"),
        SYMBOLS["log_buf"]: LOG_BUF.to_bytes(8, "little"),
        SYMBOLS["log_buf_len"]: len(ring).to_bytes(4, "little"),
        LOG_BUF: ring,
    })


def test_a_console_held_at_the_panic_and_the_unprinted_records(tmp_path: Path):
    # 0x11: priority 1 (normal), unsafe, CPU 0: the port lock of serial_port_runtime_suspend().
    qmp = guest(panic_cpu=1, nbcon_atom=0x11)
    found = postmortem.examine(qmp, SYMBOLS, tmp_path / "memory.bin")  # type: ignore[arg-type]
    assert found.panic_cpu == 1
    assert found.console == NbconState(prio=1, req_prio=0, unsafe=True, unsafe_takeover=False, cpu=0)
    assert str(found.console) == "owned by CPU 0 at priority 1, in an unsafe section"
    assert found.log_text == ["mce: [Hardware Error]: Machine check: Processor context corrupt",
                              "Kernel panic - not syncing: Fatal machine check"]
    assert "panic_cpu: CPU 1" in found.render() and "RIP=ffffffff8126ccf1" in found.render()
    assert not (tmp_path / "memory.bin").exists()


def test_no_panic_and_a_free_console(tmp_path: Path):
    found = postmortem.examine(guest(panic_cpu=0xFFFFFFFF, nbcon_atom=0x40), SYMBOLS,  # type: ignore[arg-type]
                               tmp_path / "memory.bin")
    assert found.panic_cpu == -1 and str(found.console) == "free (last owner CPU 1)"


def test_without_symbols_only_the_registers():
    qmp = guest(panic_cpu=0, nbcon_atom=0)
    found = postmortem.examine(qmp, {}, Path("/nonexistent/never-written"))  # type: ignore[arg-type]
    assert (found.panic_cpu, found.console, found.log_text, qmp.saved) == (None, None, [], [])
    assert "panic_cpu: not read" in found.render()
