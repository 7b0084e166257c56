"""Split virtqueues: the driver side and the device side through the same memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.virtio.ring import (
    DescriptorChain,
    DescriptorIndexError,
    QueueFullError,
    Segment,
    need_event,
)
from pyvdpa.virtio.split import (
    AvailFlag,
    SplitDeviceQueue,
    SplitDriverQueue,
    SplitLayout,
    UsedFlag,
    check_queue_size,
)
from ringmem import (
    NOTIFY_OPS,
    DirtyLog,
    Op,
    pop_chains,
    ring_ops,
    run_notify_ops,
    run_ops,
    split_pair,
)

U16 = struct.Struct("<H")
SIZES = st.sampled_from([1, 2, 4, 8, 16])


def u16(pair_mem_read: bytes) -> int:
    return int(U16.unpack(pair_mem_read)[0])


# Layout


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_check_queue_size_accepts_powers_of_two(size: int) -> None:
    check_queue_size(size)


@pytest.mark.parametrize("size", [0, 3, 100, 65536, -4])
def test_check_queue_size_refuses_others(size: int) -> None:
    with pytest.raises(ValueError):
        check_queue_size(size)


def test_layout_sizes_and_offsets() -> None:
    layout = SplitLayout(256)
    assert (layout.desc_size, layout.avail_size, layout.used_size) == (4096, 518, 2054)
    assert (layout.DESC_ALIGN, layout.AVAIL_ALIGN, layout.USED_ALIGN) == (16, 2, 4)
    assert layout.used_event_offset == 516
    assert layout.avail_event_offset == 2052
    assert layout.avail_slot_offset(257) == 4 + 2
    assert layout.used_slot_offset(0xFFFF) == 4 + 8 * 255


def test_misaligned_rings_are_refused() -> None:
    pair = split_pair(4)
    with pytest.raises(ValueError):
        SplitDeviceQueue(
            pair.mem,
            4,
            pair.desc_addr + 8,
            pair.driver_area,
            pair.device_area,
            event_idx=False,
            indirect=False,
        )


def test_driver_zeroes_its_rings() -> None:
    pair = split_pair(8)
    pair.mem.buf[:] = b"\xa5" * len(pair.mem.buf)
    SplitDriverQueue(
        pair.mem, 8, pair.desc_addr, pair.driver_area, pair.device_area, event_idx=True
    )
    layout = SplitLayout(8)
    assert pair.mem.read(pair.desc_addr, layout.desc_size) == bytes(layout.desc_size)
    assert pair.mem.read(pair.driver_area, layout.avail_size) == bytes(layout.avail_size)
    assert pair.mem.read(pair.device_area, layout.used_size) == bytes(layout.used_size)


# Chains


def test_direct_chain_round_trip() -> None:
    pair = split_pair(8)
    buf = pair.buffers
    pair.mem.write(buf, b"hello ")
    pair.mem.write(buf + 6, b"world")
    head = pair.driver.add([(buf, 6), (buf + 6, 5)], [(buf + 100, 4), (buf + 200, 8)])
    assert head == 0
    assert pair.driver.num_free == 4
    chain = pair.device.pop()
    assert chain is not None
    assert chain.id == head and chain.desc_count == 4
    assert chain.read_all() == b"hello world"
    assert (chain.readable_len(), chain.writable_len()) == (11, 12)
    assert pair.device.inflight == 1
    assert chain.write(b"0123456789") == 10
    pair.device.push(chain, 10)
    assert pair.device.inflight == 0
    assert pair.driver.get_used() == (head, 10)
    assert pair.mem.read(buf + 100, 4) == b"0123"
    assert pair.mem.read(buf + 200, 8) == b"456789\0\0"
    assert pair.driver.num_free == 8
    assert pair.driver.get_used() is None
    assert pair.device.pop() is None


def test_indirect_chain_uses_one_descriptor() -> None:
    pair = split_pair(4)
    buf = pair.buffers
    pair.mem.write(buf, b"abc")
    head = pair.driver.add([(buf, 1), (buf + 1, 2)], [(buf + 64, 3)], indirect=True)
    assert pair.driver.num_free == 3
    chain = pair.device.pop()
    assert chain is not None
    assert chain.desc_count == 1
    assert chain.read_all() == b"abc"
    assert [(s.addr, s.length) for s in chain.writable] == [(buf + 64, 3)]
    pair.device.push(chain, 0)
    assert pair.driver.get_used() == (head, 0)


def test_direct_descriptors_may_precede_an_indirect_one() -> None:
    pair = split_pair(8)
    buf, desc = pair.buffers, pair.desc_addr
    table = pair.indirect_addr
    pair.mem.write(buf, b"xy")
    pair.mem.write(desc, struct.pack("<QIHH", buf, 1, 1, 1))
    pair.mem.write(desc + 16, struct.pack("<QIHH", table, 32, 4, 0))
    pair.mem.write(table, struct.pack("<QIHH", buf + 1, 1, 1, 1))
    pair.mem.write(table + 16, struct.pack("<QIHH", buf + 8, 4, 2, 0))
    pair.mem.write(pair.driver_area + 4, U16.pack(0))
    pair.mem.write(pair.driver_area + 2, U16.pack(1))
    chain = pair.device.pop()
    assert chain is not None
    assert chain.read_all() == b"xy"
    assert chain.desc_count == 2
    assert chain.writable_len() == 4


def test_queue_full() -> None:
    pair = split_pair(4)
    pair.driver.add([(pair.buffers, 1)] * 3, [])
    with pytest.raises(QueueFullError):
        pair.driver.add([(pair.buffers, 1)] * 2, [])
    pair.driver.add([(pair.buffers, 1)] * 4, [], indirect=True)
    assert pair.driver.num_free == 0
    with pytest.raises(QueueFullError):
        pair.driver.add([(pair.buffers, 1)], [], indirect=True)


def test_driver_refuses_empty_and_oversized_indirect_chains() -> None:
    pair = split_pair(2)
    with pytest.raises(ValueError):
        pair.driver.add([], [])
    with pytest.raises(ValueError):
        pair.driver.add([(pair.buffers, 1)] * 3, [], indirect=True)


def test_chain_write_offset_and_truncation() -> None:
    store = bytearray(8)
    view = memoryview(store)
    chain = DescriptorChain(
        0, (), (Segment(0, 3, view[0:3]), Segment(16, 5, view[3:8])), desc_count=2
    )
    assert chain.write(b"ab", offset=2) == 2
    assert bytes(store) == b"\0\0ab\0\0\0\0"
    assert chain.write(b"0123456789", offset=4) == 4
    assert bytes(store) == b"\0\0ab0123"
    assert chain.write(b"zz", offset=8) == 0
    with pytest.raises(ValueError):
        chain.write(b"", offset=-1)


def test_push_checks_its_arguments() -> None:
    pair = split_pair(4)
    pair.driver.add([], [(pair.buffers, 4)])
    chain = pair.device.pop()
    assert chain is not None
    with pytest.raises(ValueError):
        pair.device.push(chain, 5)
    pair.device.push(chain, 4)
    with pytest.raises(ValueError):
        pair.device.push(chain, 0)


def test_driver_refuses_a_used_id_not_in_flight() -> None:
    pair = split_pair(4)
    pair.mem.write(pair.device_area + 4, struct.pack("<II", 3, 0))
    pair.mem.write(pair.device_area + 2, U16.pack(1))
    with pytest.raises(DescriptorIndexError):
        pair.driver.get_used()


@settings(max_examples=150, deadline=None)
@given(size=SIZES, event_idx=st.booleans(), ops=ring_ops())
def test_random_operations_round_trip(size: int, event_idx: bool, ops: list[Op]) -> None:
    run_ops(split_pair(size, event_idx=event_idx), ops)


def test_indices_wrap_past_65535() -> None:
    pair = split_pair(2)
    device, driver = pair.device, pair.driver
    buf = pair.buffers
    for i in range(0x10000 + 3):
        pair.mem.write(buf, i.to_bytes(4, "little"))
        head = driver.add([(buf, 4)], [(buf + 8, 4)])
        chain = device.pop()
        assert chain is not None and chain.read_all() == i.to_bytes(4, "little")
        device.push(chain, chain.write(chain.read_all()))
        assert driver.get_used() == (head, 4)
    assert device.base == 3
    assert u16(pair.mem.read(pair.device_area + 2, 2)) == 3


# Notification suppression


def test_flag_suppression_of_kicks() -> None:
    pair = split_pair(8)
    driver, device = pair.driver, pair.device
    assert not driver.kick_needed()
    driver.add([(pair.buffers, 1)], [])
    assert driver.kick_needed()
    device.disable_notification()
    assert u16(pair.mem.read(pair.device_area, 2)) == UsedFlag.NO_NOTIFY
    driver.add([(pair.buffers, 1)], [])
    assert not driver.kick_needed()
    assert device.enable_notification()
    assert device.pop() is not None and device.pop() is not None
    assert not device.enable_notification()
    driver.add([(pair.buffers, 1)], [])
    driver.add([(pair.buffers, 1)], [])
    assert driver.kick_needed()


def test_flag_suppression_of_interrupts() -> None:
    pair = split_pair(8)
    driver, device = pair.driver, pair.device
    for _ in range(3):
        driver.add([(pair.buffers, 1)], [])
    chains = pop_chains(device, 3)
    assert not device.should_notify()
    device.push(chains[0], 0)
    assert device.should_notify()
    assert not device.should_notify()
    driver.disable_interrupts()
    assert u16(pair.mem.read(pair.driver_area, 2)) == AvailFlag.NO_INTERRUPT
    device.push(chains[1], 0)
    assert not device.should_notify()
    assert driver.enable_interrupts()
    device.push(chains[2], 0)
    assert device.should_notify()


def test_event_idx_suppression_of_kicks() -> None:
    pair = split_pair(8, event_idx=True)
    driver, device = pair.driver, pair.device
    avail_event = pair.device_area + SplitLayout(8).avail_event_offset
    driver.add([(pair.buffers, 1)], [])
    assert driver.kick_needed()
    driver.add([(pair.buffers, 1)], [])
    assert not driver.kick_needed()
    assert device.pop() is not None
    assert u16(pair.mem.read(avail_event, 2)) == 1
    driver.add([(pair.buffers, 1)], [])
    assert not driver.kick_needed()
    assert device.pop() is not None and device.pop() is not None
    driver.add([(pair.buffers, 1)], [])
    driver.add([(pair.buffers, 1)], [])
    assert driver.kick_needed()
    device.disable_notification()
    assert device.pop() is not None and device.pop() is not None
    for _ in range(3):
        driver.add([(pair.buffers, 1)], [])
        assert not driver.kick_needed()
    assert device.enable_notification()
    while device.pop() is not None:
        pass
    assert not device.enable_notification()
    assert u16(pair.mem.read(avail_event, 2)) == 8


def test_event_idx_disable_while_idle_holds_back_the_next_kick() -> None:
    pair = split_pair(4, event_idx=True)
    pair.device.disable_notification()
    pair.driver.add([(pair.buffers, 1)], [])
    assert not pair.driver.kick_needed()
    assert pair.device.enable_notification()


def test_event_idx_suppression_of_interrupts() -> None:
    pair = split_pair(8, event_idx=True)
    driver, device = pair.driver, pair.device
    used_event = pair.driver_area + SplitLayout(8).used_event_offset
    for _ in range(6):
        driver.add([(pair.buffers, 1)], [])
    chains = pop_chains(device, 6)
    device.push(chains[0], 0)
    device.push(chains[1], 0)
    assert device.should_notify()
    device.push(chains[2], 0)
    assert not device.should_notify()
    assert driver.get_used() is not None
    assert u16(pair.mem.read(used_event, 2)) == 1
    device.push(chains[3], 0)
    assert not device.should_notify()
    driver.disable_interrupts()
    while driver.get_used() is not None:
        pass
    device.push(chains[4], 0)
    assert not device.should_notify()
    assert driver.enable_interrupts()
    assert driver.get_used() is not None
    assert not driver.enable_interrupts()
    device.push(chains[5], 0)
    assert device.should_notify()


@settings(max_examples=150, deadline=None)
@given(
    size=SIZES,
    event_idx=st.booleans(),
    ops=st.lists(st.sampled_from(NOTIFY_OPS), max_size=80),
)
def test_notifications_are_exact(size: int, event_idx: bool, ops: list[str]) -> None:
    run_notify_ops(split_pair(size, event_idx=event_idx), ops, event_idx=event_idx)


def test_need_event() -> None:
    assert need_event(5, 6, 5)
    assert not need_event(5, 5, 4)
    assert need_event(0xFFFF, 1, 0xFFFE)
    assert not need_event(3, 3, 3)


# Base and dirty log


def test_base_round_trip() -> None:
    pair = split_pair(4)
    driver = pair.driver
    for _ in range(3):
        driver.add([(pair.buffers, 1)], [])
    for _ in range(2):
        chain = pair.device.pop()
        assert chain is not None
        pair.device.push(chain, 0)
    assert pair.device.base == 2
    device = pair.rebuild(pair.device.base)
    chain = device.pop()
    assert chain is not None and chain.id == 2
    device.push(chain, 0)
    assert [driver.get_used() for _ in range(3)] == [(0, 0), (1, 0), (2, 0)]
    assert device.pop() is None
    with pytest.raises(ValueError):
        pair.rebuild(0x10000)


def test_dirty_log_covers_buffers_and_used_ring() -> None:
    log = DirtyLog()
    pair = split_pair(4, event_idx=True, log=log)
    buf = pair.buffers
    driver, device = pair.driver, pair.device
    driver.add([(buf, 4)], [(buf + 100, 3), (buf + 200, 10)])
    driver.add([(buf, 4)], [])
    device.disable_notification()
    assert log.writes == [(pair.device_area + 4 + 8 * 4, 2)]
    log.writes.clear()
    chain = device.pop()
    assert chain is not None and log.writes == []
    device.push(chain, 5)
    assert log.writes == [
        (buf + 100, 3),
        (buf + 200, 2),
        (pair.device_area + 4, 8),
        (pair.device_area + 2, 2),
    ]
    log.writes.clear()
    chain = device.pop()
    assert chain is not None
    device.push(chain, 0)
    assert log.writes == [(pair.device_area + 4 + 8, 8), (pair.device_area + 2, 2)]


def test_dirty_log_of_used_flags() -> None:
    log = DirtyLog()
    pair = split_pair(4, log=log)
    pair.device.disable_notification()
    pair.device.enable_notification()
    assert log.writes == [(pair.device_area, 2)] * 2


def test_logging_needs_an_address() -> None:
    pair = split_pair(4)
    with pytest.raises(ValueError):
        SplitDeviceQueue(
            pair.mem,
            4,
            pair.desc_addr,
            pair.driver_area,
            pair.device_area,
            event_idx=False,
            indirect=False,
            log=DirtyLog(),
        )
