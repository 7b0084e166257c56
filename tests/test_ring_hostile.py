"""Hostile rings: descriptors written raw into guest memory, as a broken driver would.

Every broken rule gives its typed error, marks the queue broken, and leaves
guest memory byte-for-byte as it was.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.errors import RingError
from pyvdpa.virtio.ring import (
    AvailIndexError,
    BufferAddressError,
    ChainLayoutError,
    ChainTooLongError,
    DescFlag,
    DescriptorIndexError,
    DescriptorLoopError,
    IndirectDescriptorError,
    QueueBrokenError,
)
from ringmem import MEM_BASE, RingPair, packed_pair, split_pair

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
NEXT, WRITE, INDIRECT = DescFlag.NEXT, DescFlag.WRITE, DescFlag.INDIRECT
AVAIL, USED = DescFlag.AVAIL, DescFlag.USED


class RawRing(ABC):
    """Writes descriptors straight into a queue's memory; the driver side stays idle."""

    def __init__(self, pair: RingPair) -> None:
        self.pair = pair
        self.mem = pair.mem
        self.device = pair.device
        self.size = pair.device.size
        self.buf = pair.buffers
        self.table = pair.indirect_addr

    @abstractmethod
    def entry(self, base: int, i: int, addr: int, length: int, flags: int, link: int) -> None:
        """Write descriptor ``i`` of the table at ``base``."""

    @abstractmethod
    def put(
        self, slot: int, addr: int, length: int, flags: int, *, link: int | None = None
    ) -> None:
        """Write a ring descriptor; split links to ``link`` (default: the next slot)."""

    def put_table(
        self, i: int, addr: int, length: int, flags: int, *, link: int | None = None
    ) -> None:
        """Write entry ``i`` of the indirect table at ``self.table``."""
        self.entry(self.table, i, addr, length, flags, i + 1 if link is None else link)

    @abstractmethod
    def publish(self, head: int = 0) -> None:
        """Hand the chain at ``head`` to the device."""


class RawSplit(RawRing):
    def entry(self, base: int, i: int, addr: int, length: int, flags: int, link: int) -> None:
        self.mem.write(base + 16 * i, DESC.pack(addr, length, flags, link))

    def put(
        self, slot: int, addr: int, length: int, flags: int, *, link: int | None = None
    ) -> None:
        self.entry(
            self.pair.desc_addr, slot, addr, length, flags, slot + 1 if link is None else link
        )

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write(self.pair.driver_area + 2, U16.pack(idx & 0xFFFF))

    def publish(self, head: int = 0) -> None:
        idx = U16.unpack(self.mem.read(self.pair.driver_area + 2, 2))[0]
        self.mem.write(self.pair.driver_area + 4 + 2 * (idx % self.size), U16.pack(head))
        self.set_avail_idx(idx + 1)


class RawPacked(RawRing):
    def entry(self, base: int, i: int, addr: int, length: int, flags: int, link: int) -> None:
        self.mem.write(base + 16 * i, DESC.pack(addr, length, 0, flags))

    def put(
        self,
        slot: int,
        addr: int,
        length: int,
        flags: int,
        *,
        link: int | None = None,
        ident: int = 0,
        wrap: int = 1,
    ) -> None:
        flags |= AVAIL if wrap else USED
        self.mem.write(self.pair.desc_addr + 16 * slot, DESC.pack(addr, length, ident, flags))

    def publish(self, head: int = 0) -> None:
        # A packed descriptor is handed over by its own AVAIL and USED bits.
        pass


def raw_split(
    size: int = 4, *, indirect: bool = True, extra: int = 0, indirect_area: bool = True
) -> RawRing:
    pair = split_pair(size, indirect=indirect, extra=extra, indirect_area=indirect_area)
    return RawSplit(pair)


def raw_packed(
    size: int = 4, *, indirect: bool = True, extra: int = 0, indirect_area: bool = True
) -> RawRing:
    pair = packed_pair(size, indirect=indirect, extra=extra, indirect_area=indirect_area)
    return RawPacked(pair)


RAW = [raw_split, raw_packed]
Factory = Callable[..., RawRing]


def expect_broken(ring: RawRing, error: type[RingError]) -> None:
    """Pop once for ``error``, then check the queue is broken and memory untouched."""
    before = ring.mem.snapshot()
    inflight, base = ring.device.inflight, ring.device.base
    with pytest.raises(error):
        ring.device.pop()
    assert ring.device.broken
    assert (ring.device.inflight, ring.device.base) == (inflight, base)
    with pytest.raises(QueueBrokenError):
        ring.device.pop()
    with pytest.raises(QueueBrokenError):
        ring.device.should_notify()
    with pytest.raises(QueueBrokenError):
        ring.device.enable_notification()
    with pytest.raises(QueueBrokenError):
        ring.device.disable_notification()
    assert ring.mem.snapshot() == before


# Rules shared by both layouts


@pytest.mark.parametrize("make", RAW)
def test_nested_indirect(make: Factory) -> None:
    ring = make()
    ring.put(0, ring.table, 32, INDIRECT)
    ring.put_table(0, ring.buf, 4, NEXT)
    ring.put_table(1, ring.table, 16, INDIRECT)
    ring.publish()
    expect_broken(ring, IndirectDescriptorError)


@pytest.mark.parametrize("make", RAW)
@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_length_not_a_multiple_of_16(make: Factory, length: int) -> None:
    ring = make()
    ring.put(0, ring.table, length, INDIRECT)
    ring.publish()
    expect_broken(ring, IndirectDescriptorError)


@pytest.mark.parametrize("make", RAW)
def test_indirect_with_next(make: Factory) -> None:
    ring = make()
    ring.put(0, ring.table, 16, INDIRECT | NEXT)
    ring.put(1, ring.buf, 4, 0)
    ring.put_table(0, ring.buf, 4, 0)
    ring.publish()
    expect_broken(ring, IndirectDescriptorError)


@pytest.mark.parametrize("make", RAW)
def test_indirect_without_negotiation(make: Factory) -> None:
    ring = make(indirect=False)
    ring.put(0, ring.table, 16, INDIRECT)
    ring.put_table(0, ring.buf, 4, 0)
    ring.publish()
    expect_broken(ring, IndirectDescriptorError)


@pytest.mark.parametrize("make", RAW)
def test_indirect_table_outside_memory(make: Factory) -> None:
    ring = make()
    ring.put(0, ring.mem.end - 16, 32, INDIRECT)
    ring.publish()
    expect_broken(ring, BufferAddressError)


@pytest.mark.parametrize("make", RAW)
@pytest.mark.parametrize("where", ["below", "across_end", "huge"])
def test_buffer_outside_memory(make: Factory, where: str) -> None:
    ring = make()
    addr, length = {
        "below": (MEM_BASE - 4, 8),
        "across_end": (ring.mem.end - 4, 8),
        "huge": (2**64 - 8, 16),
    }[where]
    ring.put(0, ring.buf, 4, NEXT)
    ring.put(1, addr, length, WRITE)
    ring.publish()
    expect_broken(ring, BufferAddressError)


@pytest.mark.parametrize("make", RAW)
def test_buffer_outside_memory_in_indirect_table(make: Factory) -> None:
    ring = make()
    ring.put(0, ring.table, 16, INDIRECT)
    ring.put_table(0, ring.mem.end, 1, 0)
    ring.publish()
    expect_broken(ring, BufferAddressError)


@pytest.mark.parametrize("make", RAW)
def test_readable_after_writable(make: Factory) -> None:
    ring = make()
    ring.put(0, ring.buf, 4, NEXT)
    ring.put(1, ring.buf + 8, 4, WRITE | NEXT)
    ring.put(2, ring.buf + 16, 4, 0)
    ring.publish()
    expect_broken(ring, ChainLayoutError)


def test_split_readable_after_writable_across_indirect() -> None:
    ring = raw_split()
    ring.put(0, ring.buf, 4, WRITE | NEXT)
    ring.put(1, ring.table, 16, INDIRECT)
    ring.put_table(0, ring.buf + 8, 4, 0)
    ring.publish()
    expect_broken(ring, ChainLayoutError)


@pytest.mark.parametrize("make", RAW)
def test_indirect_table_longer_than_the_queue(make: Factory) -> None:
    ring = make(4)
    ring.put(0, ring.table, 16 * 5, INDIRECT)
    for i in range(5):
        ring.put_table(i, ring.buf, 1, NEXT if i < 4 else 0)
    ring.publish()
    expect_broken(ring, ChainTooLongError)


def test_split_direct_and_indirect_descriptors_beyond_the_queue_size() -> None:
    ring = raw_split(4)
    ring.put(0, ring.buf, 1, NEXT)
    ring.put(1, ring.buf, 1, NEXT)
    ring.put(2, ring.table, 48, INDIRECT)
    ring.put_table(0, ring.buf, 1, NEXT)
    ring.put_table(1, ring.buf, 1, NEXT)
    ring.put_table(2, ring.buf, 1, 0)
    ring.publish()
    expect_broken(ring, ChainTooLongError)


@pytest.mark.parametrize("make", RAW)
def test_total_length_reaching_2_to_32_is_refused_before_mapping(make: Factory) -> None:
    ring = make()
    ring.put(0, ring.buf, 1, NEXT)
    ring.put(1, ring.buf, 0xFFFF_FFFF, WRITE)
    ring.publish()
    expect_broken(ring, ChainTooLongError)


@pytest.mark.parametrize("make", RAW)
def test_valid_buffers_summing_to_2_to_32(make: Factory) -> None:
    # 4096 descriptors of 1 MiB, each inside guest memory: 2**32 bytes in all.
    mib = 1 << 20
    ring = make(4096, extra=mib, indirect_area=False)
    big = ring.mem.end - mib
    for slot in range(4096):
        ring.put(slot, big, mib, NEXT if slot < 4095 else 0)
    ring.publish()
    expect_broken(ring, ChainTooLongError)


@pytest.mark.parametrize("make", RAW)
def test_the_same_chain_one_byte_shorter_is_accepted(make: Factory) -> None:
    mib = 1 << 20
    ring = make(4096, extra=mib, indirect_area=False)
    big = ring.mem.end - mib
    for slot in range(4096):
        ring.put(slot, big, mib - (slot == 0), NEXT if slot < 4095 else 0)
    ring.publish()
    chain = ring.device.pop()
    assert chain is not None
    assert chain.readable_len() == 2**32 - 1
    assert chain.desc_count == 4096


@pytest.mark.parametrize("make", RAW)
def test_a_good_chain_before_a_bad_one_is_delivered(make: Factory) -> None:
    ring = make()
    ring.put(0, ring.buf, 4, 0)
    ring.publish(0)
    ring.put(1, ring.table, 7, INDIRECT)
    ring.publish(1)
    chain = ring.device.pop()
    assert chain is not None and chain.readable_len() == 4
    expect_broken(ring, IndirectDescriptorError)
    with pytest.raises(QueueBrokenError):
        ring.device.push(chain, 0)


# Split-only rules


def test_split_descriptor_loop() -> None:
    ring = raw_split(8)
    ring.put(0, ring.buf, 1, NEXT, link=1)
    ring.put(1, ring.buf, 1, NEXT, link=2)
    ring.put(2, ring.buf, 1, NEXT, link=0)
    ring.publish()
    expect_broken(ring, DescriptorLoopError)


def test_split_self_loop() -> None:
    ring = raw_split(1)
    ring.put(0, ring.buf, 1, NEXT, link=0)
    ring.publish()
    expect_broken(ring, DescriptorLoopError)


def test_split_loop_inside_indirect_table() -> None:
    ring = raw_split(8)
    ring.put(0, ring.table, 48, INDIRECT)
    ring.put_table(0, ring.buf, 1, NEXT, link=1)
    ring.put_table(1, ring.buf, 1, NEXT, link=2)
    ring.put_table(2, ring.buf, 1, NEXT, link=1)
    ring.publish()
    expect_broken(ring, DescriptorLoopError)


def test_split_next_beyond_the_table() -> None:
    ring = raw_split(4)
    ring.put(0, ring.buf, 1, NEXT, link=4)
    ring.publish()
    expect_broken(ring, DescriptorIndexError)


def test_split_next_beyond_the_indirect_table() -> None:
    ring = raw_split(8)
    ring.put(0, ring.table, 32, INDIRECT)
    ring.put_table(0, ring.buf, 1, NEXT, link=2)
    ring.publish()
    expect_broken(ring, DescriptorIndexError)


def test_split_head_beyond_the_table() -> None:
    ring = raw_split(4)
    ring.publish(4)
    expect_broken(ring, DescriptorIndexError)


@pytest.mark.parametrize("idx", [5, 0x8000, 0xFFFF])
def test_split_avail_idx_jumping_past_the_queue_size(idx: int) -> None:
    ring = raw_split(4)
    assert isinstance(ring, RawSplit)
    for slot in range(4):
        ring.put(slot, ring.buf, 1, 0)
    ring.set_avail_idx(idx)
    expect_broken(ring, AvailIndexError)


def test_split_avail_idx_moving_exactly_the_queue_size_is_fine() -> None:
    ring = raw_split(4)
    assert isinstance(ring, RawSplit)
    for slot in range(4):
        ring.put(slot, ring.buf, 1, 0)
        ring.publish(slot)
    assert [c.id for c in iter(ring.device.pop, None)] == [0, 1, 2, 3]


# Packed-only rules


def test_packed_buffer_id_beyond_the_queue_size() -> None:
    ring = raw_packed(4)
    assert isinstance(ring, RawPacked)
    ring.put(0, ring.buf, 1, NEXT, ident=0)
    ring.put(1, ring.buf, 1, 0, ident=4)
    expect_broken(ring, DescriptorIndexError)


def test_packed_id_comes_from_the_last_descriptor() -> None:
    ring = raw_packed(4)
    assert isinstance(ring, RawPacked)
    ring.put(0, ring.buf, 1, NEXT, ident=9)
    ring.put(1, ring.buf, 1, 0, ident=3)
    chain = ring.device.pop()
    assert chain is not None and chain.id == 3


def test_packed_indirect_descriptor_after_direct_ones() -> None:
    ring = raw_packed(4)
    ring.put(0, ring.buf, 4, NEXT)
    ring.put(1, ring.table, 16, INDIRECT)
    ring.put_table(0, ring.buf + 8, 4, WRITE)
    expect_broken(ring, IndirectDescriptorError)


def test_packed_indirect_table_ignores_next() -> None:
    ring = raw_packed(4)
    ring.put(0, ring.table, 32, INDIRECT)
    ring.put_table(0, ring.buf, 4, NEXT)
    ring.put_table(1, ring.buf + 8, 4, WRITE | NEXT)
    chain = ring.device.pop()
    assert chain is not None
    assert (chain.readable_len(), chain.writable_len(), chain.desc_count) == (4, 4, 1)


def test_packed_chain_wrapping_onto_itself() -> None:
    ring = raw_packed(4)
    for slot in range(4):
        ring.put(slot, ring.buf, 1, NEXT)
    expect_broken(ring, ChainTooLongError)


def test_packed_slot_reused_while_in_flight() -> None:
    ring = raw_packed(4)
    assert isinstance(ring, RawPacked)
    for slot in range(4):
        ring.put(slot, ring.buf, 1, 0, ident=slot)
    assert len(list(iter(ring.device.pop, None))) == 4
    # Slot 0 offered again for the second lap although the device holds it.
    ring.put(0, ring.buf, 1, 0, ident=0, wrap=0)
    expect_broken(ring, AvailIndexError)


def test_packed_descriptor_of_the_wrong_lap_is_not_available() -> None:
    ring = raw_packed(4)
    assert isinstance(ring, RawPacked)
    ring.put(0, ring.buf, 1, 0, wrap=0)
    assert ring.device.pop() is None
    ring.mem.write(ring.pair.desc_addr + 14, U16.pack(AVAIL | USED))
    assert ring.device.pop() is None
    assert not ring.device.broken


# Random ring contents


_FLAGS = st.sampled_from([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7])


@st.composite
def _hostile_ring(
    draw: st.DrawFn,
) -> tuple[Factory, int, list[tuple[str, int, int, int, int]], int]:
    make = draw(st.sampled_from(RAW))
    size = draw(st.sampled_from([1, 2, 4, 8]))
    entries = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["buf", "buf", "buf", "table", "low", "high"]),
                st.sampled_from([0, 1, 7, 16, 16, 32, 32, 48, 64, 2**31, 2**32 - 1]),
                _FLAGS,
                st.integers(0, size + 1),
                st.sampled_from([1, 1, 1, 0]),
            ),
            min_size=2 * size,
            max_size=2 * size,
        )
    )
    idx = draw(st.integers(1, size + 1) | st.integers(0, 0xFFFF))
    return make, size, entries, idx


@settings(max_examples=300, deadline=None)
@given(case=_hostile_ring(), indirect=st.booleans())
def test_random_rings_never_escape(
    case: tuple[Factory, int, list[tuple[str, int, int, int, int]], int], indirect: bool
) -> None:
    """Whatever the ring holds, pop returns valid chains or raises a RingError, writing nothing."""
    make, size, entries, idx = case
    ring = make(size, indirect=indirect)
    where = {
        "buf": ring.buf,
        "table": ring.table,
        "low": MEM_BASE - 16,
        "high": ring.mem.end - 16,
    }
    for i, (kind, length, flags, link, wrap) in enumerate(entries):
        addr = where[kind]
        if i < size:
            if isinstance(ring, RawPacked):
                ring.put(i, addr, length, flags, ident=link, wrap=wrap)
            else:
                ring.put(i, addr, length, flags, link=link)
        else:
            ring.put_table(i - size, addr, length, flags, link=link)
    if isinstance(ring, RawSplit):
        for slot in range(size):
            ring.mem.write(ring.pair.driver_area + 4 + 2 * slot, U16.pack(entries[slot][3]))
        ring.set_avail_idx(idx)
    before = ring.mem.snapshot()
    for _ in range(size + 1):
        try:
            chain = ring.device.pop()
        except RingError:
            assert ring.device.broken
            break
        if chain is None:
            break
        for seg in chain.readable + chain.writable:
            assert seg.addr >= MEM_BASE and seg.addr + seg.length <= ring.mem.end
            assert len(seg.view) == seg.length
        assert chain.readable_len() + chain.writable_len() < 2**32
    assert ring.mem.snapshot() == before
