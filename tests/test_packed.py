"""Packed virtqueues: the driver side and the device side through the same memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.virtio.packed import (
    EventFlags,
    PackedDeviceQueue,
    PackedDriverQueue,
    PackedLayout,
    check_packed_queue_size,
)
from pyvdpa.virtio.ring import DescFlag, DescriptorIndexError, QueueFullError
from ringmem import (
    NOTIFY_OPS,
    DirtyLog,
    Op,
    RingPair,
    packed_pair,
    pop_chains,
    ring_ops,
    run_notify_ops,
    run_ops,
)

DESC = struct.Struct("<QIHH")
EVENT = struct.Struct("<HH")
AVAIL, USED = DescFlag.AVAIL, DescFlag.USED
NEXT, WRITE = DescFlag.NEXT, DescFlag.WRITE


def desc(pair: RingPair, slot: int) -> tuple[int, int, int, int]:
    """Return (addr, len, id, flags) of a ring slot."""
    addr, length, ident, flags = DESC.unpack(pair.mem.read(pair.desc_addr + 16 * slot, 16))
    return addr, length, ident, flags


def event(pair: RingPair, area: int) -> tuple[int, int]:
    off_wrap, flags = EVENT.unpack(pair.mem.read(area, 4))
    return off_wrap, flags


# Layout


@pytest.mark.parametrize("size", [1, 3, 100, 32768])
def test_any_queue_size_up_to_32768(size: int) -> None:
    check_packed_queue_size(size)
    assert PackedLayout(size).desc_size == 16 * size


@pytest.mark.parametrize("size", [0, 32769])
def test_queue_size_out_of_range(size: int) -> None:
    with pytest.raises(ValueError):
        check_packed_queue_size(size)


def test_misaligned_event_area_is_refused() -> None:
    pair = packed_pair(4)
    with pytest.raises(ValueError):
        PackedDeviceQueue(
            pair.mem,
            4,
            pair.desc_addr,
            pair.driver_area + 2,
            pair.device_area,
            event_idx=False,
            indirect=False,
        )


def test_driver_zeroes_its_rings() -> None:
    pair = packed_pair(5)
    pair.mem.buf[:] = b"\xa5" * len(pair.mem.buf)
    PackedDriverQueue(
        pair.mem, 5, pair.desc_addr, pair.driver_area, pair.device_area, event_idx=False
    )
    assert pair.mem.read(pair.desc_addr, 80) == bytes(80)
    assert event(pair, pair.driver_area) == (0, 0)
    assert event(pair, pair.device_area) == (0, 0)


# Chains and wrap counters


def test_direct_chain_descriptors_and_used_element() -> None:
    pair = packed_pair(4)
    buf = pair.buffers
    pair.mem.write(buf, b"ping")
    ident = pair.driver.add([(buf, 4)], [(buf + 64, 8)])
    assert ident == 0
    assert desc(pair, 0) == (buf, 4, 0, AVAIL | NEXT)
    assert desc(pair, 1) == (buf + 64, 8, 0, AVAIL | WRITE)
    chain = pair.device.pop()
    assert chain is not None
    assert (chain.id, chain.desc_count, chain.read_all()) == (0, 2, b"ping")
    chain.write(b"pong")
    pair.device.push(chain, 4)
    assert desc(pair, 0) == (buf, 4, 0, AVAIL | USED | WRITE)
    assert pair.driver.get_used() == (0, 4)
    assert pair.mem.read(buf + 64, 4) == b"pong"
    assert pair.driver.num_free == 4


def test_used_without_write_reports_zero_length() -> None:
    pair = packed_pair(2)
    pair.driver.add([(pair.buffers, 4)], [])
    chain = pair.device.pop()
    assert chain is not None
    pair.device.push(chain, 0)
    assert desc(pair, 0)[3] == AVAIL | USED
    assert pair.driver.get_used() == (0, 0)


def test_chain_wraps_around_the_ring_end() -> None:
    pair = packed_pair(3)
    driver, device = pair.driver, pair.device
    buf = pair.buffers
    driver.add([(buf, 1)], [])
    driver.add([(buf, 1)], [])
    for _ in range(2):
        chain = device.pop()
        assert chain is not None
        device.push(chain, 0)
        assert driver.get_used() is not None
    pair.mem.write(buf, b"ab")
    ident = driver.add([(buf, 1), (buf + 1, 1)], [])
    # Slot 2 still belongs to the first lap, slot 0 to the second.
    assert desc(pair, 2)[3] == AVAIL | NEXT
    assert desc(pair, 0)[3] == USED
    chain = device.pop()
    assert chain is not None and chain.read_all() == b"ab" and chain.id == ident
    device.push(chain, 0)
    assert desc(pair, 2)[3] == AVAIL | USED
    assert device.base == (1 | 0 << 15) | (1 | 0 << 15) << 16
    assert driver.get_used() == (ident, 0)


def test_out_of_order_completion_skips_chain_slots() -> None:
    pair = packed_pair(4)
    driver, device = pair.driver, pair.device
    buf = pair.buffers
    first = driver.add([(buf, 1), (buf, 1)], [])
    second = driver.add([(buf, 1)], [(buf + 8, 2)], indirect=True)
    a, b = device.pop(), device.pop()
    assert a is not None and b is not None
    assert (a.desc_count, b.desc_count) == (2, 1)
    assert device.inflight == 2
    device.push(b, 2)
    device.push(a, 0)
    assert desc(pair, 0)[2] == second
    assert desc(pair, 1)[2] == first
    assert driver.get_used() == (second, 2)
    assert driver.get_used() == (first, 0)
    assert driver.get_used() is None
    assert driver.num_free == 4
    assert device.base == 3 | 1 << 15 | (3 | 1 << 15) << 16


def test_indirect_chain() -> None:
    pair = packed_pair(4)
    buf = pair.buffers
    pair.mem.write(buf, b"xyz")
    ident = pair.driver.add([(buf, 1), (buf + 1, 2)], [(buf + 16, 4)], indirect=True)
    assert desc(pair, 0)[1:] == (48, ident, AVAIL | DescFlag.INDIRECT)
    chain = pair.device.pop()
    assert chain is not None
    assert (chain.read_all(), chain.writable_len(), chain.desc_count) == (b"xyz", 4, 1)


def test_queue_full() -> None:
    pair = packed_pair(3)
    pair.driver.add([(pair.buffers, 1)] * 2, [])
    with pytest.raises(QueueFullError):
        pair.driver.add([(pair.buffers, 1)] * 2, [])
    pair.driver.add([(pair.buffers, 1)] * 3, [], indirect=True)
    assert pair.driver.num_free == 0


def test_driver_refuses_a_used_id_not_in_flight() -> None:
    pair = packed_pair(4)
    pair.mem.write(pair.desc_addr + 8, struct.pack("<IHH", 0, 2, AVAIL | USED))
    with pytest.raises(DescriptorIndexError):
        pair.driver.get_used()


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 17), event_idx=st.booleans(), ops=ring_ops())
def test_random_operations_round_trip(size: int, event_idx: bool, ops: list[Op]) -> None:
    run_ops(packed_pair(size, event_idx=event_idx), ops)


def test_many_laps() -> None:
    pair = packed_pair(3)
    driver, device = pair.driver, pair.device
    buf = pair.buffers
    for i in range(1000):
        pair.mem.write(buf, i.to_bytes(2, "little"))
        ident = driver.add([(buf, 1), (buf + 1, 1)], [(buf + 8, 2)])
        chain = device.pop()
        assert chain is not None and chain.read_all() == i.to_bytes(2, "little")
        device.push(chain, chain.write(chain.read_all()))
        assert driver.get_used() == (ident, 2)
    # 3000 slots: 1000 laps, an even number of wrap flips.
    assert device.base == 0x8000 | 0x8000 << 16


# Notification suppression


def test_flag_suppression() -> None:
    pair = packed_pair(4)
    driver, device = pair.driver, pair.device
    driver.add([(pair.buffers, 1)], [])
    assert driver.kick_needed()
    device.disable_notification()
    assert event(pair, pair.device_area)[1] == EventFlags.DISABLE
    driver.add([(pair.buffers, 1)], [])
    assert not driver.kick_needed()
    assert device.enable_notification()
    assert event(pair, pair.device_area)[1] == EventFlags.ENABLE
    chains = pop_chains(device, 2)
    assert device.pop() is None
    driver.add([(pair.buffers, 1)], [])
    assert driver.kick_needed()
    device.push(chains[0], 0)
    assert device.should_notify()
    driver.disable_interrupts()
    assert event(pair, pair.driver_area)[1] == EventFlags.DISABLE
    device.push(chains[1], 0)
    assert not device.should_notify()
    assert driver.enable_interrupts()
    assert not device.should_notify()


def test_event_idx_suppression_across_a_wrap() -> None:
    pair = packed_pair(3, event_idx=True)
    driver, device = pair.driver, pair.device
    buf = pair.buffers
    assert not device.enable_notification()
    assert event(pair, pair.device_area) == (0 | 1 << 15, EventFlags.DESC)
    assert not driver.enable_interrupts()
    assert event(pair, pair.driver_area) == (0 | 1 << 15, EventFlags.DESC)
    driver.add([(buf, 1), (buf, 1)], [])
    assert driver.kick_needed()
    chain = device.pop()
    assert chain is not None
    # The device keeps asking for the next slot: slot 2 of the first lap.
    assert event(pair, pair.device_area)[0] == 2 | 1 << 15
    device.push(chain, 0)
    assert device.should_notify()
    assert driver.get_used() is not None
    assert event(pair, pair.driver_area)[0] == 2 | 1 << 15
    # A two-slot chain at slots 2 and 0 passes the device's event at slot 2.
    driver.add([(buf, 1), (buf, 1)], [])
    assert driver.kick_needed()
    chain = device.pop()
    assert chain is not None
    assert event(pair, pair.device_area)[0] == 1 | 0 << 15
    device.push(chain, 0)
    assert device.should_notify()
    assert driver.get_used() is not None
    driver.add([(buf, 1)], [])
    assert driver.kick_needed()
    driver.add([(buf, 1)], [])
    assert not driver.kick_needed()


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 9),
    event_idx=st.booleans(),
    ops=st.lists(st.sampled_from(NOTIFY_OPS), max_size=80),
)
def test_notifications_are_exact(size: int, event_idx: bool, ops: list[str]) -> None:
    run_notify_ops(packed_pair(size, event_idx=event_idx), ops, event_idx=event_idx)


# Base and dirty log


def test_base_round_trip() -> None:
    pair = packed_pair(3)
    driver = pair.driver
    for _ in range(2):
        driver.add([(pair.buffers, 1)], [])
    for _ in range(2):
        chain = pair.device.pop()
        assert chain is not None
        pair.device.push(chain, 0)
        assert driver.get_used() is not None
    driver.add([(pair.buffers, 1)], [])
    driver.add([(pair.buffers, 1)], [])
    base = pair.device.base
    assert base == 2 | 1 << 15 | (2 | 1 << 15) << 16
    for value in (base, base & 0xFFFF):
        device = pair.rebuild(value)
        assert device.base == base
    device = pair.rebuild(base & 0xFFFF)
    ids = []
    for _ in range(2):
        chain = device.pop()
        assert chain is not None
        ids.append(chain.id)
        device.push(chain, 0)
    assert [driver.get_used(), driver.get_used()] == [(ids[0], 0), (ids[1], 0)]
    assert device.base == 1 | (1 << 16)


def test_base_names_a_slot_inside_the_ring() -> None:
    pair = packed_pair(3)
    with pytest.raises(ValueError):
        pair.rebuild(3 | 1 << 15)


def test_dirty_log_covers_buffers_and_used_descriptor() -> None:
    log = DirtyLog()
    pair = packed_pair(4, log=log)
    buf = pair.buffers
    pair.driver.add([(buf, 4), (buf, 4)], [])
    pair.driver.add([], [(buf + 100, 3), (buf + 200, 10)])
    for _ in range(2):
        chain = pair.device.pop()
        assert chain is not None
        pair.device.push(chain, min(5, chain.writable_len()))
    assert log.writes == [
        (pair.desc_addr, 16),
        (buf + 100, 3),
        (buf + 200, 2),
        (pair.desc_addr + 32, 16),
    ]
