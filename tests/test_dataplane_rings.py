"""The compiled ring kernels against the Python rings, on the same guest memory.

Every hostile-ring test of ``test_ring_hostile`` runs again with the device
side replaced by the compiled queue; random hostile rings are fed to both
validators and must give the same outcome, chain by chain; the random
operation and notification sequences of ``ringmem`` drive the compiled
queue against the Python driver side.
"""

from __future__ import annotations

import inspect
import itertools
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import test_ring_hostile as hostile
from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.queues import CompiledQueue, ring_error
from pyvdpa.errors import RingError
from pyvdpa.memory import DirtyLog, GuestMemory, MemoryRegion, SharedMemory, allocate_shared
from pyvdpa.vhost_user.protocol import MAX_MEM_REGIONS
from pyvdpa.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from pyvdpa.virtio.ring import (
    ChainTooLongError,
    DescriptorChain,
    DescriptorIndexError,
    DeviceQueue,
    QueueBrokenError,
)
from pyvdpa.virtio.split import SplitDeviceQueue, SplitDriverQueue
from ringmem import (
    MEM_BASE,
    NOTIFY_OPS,
    Op,
    RingPair,
    packed_pair,
    ring_ops,
    run_notify_ops,
    run_ops,
    split_pair,
)


class SharedGuest:
    """Guest memory as the back-end maps it (a memfd region), with ringmem's helpers."""

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self.shared: SharedMemory = allocate_shared(size, "dataplane-test")
        self.memory = GuestMemory(MAX_MEM_REGIONS)
        self.memory.add_region(MemoryRegion(base, size, self.shared.address, 0), self.shared.fd)

    @property
    def end(self) -> int:
        return self.base + self.size

    def view(self, addr: int, length: int, *, write: bool = True) -> memoryview:
        return self.memory.view(addr, length)

    def read(self, addr: int, length: int) -> bytes:
        return self.memory.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.memory.write(addr, data)

    def snapshot(self) -> bytes:
        return self.memory.read(self.base, self.size)

    def restore(self, data: bytes) -> None:
        self.memory.write(self.base, data)


def _python_device(guest: SharedGuest, geometry: RingPair, packed: bool, **kw: Any) -> DeviceQueue:
    cls = PackedDeviceQueue if packed else SplitDeviceQueue
    return cls(
        guest,
        geometry.driver.size,
        geometry.desc_addr,
        geometry.driver_area,
        geometry.device_area,
        **kw,
    )


def compiled_pair(
    packed: bool,
    size: int,
    *,
    event_idx: bool = False,
    indirect: bool = True,
    extra: int = 0,
    indirect_area: bool = True,
    log: DirtyLog | None = None,
) -> tuple[RingPair, SharedGuest]:
    """ringmem's ring geometry over a memfd region, with a compiled device side."""
    layout = packed_pair if packed else split_pair
    geometry = layout(size, extra=extra, indirect_area=indirect_area)
    guest = SharedGuest(MEM_BASE, geometry.mem.end - MEM_BASE)
    driver_cls = PackedDriverQueue if packed else SplitDriverQueue
    driver = driver_cls(
        guest,
        size,
        geometry.desc_addr,
        geometry.driver_area,
        geometry.device_area,
        event_idx=event_idx,
        indirect_addr=geometry.indirect_addr if indirect_area else None,
    )
    log_addr = geometry.desc_addr if packed else geometry.device_area

    def rebuild(base: int) -> DeviceQueue:
        return CompiledQueue(
            guest.memory, size, geometry.desc_addr, geometry.driver_area, geometry.device_area,
            packed=packed, event_idx=event_idx, indirect=indirect, base=base,
            log=log, log_addr=log_addr,
        )  # fmt: skip

    pair = RingPair(
        guest,  # type: ignore[arg-type]
        driver,
        rebuild(0x8000 if packed else 0),
        rebuild,
        geometry.desc_addr,
        geometry.driver_area,
        geometry.device_area,
        geometry.indirect_addr,
        geometry.buffers,
    )
    return pair, guest


def compiled_raw_split(size: int = 4, **kw: Any) -> hostile.RawRing:
    return hostile.RawSplit(compiled_pair(False, size, **kw)[0])


def compiled_raw_packed(size: int = 4, **kw: Any) -> hostile.RawRing:
    return hostile.RawPacked(compiled_pair(True, size, **kw)[0])


_COMPILED = {hostile.raw_split: compiled_raw_split, hostile.raw_packed: compiled_raw_packed}


def _hostile_cases() -> Iterator[Any]:
    """Every example test of test_ring_hostile with each of its parameter sets."""
    for name, test in inspect.getmembers(hostile, inspect.isfunction):
        if not name.startswith("test_") or hasattr(test, "hypothesis"):
            continue
        grids = []
        for mark in getattr(test, "pytestmark", []):
            if mark.name == "parametrize":
                names, values = mark.args
                grids.append([(names, value) for value in values])
        for combo in itertools.product(*grids):
            kwargs = {}
            ids = []
            for names, value in combo:
                value = _COMPILED.get(value, value)
                kwargs[names] = value
                ids.append(getattr(value, "__name__", str(value)))
            yield pytest.param(test, kwargs, id="-".join([name, *ids]))


@pytest.mark.parametrize(("test", "kwargs"), list(_hostile_cases()))
def test_hostile_rings_break_the_compiled_queue_alike(
    test: Callable[..., None], kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostile, "raw_split", compiled_raw_split)
    monkeypatch.setattr(hostile, "raw_packed", compiled_raw_packed)
    test(**kwargs)


# Differential: the same random hostile rings through both validators.

Outcome = tuple[Any, ...]


def _chain_outcome(chain: DescriptorChain) -> Outcome:
    return (
        chain.id,
        chain.desc_count,
        tuple((s.addr, s.length) for s in chain.readable),
        tuple((s.addr, s.length) for s in chain.writable),
        chain.read_all(),
    )


def _pop_all(device: DeviceQueue, limit: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for _ in range(limit):
        try:
            chain = device.pop()
        except RingError as exc:
            outcomes.append(("error", type(exc)))
            break
        if chain is None:
            outcomes.append(("empty",))
            break
        outcomes.append(_chain_outcome(chain))
    outcomes.append(("state", device.broken, device.inflight, device.base))
    return outcomes


@settings(max_examples=300, deadline=None)
@given(case=hostile._hostile_ring(), indirect=st.booleans())
def test_random_hostile_rings_same_outcome_as_python(
    case: tuple[hostile.Factory, int, list[tuple[str, int, int, int, int]], int], indirect: bool
) -> None:
    make, size, entries, idx = case
    packed = make is hostile.raw_packed
    pair, guest = compiled_pair(packed, size, indirect=indirect)
    ring = (hostile.RawPacked if packed else hostile.RawSplit)(pair)
    where = {"buf": ring.buf, "table": ring.table, "low": MEM_BASE - 16, "high": guest.end - 16}
    for i, (kind, length, flags, link, wrap) in enumerate(entries):
        addr = where[kind]
        if i < size:
            if isinstance(ring, hostile.RawPacked):
                ring.put(i, addr, length, flags, ident=link, wrap=wrap)
            else:
                ring.put(i, addr, length, flags, link=link)
        else:
            ring.put_table(i - size, addr, length, flags, link=link)
    if isinstance(ring, hostile.RawSplit):
        for slot in range(size):
            guest.write(pair.driver_area + 4 + 2 * slot, struct.pack("<H", entries[slot][3]))
        ring.set_avail_idx(idx)
    before = guest.snapshot()
    python_side = _python_device(
        guest, pair, packed, event_idx=False, indirect=indirect, base=0x8000 if packed else 0
    )
    expected = _pop_all(python_side, size + 1)
    after_python = guest.snapshot()
    guest.restore(before)
    got = _pop_all(pair.device, size + 1)
    assert got == expected
    assert guest.snapshot() == after_python == before


def test_error_codes_name_the_python_rule() -> None:
    row = np.zeros(k.QCOLS, dtype=np.int64)
    assert ring_error(row) is None
    row[k.Q_ERROR] = k.E_TOO_BIG
    row[k.Q_ERROR_A] = 1 << 32
    error = ring_error(row)
    assert isinstance(error, ChainTooLongError)
    assert "4294967296" in str(error)


# The compiled device side under the ringmem operation engines.


@settings(max_examples=60, deadline=None)
@given(
    packed=st.booleans(),
    size=st.sampled_from([1, 2, 4, 8, 16]),
    event_idx=st.booleans(),
    ops=ring_ops(),
)
def test_random_operations_round_trip(
    packed: bool, size: int, event_idx: bool, ops: list[Op]
) -> None:
    pair, _ = compiled_pair(packed, size, event_idx=event_idx)
    run_ops(pair, ops)


@settings(max_examples=60, deadline=None)
@given(
    packed=st.booleans(),
    size=st.sampled_from([2, 4, 8]),
    event_idx=st.booleans(),
    ops=st.lists(st.sampled_from(NOTIFY_OPS), min_size=10, max_size=120),
)
def test_notification_suppression_is_honoured(
    packed: bool, size: int, event_idx: bool, ops: list[str]
) -> None:
    pair, _ = compiled_pair(packed, size, event_idx=event_idx)
    run_notify_ops(pair, ops, event_idx=event_idx)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dirty_log_covers_buffers_and_ring(packed: bool) -> None:
    bitmap = allocate_shared(4096, "dirty-log")
    log = DirtyLog(bitmap.fd, 4096, 0)
    pair, _ = compiled_pair(packed, 4, log=log, extra=4 * 4096)
    buffer = pair.buffers + 3 * 4096
    pair.driver.add([], [(buffer, 64)])
    chain = pair.device.pop()
    assert chain is not None
    pair.device.push(chain, chain.write(b"x" * 10))
    bits = bytes(bitmap.buf)
    pages = {i for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1}
    ring_page = (pair.desc_addr if packed else pair.device_area) >> 12
    assert pages == {buffer >> 12, ring_page}
    log.close()
    bitmap.close()


def test_broken_queue_refuses_every_step() -> None:
    ring = compiled_raw_split()
    ring.publish(9)
    with pytest.raises(DescriptorIndexError):
        ring.device.pop()
    assert isinstance(ring.device, CompiledQueue)
    assert isinstance(ring.device.error, DescriptorIndexError)
    with pytest.raises(QueueBrokenError):
        ring.device.push(DescriptorChain(0, (), (), 1), 0)
