"""Fuzzing the wire and the module: what a hostile or buggy guest sends never makes the server or
the module raise or hang, and every bad input is reported (ERROR frames, statuses, anomalies).

Generated from one seed, printed at the start; ``TDXH_FUZZ_SEED=N`` replays a run and
``TDXH_FUZZ_SCALE=K`` multiplies the number of cases (the default run makes 10,140);
``TDXH_FUZZ_REPORT=FILE`` appends each test's figures to FILE as JSON lines (scripts/fuzz runs
a longer fuzz that way). A failure names the seed and the case number.
"""

from __future__ import annotations

import enum
import json
import os
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from linux_replay import replay_init

from harness.deadline import Deadline
from harness.seam import abi
from harness.seam.abi import Field, Leaf, OperandId, Status
from harness.seam.call import SeamcallRequest, Variant
from harness.seam.memory import MemoryAccessError, SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.seam.profiles import DEFAULT_PROFILE, PROFILES
from harness.seam.sites import NR_SITES, SiteKind
from harness.seam.state import SysState
from harness.seam.trace import REGISTERS
from harness.transport.errors import ChannelClosed, FramingError
from harness.transport.frames import (
    CRC,
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    PROTO_VERSION,
    CallPayload,
    Decoder,
    ErrorCode,
    ErrorPayload,
    Frame,
    FrameType,
    Hello,
    MemReply,
    MemRequest,
    ReturnPayload,
)
from harness.transport.server import FramingRun, SeamServer

G, M = 1 << 30, 1 << 20
U64 = (1 << 64) - 1
SEED = int(os.environ.get("TDXH_FUZZ_SEED", random.SystemRandom().randrange(1 << 32)))
SCALE = float(os.environ.get("TDXH_FUZZ_SCALE", "1"))
# Per test: a hang fails naming the case (generous: a loaded 2-core CI runs it 4x slower).
TEST_DEADLINE = 120.0 * max(1.0, SCALE)
REPORT = os.environ.get("TDXH_FUZZ_REPORT")
READ_TIMEOUT = 5.0  # per answer the fake guest waits for
RAM = [(0, 2 * G)]
FILLER = bytes(HEADER.size + MAX_PAYLOAD + CRC.size)  # completes any partial frame; holds no magic
# An unknown leaf: no memory, no state; a module that is not ready answers TDX_SYS_NOT_READY
# before looking at the leaf (tdx_vmm_dispatcher.c).
PROBE_LEAF = 0x7777


def cases(default: int) -> int:
    return max(1, int(default * SCALE))


def setup_module() -> None:
    print(f"\nfuzz seed {SEED} (replay with TDXH_FUZZ_SEED={SEED})")


# --- running under a deadline -----------------------------------------------------------------


@dataclass
class Progress:
    """What the fuzz loop is doing, for the failure message."""

    name: str
    case: int = -1
    what: str = ""
    kinds: dict[str, int] = field(default_factory=dict)  # cases per kind, where a test draws kinds

    def __str__(self) -> str:
        return f"{self.name}: seed {SEED}, case {self.case} ({self.what})"

    def report(self, seconds: float) -> None:
        """With TDXH_FUZZ_REPORT: this test's figures, one JSON line."""
        if REPORT:
            with open(REPORT, "a") as out:
                out.write(json.dumps({"test": self.name, "seed": SEED, "cases": self.case + 1,
                                      "seconds": round(seconds, 3), "kinds": self.kinds}) + "\n")


def within(seconds: float, progress: Progress, body: Callable[[], None]) -> None:
    """Run ``body`` on a thread and fail (naming the case) if it has not finished in time."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=run, name=progress.name, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"hung for {seconds:.0f}s at {progress}")
    if failure:
        err = failure[0]
        err.add_note(f"at {progress}")
        raise err
    progress.report(time.monotonic() - started)


def rng_for(name: str) -> random.Random:
    """One stream per test, so a test replays alone with the same seed."""
    return random.Random(f"{SEED}:{name}")


# --- generated values -------------------------------------------------------------------------

KNOWN_LEAVES = [int(leaf) for leaf in Leaf]
# The leaves of host initialization: drawn most often, so that sequences get somewhere.
INIT_LEAVES = [Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_LP_INIT, Leaf.TDH_SYS_RD, Leaf.TDH_SYS_CONFIG, Leaf.TDH_SYS_KEY_CONFIG,
               Leaf.TDH_SYS_TDMR_INIT, Leaf.TDH_SYS_DISABLE, Leaf.TDH_PHYMEM_PAGE_RDMD]
BOUNDARIES = [0, 1, 2, 8, 16, 17, 63, 64, 0xFFF, 0x1000, 0x1008, M, G - 1, G, 2 * G - 0x1000, 2 * G, 3 * G, 4 * G,
              (1 << 46) - 1, 1 << 46, 1 << 63, U64 - 0xFFF, U64]


def reg_value(rng: random.Random) -> int:
    """Registers as a buggy kernel fills them: boundaries, page addresses, field ids, noise."""
    roll = rng.random()
    if roll < 0.25:
        return 0
    if roll < 0.45:
        return rng.choice(BOUNDARIES)
    if roll < 0.65:
        return rng.randrange(0, 3 * G, 0x1000)
    if roll < 0.75:
        return int(rng.choice(list(Field)))
    return rng.getrandbits(64)


def fn_value(rng: random.Random) -> int:
    """RAX: modelled, known-but-unmodelled and unknown leaves, versions, junk high bits."""
    roll = rng.random()
    if roll < 0.55:
        leaf = int(rng.choice(INIT_LEAVES))
    elif roll < 0.75:
        leaf = rng.choice(KNOWN_LEAVES)
    else:
        leaf = rng.choice([5, 12, 99, 0x100, 0x7777, 0xFFFF])
    version = rng.choice([0, 0, 0, 0, 1, 2, 0xFF])
    fn = leaf | version << abi.LEAF_VERSION_SHIFT
    if rng.random() < 0.05:
        fn |= rng.choice([1 << 24, 1 << 40, abi.P_SEAMLDR_LEAF_BIT])
    if rng.random() < 0.02:
        fn = rng.getrandbits(64)
    return fn


def cpu_value(rng: random.Random, platform: PlatformConfig) -> int:
    if rng.random() < 0.9:
        return rng.choice(platform.cpus).apic_id
    return rng.choice([2, 7, 0xFF, 0xFFFFFFFF])  # not CPUs of the platform


# --- 1. SEAMCALL sequences straight into the module -------------------------------------------


def assert_named_status(status: int, fn: int = 0) -> None:
    assert 0 <= status <= U64
    assert status == 0 or abi.status_name(status, fn) != f"{status:#018x}", f"unnamed status {status:#x}"


@dataclass(frozen=True)
class Before:
    """The module as the call found it: what the dispatcher decides on."""

    sys: SysState
    handed_off: bool  # TDH.SYS.SHUTDOWN wrote handoff data
    seam_ready: bool

    @classmethod
    def of(cls, module: TdxModule) -> Before:
        return cls(module.state.sys, module.state.handoff is not None, module.seam.loader.seam_ready)


@dataclass
class Oracle:
    """Expectations that hold whatever the sequence: checked after every call."""

    module: TdxModule
    shut_down: bool = False  # a TDH.SYS.DISABLE succeeded and no TDH.SYS.INIT since

    def check(self, request: SeamcallRequest, before: Before, status: int, regs: tuple[int, ...]) -> None:
        module = self.module
        record = module.trace.records[-1]
        assert (record.fn, record.cpu, record.status) == (request.fn, request.cpu, status), "trace disagrees"
        assert_named_status(status, request.fn)
        assert len(regs) == len(REGISTERS) and all(0 <= r <= U64 for r in regs)
        assert {k: v for k, v in record.outputs.items()} == {
            name: new for name, new, old in zip(REGISTERS, regs, request.regs) if new != old}
        number = request.fn & abi.LEAF_NUMBER_MASK
        bad_rax = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
        if request.fn & abi.P_SEAMLDR_LEAF_BIT:  # the loader answers in its own statuses
            assert status in abi.SeamldrStatus._value2member_map_, record
            return
        if not before.seam_ready:  # an update session cleared SEAM_READY
            assert status == Status.TDX_SEAMCALL_VMFAILINVALID, record
            return
        version = (request.fn >> abi.LEAF_VERSION_SHIFT) & abi.LEAF_VERSION_MASK
        if request.fn >> 24 or not (version == 0 or number in module.platform.profile.versioned_leaves):
            assert status == bad_rax  # the encoding first (tdx_vmm_dispatcher.c)
            return
        # Then the module state, before the leaf is even looked at (tdx_vmm_dispatcher.c).
        if before.sys is SysState.SYS_SHUTDOWN and number not in (
                HANDED_OFF_LEAVES if before.handed_off else SHUTDOWN_LEAVES):
            assert status == Status.TDX_SYS_SHUTDOWN, record
            return
        if before.sys is not SysState.SYS_READY and number not in BEFORE_READY_LEAVES:
            assert status == Status.TDX_SYS_NOT_READY, record
            return
        # Which leaves are modelled grows with the module: judge by what the record says.
        if number not in KNOWN_LEAVES or "not modelled" in (record.note or ""):
            assert status == bad_rax
            return
        if version > 1:  # the versioned leaf's own check, after the state (e.g. tdh_mng_rd_wr.c)
            assert status == bad_rax
            return
        if self.shut_down and number not in (Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_DISABLE):
            assert status != 0, f"{record.leaf} succeeded after TDH.SYS.DISABLE"
        if status == 0 and number == Leaf.TDH_SYS_LP_INIT:
            assert module.platform.package_of(request.cpu) is not None
        if status == 0 and number == Leaf.TDH_SYS_DISABLE:
            self.shut_down = True
        if status == 0 and number == Leaf.TDH_SYS_INIT:
            assert request.reg("rcx") == 0
            self.shut_down = False
        state = module.state
        assert state.lp_initialized <= {cpu.apic_id for cpu in module.platform.cpus}
        if state.sys is SysState.SYS_READY:
            assert state.packages_configured == set(module.platform.packages)
            assert state.global_keyid in module.platform.tdx_keyids


# tdx_vmm_dispatcher.c (1.5): the leaves that run before SYS_READY; in SYS_SHUTDOWN only
# LP.SHUTDOWN. The harness adds TDH.SYS.DISABLE (any state) and SYS.INIT after a DISABLE.
BEFORE_READY_LEAVES = {32, 34, 37, Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_LP_INIT, Leaf.TDH_SYS_CONFIG,
                       Leaf.TDH_SYS_KEY_CONFIG, 44, Leaf.TDH_SYS_UPDATE, Leaf.TDH_SYS_DISABLE}
SHUTDOWN_LEAVES = {44, Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_DISABLE}
# After TDH.SYS.SHUTDOWN (tdh_sys_shutdown.c: the handoff written) SYS.INIT is refused too.
HANDED_OFF_LEAVES = {44, Leaf.TDH_SYS_DISABLE}


def fresh_module(profile: str = DEFAULT_PROFILE) -> tuple[TdxModule, SparseMemory]:
    # TDMR.INIT a GiB a call: the init prefix in 2 calls instead of the module's 512.
    platform = PlatformConfig.for_profile(profile, cmrs=cmrs_for_ram(RAM), tdmr_init_chunk=abi.SZ_1G)
    return TdxModule(platform), SparseMemory(RAM)


def run_sequence(rng: random.Random, length: int) -> list[tuple[int, tuple[int, ...]]]:
    """A random sequence, half the time after a valid Linux init prefix (so the late-state
    leaves see a configured module), on a module of either release; returns (status, regs) per
    call for the replay check."""
    profile = rng.choice(sorted(PROFILES))
    module, memory = fresh_module(profile)
    oracle = Oracle(module)
    prefix = rng.random() < 0.5
    if prefix:
        replay_init(module, [(M, 2 * G)])
    requests = [SeamcallRequest(cpu_value(rng, module.platform), fn_value(rng),
                                tuple(reg_value(rng) for _ in REGISTERS), Variant(rng.randrange(3)))
                for _ in range(length)]
    out = []
    for request in requests:
        before = Before.of(module)
        result = module.call(request, memory)
        oracle.check(request, before, result.status, result.regs)
        out.append((result.status, result.regs))
    # The module is deterministic: the same calls on a fresh module give the same answers.
    again, memory = fresh_module(profile)
    if prefix:
        replay_init(again, [(M, 2 * G)])
    assert [(r.status, r.regs) for r in (again.call(q, memory) for q in requests)] == out, "not deterministic"
    return out


def test_random_seamcall_sequences_into_the_module():
    rng, progress = rng_for("sequences"), Progress("module sequences")
    statuses: set[str] = set()

    def body() -> None:
        for progress.case in range(cases(3000)):
            for status, _ in run_sequence(rng, rng.randint(1, 24)):
                statuses.add(abi.status_name(status & abi.STATUS_MASK))
    within(TEST_DEADLINE, progress, body)
    # The generator reaches well past "operand invalid": success, state errors, metadata errors.
    assert {"TDX_SUCCESS", "TDX_OPERAND_INVALID", "TDX_SYS_LP_INIT_NOT_DONE",
            "TDX_METADATA_FIELD_ID_INCORRECT"} <= statuses, statuses


def mutate_tdmr_bytes(rng: random.Random, data: bytearray) -> None:
    """Overwrite one 8-byte field of a TDMR_INFO (header or reserved area) with a boundary,
    a flipped bit or an off-by-a-page value."""
    offset = rng.randrange(len(data) // 8) * 8
    (value,) = struct.unpack_from("<Q", data, offset)
    value = rng.choice([rng.choice(BOUNDARIES), value ^ 1 << rng.randrange(64),
                        (value + rng.choice([-0x1000, 0x1000, G, -G])) & U64])
    struct.pack_into("<Q", data, offset, value)


class MutatingMemory(SparseMemory):
    """Guest RAM whose TDMR_INFO reads come back mutated: a kernel with a TDMR bug."""

    def __init__(self, rng: random.Random, ram: list[tuple[int, int]], mutations: int) -> None:
        super().__init__(ram)
        self.rng, self.mutations = rng, mutations

    def read(self, pa: int, size: int) -> bytes:
        data = bytearray(super().read(pa, size))
        if size > 64:  # a TDMR_INFO, not the PA array
            for _ in range(self.mutations):
                mutate_tdmr_bytes(self.rng, data)
        return bytes(data)


def test_mutated_tdmr_info_gets_a_tdmr_status():
    """Linux's own init sequence with TDMR_INFO fields overwritten: SYS.CONFIG rejects it with
    a TDMR/PAMT status (or accepts a still valid layout); the failure leaves the module where
    Linux can retry, as the real module does."""
    rng, progress = rng_for("tdmr"), Progress("mutated TDMR_INFO")
    seen: dict[str, int] = {}
    tdmr_statuses = {s.name for s in Status if s.name.startswith(("TDX_INVALID_", "TDX_NON_ORDERED_", "TDX_PAMT_",
                                                                     "TDX_TDMR_"))}

    def body() -> None:
        for progress.case in range(cases(1500)):
            module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G), (4 * G, 2 * G)])))
            memory = MutatingMemory(rng, [(M, 2 * G - M), (4 * G, 2 * G)], rng.randint(1, 3))
            result = replay_init(module, [(M, 2 * G), (4 * G, 6 * G)], memory=memory)
            name = "ok" if result.ok else abi.status_name(result.status & abi.STATUS_MASK)
            seen[name] = seen.get(name, 0) + 1
            if result.failed_leaf == Leaf.TDH_SYS_CONFIG:
                assert name in tdmr_statuses, name
                assert module.state.sys is SysState.SYSINIT_DONE and not module.state.tdmrs
            elif not result.ok:
                # A mutation the module accepted (a still valid layout): Linux's TDMR.INIT loop
                # then names a base, or runs to an end, the module does not have.
                assert result.failed_leaf == Leaf.TDH_SYS_TDMR_INIT, (name, result.failed_leaf)
                assert result.status in (abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX),
                                         Status.TDX_TDMR_ALREADY_INITIALIZED), name
    within(TEST_DEADLINE, progress, body)
    assert len(seen) >= 5, seen  # the mutations reach many different checks


# --- 2. hostile frames through the real server over a Unix socket -----------------------------


def raw_frame(ftype: int, seq: int, payload: bytes = b"", *, flags: int = 0, magic: bytes = MAGIC,
              length: int | None = None, crc_xor: int = 0) -> bytes:
    """A frame as a buggy guest may build it: any type, flags, length field, magic or CRC."""
    head = HEADER.pack(magic, ftype, flags, seq & 0xFFFF, len(payload) if length is None else length)
    return head + payload + CRC.pack(zlib.crc32(head + payload) ^ crc_xor)


@dataclass
class Answers:
    """What the server sent back during one case."""

    frames: list[Frame] = field(default_factory=list)

    def errors(self, code: ErrorCode | None = None) -> list[tuple[int, ErrorPayload]]:
        found = [(f.seq, ErrorPayload.parse(f)) for f in self.frames if f.type is FrameType.ERROR]
        return [(seq, e) for seq, e in found if code is None or e.code is code]

    def error_texts(self, code: ErrorCode | None = None) -> str:
        return "\n".join(f"{seq}: {e.text}" for seq, e in self.errors(code))

    def returns(self) -> list[Frame]:
        return [f for f in self.frames if f.type is FrameType.RETURN]


ANSWER_TYPES = (FrameType.RETURN, FrameType.ERROR, FrameType.HELLO_ACK)


class Guest:
    """The guest end of a served module: raw bytes out, frames in, every read under a deadline.
    It answers the module's memory requests like the shim, for the exchanges it keeps open."""

    def __init__(self, server: SeamServer, sock_path: str) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock_path)
        self.decoder = Decoder()
        self.inbox: list[Frame] = []
        self.memory = SparseMemory(RAM)
        self.probe_seq = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _next(self, deadline: Deadline) -> Frame:
        while not self.inbox:
            self.sock.settimeout(max(deadline.remaining(), 0.001))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                alive = self.server.thread.is_alive()
                raise AssertionError(f"no answer within {READ_TIMEOUT}s (server thread alive: {alive}; "
                                     f"last server error: {self.server.errors.last})") from None
            if not data:
                raise ChannelClosed("server closed the channel")
            for item in self.decoder.feed(data):
                assert isinstance(item, Frame), f"server sent a bad frame: {item}"
                self.inbox.append(item)
        return self.inbox.pop(0)

    def serve_memory(self, frame: Frame) -> None:
        request = MemRequest.parse(frame)
        status, data = 0, b""
        try:
            if frame.type is FrameType.MEM_READ:
                data = self.memory.read(request.pa, request.length)
            else:
                self.memory.write(request.pa, request.data)
        except MemoryAccessError:
            status = 1
        reply = FrameType.MEM_DATA if frame.type is FrameType.MEM_READ else FrameType.MEM_ACK
        self.send(MemReply(request.pa, request.length, status, data).frame(frame.seq, reply).encode())

    def until_return(self, seq: int, answer_memory: Callable[[int], bool],
                     final: tuple[FrameType, ...] = ANSWER_TYPES) -> Answers:
        """Collect the server's frames until the answer (a ``final`` type) for ``seq``."""
        answers, deadline = Answers(), Deadline.after(READ_TIMEOUT)
        while True:
            frame = self._next(deadline)
            answers.frames.append(frame)
            if frame.type in (FrameType.MEM_READ, FrameType.MEM_WRITE) and answer_memory(frame.seq):
                self.serve_memory(frame)
            if frame.seq == seq and frame.type in final:
                return answers

    def probe(self) -> Answers:
        """An unknown leaf with a fresh seq: the stream is usable again iff it gets its RETURN."""
        self.probe_seq = 0xF000 + (self.probe_seq + 1) % 0x1000
        self.send(CallPayload(0, 1, PROBE_LEAF, (0,) * len(REGISTERS)).frame(self.probe_seq).encode())
        # Only its RETURN ends it: a garbage header before it may claim the same seq by chance.
        answers = self.until_return(self.probe_seq, lambda seq: False, final=(FrameType.RETURN,))
        last = answers.frames[-1]
        # What an unknown leaf gets depends only on the state the valid CALLs left the module in.
        assert ReturnPayload.parse(last).status in (Status.TDX_SYS_NOT_READY, Status.TDX_SYS_SHUTDOWN,
                                                     abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX))
        assert not self.inbox, f"frames after the probe's RETURN: {self.inbox}"
        return answers

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire(tmp_path) -> Iterator[Guest]:
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram(RAM)))
    path = str(tmp_path / "seam.sock")
    server = SeamServer(module, path, mem_timeout=2.0, frame_gap=0.05).start()
    guest = Guest(server, path)
    yield guest
    guest.close()
    server.stop()
    assert not server.thread.is_alive()


class Kind(enum.Enum):
    RANDOM_BYTES = "random bytes"
    TRUNCATED = "truncated frame"
    SHORT_FRAME = "frame short of its last 1-3 bytes, then a valid frame"
    OVERSIZED = "oversized length field"
    OVERSIZE_PAYLOAD = "oversized length field and that many payload bytes"
    BAD_CRC = "wrong CRC"
    BAD_MAGIC = "wrong magic"
    UNKNOWN_TYPE = "unknown type or flags"
    FLOOD = "a flood of bad frames from a guest that does not read meanwhile"
    HOST_TYPE = "host-to-guest type from the guest"
    BAD_SIZE = "valid frame, wrong payload size"
    GARBAGE_CALL = "valid CALL, garbage registers"
    GARBAGE_HELLO = "valid HELLO, garbage values"
    GUEST_ERROR = "ERROR frame from the guest"
    INTERLEAVED = "a second CPU's CALL inside an exchange"
    BAD_MEM_REPLY = "wrong memory reply"


GARBAGE = None  # Case.first's reason for bytes without a header: "no magic" or "bytes before magic",
GARBAGE_REASONS = ("no magic", "bytes before magic")  # which depends on how the bytes arrive
FLOOD_BYTES = (64 * 1024, 192 * 1024)  # past the socket buffers when each bad frame got an answer


@dataclass
class Case:
    kind: Kind
    data: bytes  # what the guest sends
    seq: int = 0  # the seq the hostile frame claims
    flush: bool = False  # may leave a partial frame: send FILLER after it
    # The first framing error the guest must hear of, as (seq, reason) (reason GARBAGE: no header),
    # and how many bytes the server drops; None: the bytes hold no framing error.
    first: tuple[int, str | None] | None = None
    dropped: int = 0
    answered: int | None = None  # the seq of a valid request in the bytes that gets an answer

    @property
    def sent(self) -> bytes:
        return self.data + (FILLER if self.flush else b"")


def crc_field(span: bytes) -> int:
    """The CRC a receiver reads from the last four bytes of a frame's span."""
    return struct.unpack("<I", span[-CRC.size:])[0]


def crc_mismatch(span: bytes) -> str:
    return f"CRC mismatch (frame says {crc_field(span):#010x})"


def first_framing_error(data: bytes) -> tuple[int, str | None]:
    """What a decoder reports first on ``data`` received at once: exact when it has a header."""
    error = next(item for item in Decoder().feed(data) if isinstance(item, FramingError))
    return (0, GARBAGE) if error.seq is None else (error.seq, error.reason)


def framing_case(kind: Kind, data: bytes, seq: int, first: tuple[int, str | None], flush: bool = False) -> Case:
    """Bytes none of which form a valid frame: all of them are dropped."""
    case = Case(kind, data, seq, flush, first)
    case.dropped = len(case.sent)
    return case


def clean_probe_like(rng: random.Random) -> bytes:
    """A CALL of the probe leaf with a random seq whose bytes hold no magic but its own."""
    while True:
        data = CallPayload(0, 1, PROBE_LEAF, (0,) * len(REGISTERS)).frame(rng.randrange(1, 0xF000)).encode()
        if data.find(MAGIC, 1) < 0 and data[-4:].find(MAGIC[:1]) < 0:
            return data


def bad_crc_piece(rng: random.Random) -> bytes:
    return raw_frame(rng.choice(list(FrameType)), rng.randrange(1, 0xF000), rng.randbytes(rng.randint(0, 24)),
                     crc_xor=1)


def flood(rng: random.Random, size: int) -> bytes:
    """Small bad frames, so a flood holds thousands of framing errors: wrong CRCs, oversized
    lengths, bytes without a magic, frames one byte short. A short frame is always followed by
    a frame, whose magic cannot be the byte it lacks: no two pieces make a valid frame."""
    pieces: list[bytes] = []
    while size > 0:
        roll = rng.random()
        if roll < 0.4:
            pieces.append(bad_crc_piece(rng))
        elif roll < 0.6:
            pieces.append(HEADER.pack(MAGIC, FrameType.CALL, 0, rng.randrange(1, 0xF000),
                                      rng.randint(MAX_PAYLOAD + 1, 0xFFFF)))
        elif roll < 0.8:
            whole = raw_frame(FrameType.CALL, rng.randrange(1, 0xF000), rng.randbytes(rng.randint(0, 24)))
            if whole[-1:] != MAGIC[:1]:
                pieces += [whole[:-1], bad_crc_piece(rng)]
        else:
            pieces.append(rng.randbytes(rng.randint(1, 16)))
        size -= len(pieces[-1])
    return b"".join(pieces)


def hostile_case(rng: random.Random, kind: Kind) -> Case:
    seq = rng.randrange(1, 0xF000)
    good = CallPayload(rng.randrange(2), rng.randrange(3), fn_value(rng),
                       tuple(reg_value(rng) for _ in REGISTERS)).frame(seq).encode()
    if kind is Kind.RANDOM_BYTES:
        data = bytearray(rng.randbytes(rng.randint(1, 700)))
        for _ in range(rng.randint(0, 3)):  # sprinkle magics so headers get parsed too
            at = rng.randrange(len(data) + 1)
            data[at:at] = MAGIC
        return framing_case(kind, bytes(data), 0, first_framing_error(bytes(data) + FILLER), flush=True)
    if kind is Kind.TRUNCATED:
        data = good[:rng.randrange(HEADER.size, len(good) - 1)]
        return framing_case(kind, data, seq, (seq, crc_mismatch((data + FILLER)[:len(good)])), flush=True)
    if kind is Kind.SHORT_FRAME:
        whole, follower = clean_probe_like(rng), clean_probe_like(rng)
        short = whole[:-rng.randint(1, 3)]
        (claimed,) = struct.unpack_from("<H", short, 4)
        (answered,) = struct.unpack_from("<H", follower, 4)
        # The short frame's span ends inside the follower, which is still found and answered.
        return Case(kind, short + follower, claimed, first=(claimed, crc_mismatch((short + follower)[:len(whole)])),
                    dropped=len(short), answered=answered)
    if kind is Kind.OVERSIZED:
        length = rng.randint(MAX_PAYLOAD + 1, 0xFFFF)
        return framing_case(kind, raw_frame(FrameType.CALL, seq, good[HEADER.size:-CRC.size], length=length), seq,
                            (seq, f"length {length} exceeds {MAX_PAYLOAD}"), flush=True)
    if kind is Kind.OVERSIZE_PAYLOAD:
        payload = rng.randbytes(rng.randint(MAX_PAYLOAD + 1, 3 * MAX_PAYLOAD))
        return framing_case(kind, raw_frame(FrameType.CALL, seq, payload), seq,
                            (seq, f"length {len(payload)} exceeds {MAX_PAYLOAD}"), flush=True)
    if kind is Kind.BAD_CRC:
        data = good[:-CRC.size] + CRC.pack(crc_field(good) ^ (1 << rng.randrange(32)))
        return framing_case(kind, data, seq, (seq, crc_mismatch(data)))
    if kind is Kind.BAD_MAGIC:
        data = bytearray(good)
        data[rng.randrange(2)] ^= 1 << rng.randrange(8)
        return framing_case(kind, bytes(data), seq, (0, GARBAGE), flush=True)
    if kind is Kind.UNKNOWN_TYPE:
        known = {int(t) for t in FrameType}
        ftype = rng.choice([t for t in range(256) if t not in known])
        flags = 0 if rng.random() < 0.7 else rng.randint(1, 255)
        if flags and rng.random() < 0.5:
            ftype = FrameType.CALL
        return framing_case(kind, raw_frame(ftype, seq, good[HEADER.size:-CRC.size], flags=flags), seq,
                            (seq, f"unknown type {ftype:#04x} or flags {flags:#04x}"))
    if kind is Kind.FLOOD:
        data = flood(rng, rng.randint(*FLOOD_BYTES))
        return framing_case(kind, data, 0, first_framing_error(data + FILLER), flush=True)
    if kind is Kind.HOST_TYPE:
        ftype = rng.choice([FrameType.HELLO_ACK, FrameType.RETURN, FrameType.MEM_READ, FrameType.MEM_WRITE,
                            FrameType.MEM_DATA, FrameType.MEM_ACK])
        return Case(kind, raw_frame(ftype, seq, rng.randbytes(rng.randint(0, 120))), seq)
    if kind is Kind.BAD_SIZE:
        if rng.random() < 0.5:
            # Shorter than a CALL with two empty sites: longer ones may parse (names of any size).
            size = CallPayload.FMT.size + NR_SITES * CallPayload.SITE.size
            ftype, length = FrameType.CALL, rng.choice([0, CallPayload.FMT.size, size - 1, rng.randrange(size)])
        else:
            ftype, size = FrameType.HELLO, Hello.FMT.size
            length = rng.choice([0, size - 1, size + 1, size + 8, rng.randint(0, 300)])
            length += length == size
        return Case(kind, raw_frame(ftype, seq, rng.randbytes(length)), seq)
    if kind is Kind.GARBAGE_CALL:
        apic = rng.choice([0, 1, 2, rng.getrandbits(32)])
        variant = rng.choice([0, 1, 2, 2, rng.randrange(3, 256)])
        payload = struct.pack(f"<IB3xQ{len(REGISTERS)}Q", apic, variant, fn_value(rng),
                              *(reg_value(rng) for _ in REGISTERS))
        for _ in range(NR_SITES):
            name = rng.choice([b"", b"kvm_intel", rng.randbytes(rng.randint(0, 56))])
            payload += CallPayload.SITE.pack(rng.getrandbits(64), rng.choice(list(SiteKind)), len(name)) + name
        return Case(kind, raw_frame(FrameType.CALL, seq, payload), seq, answered=seq)
    if kind is Kind.GARBAGE_HELLO:
        version = PROTO_VERSION if rng.random() < 0.7 else rng.getrandbits(32)
        payload = Hello.FMT.pack(version, rng.choice([0, 1, 2, 4096, rng.getrandbits(32)]), rng.getrandbits(32),
                                 rng.getrandbits(32))
        return Case(kind, raw_frame(FrameType.HELLO, seq, payload), seq, answered=seq)
    if kind is Kind.GUEST_ERROR:
        return Case(kind, raw_frame(FrameType.ERROR, seq, rng.randbytes(rng.randint(0, 80))), seq)
    raise AssertionError(kind)


def check_framing_reports(case: Case, answers: Answers, errors: int) -> None:
    """The guest hears of a run of framing errors twice at most: the first error at once, with
    the seq its header claimed, and, if more followed, one summary with their number and the
    bytes dropped (exact: all the case's bad bytes) when a valid frame ends the run."""
    reports = [(seq, e.text) for seq, e in answers.errors(ErrorCode.FRAMING)]
    if case.first is None:
        assert errors == 0 and not reports, reports
        return
    assert errors >= 1 and reports, reports
    (seq, text), *rest = reports
    claimed, reason = case.first
    assert seq == claimed and (text in GARBAGE_REASONS if reason is GARBAGE else text == reason), (reports, case.first)
    assert rest == ([(0, FramingRun(errors, case.dropped).summary())] if errors > 1 else []), reports


def check_hostile(guest: Guest, case: Case) -> None:
    module, server = guest.server.module, guest.server
    channel = server._channel
    assert channel is not None
    calls, errors, framing = len(module.trace), server.errors.total, channel.framing_errors.total
    anomalies = module.anomalies.total
    guest.send(case.sent)
    answers = Answers() if case.answered is None else guest.until_return(case.answered, lambda seq: True)
    answers.frames += guest.probe().frames
    check_framing_reports(case, answers, channel.framing_errors.total - framing)
    texts = answers.error_texts()
    if case.kind in (Kind.HOST_TYPE, Kind.BAD_SIZE):
        assert any(seq == case.seq and e.code is ErrorCode.PROTOCOL for seq, e in answers.errors()), texts
        assert server.errors.total == errors + 1 and module.anomalies.total == anomalies + 1
        assert str(module.anomalies.last).startswith(f"exchange {case.seq} ")
    elif case.kind is Kind.GARBAGE_CALL:
        _, variant = struct.unpack_from("<IB", case.data, HEADER.size)
        # A leaf that reaches guest memory (SEAMLDR.INFO writes its buffer) sends MEM_READ or
        # MEM_WRITE with the call's seq first: the answer is the RETURN or ERROR that ends it.
        answer = next(f for f in answers.frames if f.seq == case.seq and f.type in (FrameType.RETURN, FrameType.ERROR))
        if variant > 2:
            assert answer.type is FrameType.ERROR and "variant" in ErrorPayload.parse(answer).text
        else:
            # The RETURN carries what the module recorded for this call.
            assert answer.type is FrameType.RETURN, texts
            record = module.trace.records[calls]
            assert ReturnPayload.parse(answer).status == record.status
            assert_named_status(record.status, record.fn)
    elif case.kind is Kind.GARBAGE_HELLO:
        answer = next(f for f in answers.frames if f.seq == case.seq)
        (version, cpus, _, _) = Hello.FMT.unpack_from(case.data, HEADER.size)
        if version != PROTO_VERSION:
            assert answer.type is FrameType.ERROR and "protocol" in ErrorPayload.parse(answer).text
        else:
            assert answer.type is FrameType.HELLO_ACK
            if cpus != len(module.platform.cpus):
                assert f"kernel reports {cpus} possible CPUs" in str(module.anomalies.last)
    elif case.kind is Kind.GUEST_ERROR:
        assert server.errors.total == errors + 1 and "guest reported" in str(server.errors.last)
    elif case.kind is Kind.SHORT_FRAME:
        assert channel.framing_errors.total == framing + 1
        assert [f.type for f in answers.frames if f.seq == case.answered] == [FrameType.RETURN], answers.frames
    # Nothing the hostile bytes held was executed, except the valid CALLs and the probe.
    executed = 1 + (case.kind is Kind.SHORT_FRAME) + (
        case.kind is Kind.GARBAGE_CALL and answers.returns()[0].seq == case.seq)
    assert len(module.trace) == calls + executed, [r.leaf for r in module.trace.records[calls:]]


WIRE_KINDS = [k for k in Kind if k not in (Kind.INTERLEAVED, Kind.BAD_MEM_REPLY)]
# Floods and big payloads cost the most bytes: drawn less often than the rest.
WIRE_WEIGHTS = [0.1 if k is Kind.FLOOD else 0.5 if k is Kind.OVERSIZE_PAYLOAD else 1.0 for k in WIRE_KINDS]


def test_hostile_frames_through_the_server(wire: Guest):
    rng, progress = rng_for("hostile"), Progress("hostile frames")
    wire.send(Hello(PROTO_VERSION, 2, 0).frame(1).encode())
    wire.until_return(1, lambda seq: True)

    def body() -> None:
        for progress.case in range(cases(5000)):
            kind = rng.choices(WIRE_KINDS, WIRE_WEIGHTS)[0]
            progress.what = kind.value
            case = hostile_case(rng, kind)
            check_hostile(wire, case)
            progress.kinds[kind.name] = progress.kinds.get(kind.name, 0) + 1
    within(TEST_DEADLINE, progress, body)
    assert set(progress.kinds) == {k.name for k in WIRE_KINDS}
    assert wire.server.thread.is_alive()


def module_reading_memory(guest: Guest) -> Callable[[int], bytes]:
    """TDH.SYS.CONFIG with a valid-looking PA array: after SYS.INIT and every LP.INIT the
    module asks the guest for memory (MEM_READ) before it answers."""
    for cpu, leaf in ((0, Leaf.TDH_SYS_INIT), (0, Leaf.TDH_SYS_LP_INIT), (1, Leaf.TDH_SYS_LP_INIT)):
        seq = 100 + cpu + leaf
        guest.send(CallPayload(cpu, 1, leaf, (0,) * len(REGISTERS)).frame(seq).encode())
        guest.until_return(seq, lambda seq: True)

    def config_call(seq: int) -> bytes:
        regs = (0x10000, 1, 16) + (0,) * (len(REGISTERS) - 3)
        return CallPayload(0, 1, Leaf.TDH_SYS_CONFIG, regs).frame(seq).encode()
    return config_call


def test_interleaved_cpus_and_bad_memory_replies(wire: Guest):
    """A CALL from another CPU (or a reboot's HELLO) while an exchange waits for MEM_DATA: the
    old exchange fails with an ERROR, the new request is still served. Wrong memory replies
    fail their exchange with a named ERROR. The stream stays usable throughout."""
    rng, progress = rng_for("interleaved"), Progress("interleaved exchanges")
    config_call = module_reading_memory(wire)
    module = wire.server.module

    def body() -> None:
        for progress.case in range(cases(600)):
            first, second = 2 * progress.case + 1, 2 * progress.case + 2
            calls = len(module.trace)
            ran = 2  # the first CALL (aborted) and the probe
            if rng.random() < 0.5:
                progress.what = Kind.INTERLEAVED.value
                hello = rng.random() < 0.2
                interloper = (Hello(PROTO_VERSION, 2, 0).frame(second) if hello else
                              CallPayload(1, 1, Leaf.TDH_SYS_RD, (0, int(Field.MAX_TDMRS)) + (0,) * 11).frame(second))
                wire.send(config_call(first) + interloper.encode())
                answers = wire.until_return(second, lambda seq: False)
                answers.frames += wire.probe().frames
                kinds = {f.seq: f.type for f in answers.frames if f.type is not FrameType.MEM_READ}
                assert kinds[first] is FrameType.ERROR, answers.frames
                assert kinds[second] is (FrameType.HELLO_ACK if hello else FrameType.RETURN), answers.frames
                assert "arrived while exchange" in answers.error_texts(ErrorCode.PROTOCOL)
                assert f"exchange {first} (CALL) failed" in str(module.anomalies.last)
                ran += not hello
            else:
                progress.what = Kind.BAD_MEM_REPLY.value
                wire.send(config_call(first))
                frame = wire._next(Deadline.after(READ_TIMEOUT))
                assert frame.type is FrameType.MEM_READ and frame.seq == first, frame
                asked = MemRequest.parse(frame)
                reply, text = rng.choice([
                    (MemReply(asked.pa, asked.length, 0, b"\0" * (asked.length - 1)), "MEM_DATA carries"),
                    (MemReply(asked.pa + 8, asked.length, 0, b"\0" * asked.length), "another range"),
                    (MemReply(asked.pa, asked.length, 0, b"\0" * asked.length), "expected MEM_DATA seq"),
                    (MemReply(asked.pa, asked.length, 0, b"\0" * asked.length), "expected MEM_DATA seq"),
                ])
                ftype, seq = FrameType.MEM_DATA, first
                if text == "expected MEM_DATA seq":
                    ftype, seq = rng.choice([(FrameType.MEM_ACK, first), (FrameType.MEM_DATA, first + 7)])
                data = reply.frame(seq, ftype).encode()
                if seq == first and rng.random() < 0.3:  # or it arrives corrupted (another seq's would
                    # not end this exchange: it times out, as tested by the server tests)
                    data, text = data[:-1] + bytes([data[-1] ^ 1]), "was corrupted (CRC mismatch"
                wire.send(data)
                answers = wire.until_return(first, lambda seq: False)
                assert answers.frames[-1].type is FrameType.ERROR
                answers.frames += wire.probe().frames
                assert text in answers.error_texts(), answers.error_texts()
            # The failed exchange changed no state; its trace record says what the kernel saw.
            assert module.state.sys is SysState.SYSINIT_DONE
            assert len(module.trace) == calls + ran
            aborted = module.trace.records[calls]
            assert (aborted.status, aborted.note[:8]) == (Status.TDX_SEAMCALL_VMFAILINVALID, "aborted:"), aborted
    within(TEST_DEADLINE, progress, body)


def test_truncated_frames_are_reported_after_silence(wire: Guest):
    """A partial frame followed by silence: after the frame gap the server reports it, names
    the seq its header claimed, and finds a frame that was swallowed by the partial one."""
    rng, progress = rng_for("truncated"), Progress("truncated then silence")

    def body() -> None:
        for progress.case in range(cases(40)):
            seq = rng.randrange(1, 0xF000)
            good = CallPayload(0, 1, PROBE_LEAF, (0,) * len(REGISTERS)).frame(seq).encode()
            cut = rng.randrange(1, len(good) - 1)
            if rng.random() < 0.5:
                # Silence: the server reports the partial frame once the gap has passed.
                wire.send(good[:cut])
                answers = Answers([wire._next(Deadline.after(READ_TIMEOUT))])
                (claimed, error), = answers.errors(ErrorCode.FRAMING)
                assert "truncated frame" in error.text
                assert claimed == (seq if cut >= HEADER.size else 0)
                wire.probe()
            else:
                # The rest was lost and the next frame followed: it completes the cut frame's
                # length (a CRC mismatch) or the gap runs out; either way it is found and served.
                follower = CallPayload(1, 1, PROBE_LEAF, (0,) * 13).frame(seq + 1).encode()
                wire.send(good[:cut] + follower)
                answers = wire.until_return(seq + 1, lambda s: False)
                assert answers.frames[-1].type is FrameType.RETURN
                assert answers.errors(ErrorCode.FRAMING), "the lost bytes went unreported"
                answers.frames += wire.probe().frames
    within(TEST_DEADLINE, progress, body)


def test_server_survives_a_module_that_raises(tmp_path):
    """A module bug (an exception nobody expected) fails that SEAMCALL with an INTERNAL error
    frame and an anomaly; the next call is served."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram(RAM)))
    calls = {"n": 0}
    real = module.call

    def flaky(request, memory):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("model bug")
        return real(request, memory)

    module.call = flaky  # type: ignore[method-assign]
    path = str(tmp_path / "s.sock")
    with SeamServer(module, path) as server:
        guest = Guest(server, path)
        guest.send(CallPayload(0, 1, PROBE_LEAF, (0,) * 13).frame(5).encode())
        answers = guest.until_return(5, lambda seq: False)
        (seq, error), = answers.errors()
        assert (seq, error.code) == (5, ErrorCode.INTERNAL) and "KeyError" in error.text
        assert "internal error" in str(module.anomalies.last)
        guest.probe()
        guest.close()
