"""Test support for virtqueues: guest memory over a bytearray, and driver/device pairs.

Also holds the operation-sequence engine the split and packed property tests
share: it drives a driver queue and a device queue through the same memory
and checks every payload, id and length against its own record.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st

from pyvdpa.errors import GuestMemoryError
from pyvdpa.virtio.packed import PackedDeviceQueue, PackedDriverQueue, PackedLayout
from pyvdpa.virtio.ring import DescriptorChain, DeviceQueue, DriverQueue, QueueFullError
from pyvdpa.virtio.split import SplitDeviceQueue, SplitDriverQueue, SplitLayout

__all__ = [
    "BLOCK",
    "MEM_BASE",
    "NOTIFY_OPS",
    "DirtyLog",
    "GuestMemory",
    "Op",
    "RingPair",
    "packed_pair",
    "pop_chains",
    "ring_ops",
    "run_notify_ops",
    "run_ops",
    "split_pair",
]

MEM_BASE = 0x10_0000
BLOCK = 1024
"""Bytes of buffer space reserved for each chain in flight."""


class GuestMemory:
    """One region of guest memory at ``base``; device addresses are guest-physical."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.buf = bytearray(size)

    @property
    def end(self) -> int:
        """First address past the region."""
        return self.base + len(self.buf)

    def view(self, addr: int, length: int, *, write: bool = True) -> memoryview:
        """Return a view of ``length`` bytes at ``addr``, bounds-checked."""
        if length < 0 or addr < self.base or addr + length > self.end:
            raise GuestMemoryError(f"[{addr:#x}, +{length:#x}) is outside guest memory")
        offset = addr - self.base
        return memoryview(self.buf)[offset : offset + length]

    def read(self, addr: int, length: int) -> bytes:
        """Return a copy of ``length`` bytes at ``addr``."""
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at ``addr``."""
        self.view(addr, len(data))[:] = data

    def snapshot(self) -> bytes:
        """Return a copy of the whole region."""
        return bytes(self.buf)


@dataclass
class DirtyLog:
    """A dirty logger that records every call."""

    writes: list[tuple[int, int]] = field(default_factory=list)

    def log_write(self, addr: int, length: int) -> None:
        """Record one logged range."""
        self.writes.append((addr, length))


@dataclass
class RingPair:
    """A driver queue and a device queue sharing ring memory."""

    mem: GuestMemory
    driver: DriverQueue
    device: DeviceQueue
    rebuild: Callable[[int], DeviceQueue]
    """Build a new device queue over the same rings from a base value."""
    desc_addr: int
    driver_area: int
    """Available ring (split) or driver event area (packed)."""
    device_area: int
    """Used ring (split) or device event area (packed)."""
    indirect_addr: int
    buffers: int
    """Start of ``size`` blocks of BLOCK bytes for buffers."""


def _align(addr: int, align: int) -> int:
    return (addr + align - 1) // align * align


def split_pair(
    size: int,
    *,
    event_idx: bool = False,
    indirect: bool = True,
    log: DirtyLog | None = None,
    extra: int = 0,
    indirect_area: bool = True,
) -> RingPair:
    """Lay out a split queue in fresh memory and return its two sides.

    ``extra`` bytes of spare memory follow the buffer blocks; without
    ``indirect_area`` the driver gets no area for indirect tables (large
    queues would need size**2 * 16 bytes).
    """
    layout = SplitLayout(size)
    desc = MEM_BASE
    avail = desc + layout.desc_size
    used = _align(avail + layout.avail_size, 4)
    ind = _align(used + layout.used_size, 16)
    bufs = _align(ind + (size * layout.desc_size if indirect_area else 0), 64)
    mem = GuestMemory(MEM_BASE, bufs + size * BLOCK + extra - MEM_BASE)
    driver = SplitDriverQueue(
        mem,
        size,
        desc,
        avail,
        used,
        event_idx=event_idx,
        indirect_addr=ind if indirect_area else None,
    )

    def rebuild(base: int) -> DeviceQueue:
        return SplitDeviceQueue(
            mem,
            size,
            desc,
            avail,
            used,
            event_idx=event_idx,
            indirect=indirect,
            base=base,
            log=log,
            log_addr=used,
        )

    return RingPair(mem, driver, rebuild(0), rebuild, desc, avail, used, ind, bufs)


def packed_pair(
    size: int,
    *,
    event_idx: bool = False,
    indirect: bool = True,
    log: DirtyLog | None = None,
    extra: int = 0,
    indirect_area: bool = True,
) -> RingPair:
    """Lay out a packed queue in fresh memory and return its two sides.

    ``extra`` bytes of spare memory follow the buffer blocks; without
    ``indirect_area`` the driver gets no area for indirect tables (large
    queues would need size**2 * 16 bytes).
    """
    layout = PackedLayout(size)
    desc = MEM_BASE
    drv = desc + layout.desc_size
    dev = drv + layout.EVENT_SIZE
    ind = _align(dev + layout.EVENT_SIZE, 16)
    bufs = _align(ind + (size * layout.desc_size if indirect_area else 0), 64)
    mem = GuestMemory(MEM_BASE, bufs + size * BLOCK + extra - MEM_BASE)
    driver = PackedDriverQueue(
        mem, size, desc, drv, dev, event_idx=event_idx, indirect_addr=ind if indirect_area else None
    )

    def rebuild(base: int) -> DeviceQueue:
        return PackedDeviceQueue(
            mem,
            size,
            desc,
            drv,
            dev,
            event_idx=event_idx,
            indirect=indirect,
            base=base,
            log=log,
            log_addr=desc,
        )

    return RingPair(mem, driver, rebuild(0x8000), rebuild, desc, drv, dev, ind, bufs)


def pop_chains(device: DeviceQueue, count: int) -> list[DescriptorChain]:
    """Pop ``count`` chains, which must all be there."""
    chains = []
    for _ in range(count):
        chain = device.pop()
        assert chain is not None
        chains.append(chain)
    return chains


_SEG_LENS = st.lists(st.integers(0, 48), max_size=3)
# Repetition weights the draw: "restart" is rare, the pipeline steps common.
_OP_NAMES = st.sampled_from(
    ["add", "add", "add", "pop", "pop", "push", "push", "used", "used", "restart"]
)

Op = tuple[str, int, list[int], list[int], bool]


def ring_ops(min_size: int = 30, max_size: int = 150) -> st.SearchStrategy[list[Op]]:
    """Random sequences of add, pop, push, get_used and device restarts.

    Each operation carries a seed (payloads, push choice and length) and, for
    an add, the readable and writable buffer lengths and whether to go
    indirect; other operations ignore those fields.
    """
    op = st.tuples(_OP_NAMES, st.integers(0, 2**32), _SEG_LENS, _SEG_LENS, st.booleans())
    return st.lists(op, min_size=min_size, max_size=max_size)


@dataclass
class _Record:
    id: int
    block: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    payload: bytes
    desc_count: int


class _Engine:
    """Drives a ring pair and checks it against its own record of every chain."""

    def __init__(self, pair: RingPair) -> None:
        self.pair = pair
        self.device = pair.device
        size = pair.driver.size
        self.size = size
        self.free_blocks = list(range(size))
        self.ids_in_use: set[int] = set()
        self.added: deque[_Record] = deque()
        self.inflight: list[tuple[DescriptorChain, _Record]] = []
        self.used: deque[tuple[_Record, int, bytes]] = deque()

    def add(self, seed: int, rlens: list[int], wlens: list[int], indirect: bool) -> None:
        driver = self.pair.driver
        count = len(rlens) + len(wlens)
        if count == 0 or (indirect and count > self.size):
            return
        needed = 1 if indirect else count
        if needed > driver.num_free:
            free = driver.num_free
            try:
                driver.add([(self.pair.buffers, 1)] * count, [], indirect=indirect)
            except QueueFullError:
                assert driver.num_free == free
                return
            raise AssertionError("add succeeded with too few free descriptors")
        block = self.free_blocks.pop()
        rng = random.Random(seed)
        addr = self.pair.buffers + block * BLOCK
        readable, writable = [], []
        for length in rlens:
            readable.append((addr, length))
            addr += length
        for length in wlens:
            writable.append((addr, length))
            addr += length
        payload = rng.randbytes(sum(rlens))
        self.pair.mem.write(self.pair.buffers + block * BLOCK, payload)
        self.pair.mem.write(addr - sum(wlens), bytes(sum(wlens)))
        ident = driver.add(readable, writable, indirect=indirect)
        assert ident not in self.ids_in_use
        self.ids_in_use.add(ident)
        self.added.append(_Record(ident, block, readable, writable, payload, needed))

    def pop(self) -> None:
        chain = self.device.pop()
        if not self.added:
            assert chain is None
            return
        assert chain is not None
        rec = self.added.popleft()
        assert chain.id == rec.id
        assert chain.desc_count == rec.desc_count
        assert [(s.addr, s.length) for s in chain.readable] == [r for r in rec.readable]
        assert [(s.addr, s.length) for s in chain.writable] == [w for w in rec.writable]
        assert chain.read_all() == rec.payload
        assert chain.readable_len() == len(rec.payload)
        self.inflight.append((chain, rec))

    def push(self, seed: int) -> None:
        if not self.inflight:
            return
        chain, rec = self.inflight.pop(seed % len(self.inflight))
        rng = random.Random(seed)
        written = rng.randint(0, chain.writable_len())
        data = rng.randbytes(written)
        assert chain.write(data) == written
        self.device.push(chain, written)
        self.used.append((rec, written, data))

    def get_used(self) -> None:
        got = self.pair.driver.get_used()
        if not self.used:
            assert got is None
            return
        rec, written, data = self.used.popleft()
        assert got == (rec.id, written)
        out = b"".join(self.pair.mem.read(a, n) for a, n in rec.writable)
        assert out[:written] == data
        assert out[written:] == bytes(len(out) - written)
        self.ids_in_use.discard(rec.id)
        self.free_blocks.append(rec.block)

    def restart(self) -> None:
        if self.device.inflight:
            return
        self.device = self.pair.rebuild(self.device.base)

    def drain(self) -> None:
        while self.added:
            self.pop()
        while self.inflight:
            self.push(0)
        while self.used:
            self.get_used()
        assert self.pair.driver.get_used() is None
        assert self.device.pop() is None
        assert self.pair.driver.num_free == self.size
        assert self.device.inflight == 0


def run_ops(pair: RingPair, ops: list[Op]) -> None:
    """Apply ``ops`` to ``pair``, checking every chain end to end, then drain it."""
    engine = _Engine(pair)
    for name, seed, rlens, wlens, indirect in ops:
        if name == "add":
            engine.add(seed, rlens, wlens, indirect)
        elif name == "pop":
            engine.pop()
        elif name == "push":
            engine.push(seed)
        elif name == "used":
            engine.get_used()
        else:
            engine.restart()
    engine.drain()


NOTIFY_OPS = [
    "add",
    "device_wake",
    "device_partial",
    "device_finish",
    "push",
    "driver_wake",
    "driver_partial",
    "driver_finish",
]


class _NotifyModel:
    """Both sides follow the canonical loop: disable, drain, enable, re-check.

    A side is *busy* between disabling and re-enabling its notifications and
    *asleep* otherwise; it wakes (runs the loop) only when a notification it
    was sent is delivered, which the ``*_wake`` operations do.  The model
    states the one right answer of ``kick_needed`` and ``should_notify`` after
    each single add or push: never while the other side is busy; while it is
    asleep, always without EVENT_IDX, and only for the first buffer since it
    went to sleep with EVENT_IDX.
    """

    def __init__(self, pair: RingPair, event_idx: bool) -> None:
        self.pair = pair
        self.event_idx = event_idx
        self.device_busy = False
        self.driver_busy = False
        assert not pair.device.enable_notification()
        assert not pair.driver.enable_interrupts()
        self.kick_armed = True
        self.irq_armed = True
        self.popped: list[DescriptorChain] = []

    def expected(self, busy: bool, armed: bool) -> bool:
        if busy:
            return False
        return armed if self.event_idx else True

    def add(self) -> None:
        driver = self.pair.driver
        if driver.num_free == 0:
            return
        driver.add([(self.pair.buffers, 8)], [])
        kick = driver.kick_needed()
        assert kick == self.expected(self.device_busy, self.kick_armed)
        if kick:
            self.kick_armed = False

    def device_wake(self) -> None:
        self.device_partial()
        self.device_finish()

    def device_partial(self) -> None:
        if not self.device_busy:
            self.pair.device.disable_notification()
            self.device_busy = True
            chain = self.pair.device.pop()
            if chain is not None:
                self.popped.append(chain)

    def device_finish(self) -> None:
        if not self.device_busy:
            return
        device = self.pair.device
        while True:
            chain = device.pop()
            while chain is not None:
                self.popped.append(chain)
                chain = device.pop()
            if not device.enable_notification():
                break
            device.disable_notification()
        self.device_busy = False
        self.kick_armed = True

    def push(self) -> None:
        if not self.popped:
            return
        self.pair.device.push(self.popped.pop(0), 0)
        irq = self.pair.device.should_notify()
        assert irq == self.expected(self.driver_busy, self.irq_armed)
        if irq:
            self.irq_armed = False

    def driver_wake(self) -> None:
        self.driver_partial()
        self.driver_finish()

    def driver_partial(self) -> None:
        if not self.driver_busy:
            self.pair.driver.disable_interrupts()
            self.driver_busy = True
            self.pair.driver.get_used()

    def driver_finish(self) -> None:
        if not self.driver_busy:
            return
        driver = self.pair.driver
        while True:
            while driver.get_used() is not None:
                pass
            if not driver.enable_interrupts():
                break
            driver.disable_interrupts()
        self.driver_busy = False
        self.irq_armed = True


def run_notify_ops(pair: RingPair, ops: list[str], *, event_idx: bool) -> None:
    """Apply notification ``ops`` (names from NOTIFY_OPS), checking every answer."""
    model = _NotifyModel(pair, event_idx)
    for name in ops:
        getattr(model, name)()
