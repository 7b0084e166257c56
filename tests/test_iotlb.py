"""The IOTLB, the address space behind it, and rings over it (no sockets)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.dataplane.queues import iotlb_table
from pyvdpa.errors import GuestMemoryError, IotlbMissError, IotlbPermissionError
from pyvdpa.memory import (
    DirtyLog,
    GuestMemory,
    Iotlb,
    IotlbAddressSpace,
    IotlbDirtyLog,
    IotlbEntry,
    MemoryRegion,
    SharedMemory,
    allocate_shared,
)
from pyvdpa.vhost_user.protocol import MAX_MEM_REGIONS, IotlbPerm
from pyvdpa.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from pyvdpa.virtio.ring import BufferAddressError, DeviceQueue, DriverQueue
from pyvdpa.virtio.split import SplitDeviceQueue, SplitDriverQueue

PAGE = 0x1000
GPA = 0x4000_0000
IOVA = 0x10_4000_0000
SIZE = 64 * PAGE
PERMS = (IotlbPerm.RO, IotlbPerm.WO, IotlbPerm.RW)


# ---------------------------------------------------------------------- Iotlb model


def _model_snapshot(pages: dict[int, tuple[int, IotlbPerm]]) -> tuple[IotlbEntry, ...]:
    """The entries a byte-granular map should coalesce into."""
    entries: list[IotlbEntry] = []
    for iova in sorted(pages):
        uaddr, perm = pages[iova]
        last = entries[-1] if entries else None
        if (
            last is not None
            and last.end == iova
            and last.uaddr + last.size == uaddr
            and last.perm == perm
        ):
            entries[-1] = IotlbEntry(last.iova, last.size + 1, last.uaddr, perm)
        else:
            entries.append(IotlbEntry(iova, 1, uaddr, perm))
    return tuple(entries)


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("update"),
            st.integers(0, 48),
            st.integers(1, 16),
            st.integers(0, 40),
            st.sampled_from(PERMS),
        ),
        st.tuples(
            st.just("invalidate"),
            st.integers(0, 60),
            st.integers(1, 20),
            st.just(0),
            st.just(IotlbPerm.NONE),
        ),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_iotlb_matches_a_byte_map(ops: list[tuple[str, int, int, int, IotlbPerm]]) -> None:
    """Updates replace, invalidations trim and split, snapshots coalesce: as a byte map."""
    iotlb = Iotlb()
    model: dict[int, tuple[int, IotlbPerm]] = {}
    generation = iotlb.generation
    for kind, iova, size, uaddr, perm in ops:
        if kind == "update":
            iotlb.update(iova, size, uaddr, perm)
            for i in range(size):
                model[iova + i] = (uaddr + i, perm)
        else:
            iotlb.invalidate(iova, size)
            for i in range(size):
                model.pop(iova + i, None)
        assert iotlb.generation > generation
        generation = iotlb.generation
        assert iotlb.snapshot() == _model_snapshot(model)
        for addr in range(70):
            assert iotlb.covers(addr) == (addr in model)
            if addr in model:
                want, entry_perm = model[addr]
                if entry_perm & IotlbPerm.RO:
                    assert iotlb.translate(addr, 1, write=False) == want
            else:
                with pytest.raises(IotlbMissError) as miss:
                    iotlb.translate(addr, 1, write=True)
                assert miss.value.iova == addr and miss.value.write


def test_pages_mapped_one_by_one_translate_as_one_buffer() -> None:
    iotlb = Iotlb()
    iotlb.update(IOVA + PAGE, PAGE, 0x7000_1000, IotlbPerm.RW)
    iotlb.update(IOVA, PAGE, 0x7000_0000, IotlbPerm.RW)
    assert iotlb.snapshot() == (IotlbEntry(IOVA, 2 * PAGE, 0x7000_0000, IotlbPerm.RW),)
    assert iotlb.translate(IOVA + 100, PAGE, write=True) == 0x7000_0000 + 100


def test_partial_invalidation_splits_an_entry() -> None:
    iotlb = Iotlb()
    iotlb.update(IOVA, 4 * PAGE, 0x7000_0000, IotlbPerm.RW)
    iotlb.invalidate(IOVA + PAGE, PAGE)
    assert iotlb.snapshot() == (
        IotlbEntry(IOVA, PAGE, 0x7000_0000, IotlbPerm.RW),
        IotlbEntry(IOVA + 2 * PAGE, 2 * PAGE, 0x7000_2000, IotlbPerm.RW),
    )
    with pytest.raises(IotlbMissError) as miss:
        iotlb.translate(IOVA + 100, PAGE, write=False)
    assert miss.value.iova == IOVA + PAGE
    iotlb.clear()
    assert iotlb.snapshot() == ()


def test_translation_errors_are_typed() -> None:
    iotlb = Iotlb()
    iotlb.update(IOVA, PAGE, 0x7000_0000, IotlbPerm.RO)
    iotlb.update(IOVA + PAGE, PAGE, 0x9000_0000, IotlbPerm.RO)
    with pytest.raises(IotlbPermissionError) as denied:
        iotlb.translate(IOVA, 16, write=True)
    assert denied.value.iova == IOVA and denied.value.write
    # Contiguous IOVAs over scattered pages cannot be one view.
    with pytest.raises(GuestMemoryError) as scattered:
        iotlb.translate(IOVA + PAGE - 8, 16, write=False)
    assert not isinstance(scattered.value, IotlbMissError)
    for size, iova in ((0, IOVA), (PAGE, (1 << 64) - 16)):
        with pytest.raises(GuestMemoryError):
            iotlb.update(iova, size, 0x7000_0000, IotlbPerm.RW)
    with pytest.raises(GuestMemoryError):
        iotlb.update(IOVA, PAGE, 0x7000_0000, IotlbPerm.NONE)
    with pytest.raises(GuestMemoryError):
        iotlb.invalidate(IOVA, 0)


# ---------------------------------------------------------------------- address space


@pytest.fixture
def shared() -> Iterator[SharedMemory]:
    with allocate_shared(SIZE) as mem:
        yield mem


@pytest.fixture
def device_memory(shared: SharedMemory) -> Iterator[GuestMemory]:
    """The back-end's table: one region at GPA."""
    with GuestMemory(MAX_MEM_REGIONS) as memory:
        memory.add_region(MemoryRegion(GPA, SIZE, shared.address, 0), shared.fd)
        yield memory


@pytest.fixture
def driver_memory(shared: SharedMemory) -> Iterator[GuestMemory]:
    """The driver's view, addressed by IOVA."""
    with GuestMemory(MAX_MEM_REGIONS) as memory:
        memory.add_region(MemoryRegion(IOVA, SIZE, shared.address, 0), shared.fd)
        yield memory


def _map(iotlb: Iotlb, shared: SharedMemory, iova: int, size: int, perm: IotlbPerm) -> None:
    first = iova - iova % PAGE
    for page in range(first, iova + size, PAGE):
        iotlb.update(page, PAGE, shared.address + page - IOVA, perm)


def test_address_space_views_through_the_iotlb(
    shared: SharedMemory, device_memory: GuestMemory, driver_memory: GuestMemory
) -> None:
    iotlb = Iotlb()
    space = IotlbAddressSpace(iotlb, device_memory)
    driver_memory.write(IOVA + PAGE - 4, b"spanning")
    with pytest.raises(IotlbMissError):
        space.view(IOVA + PAGE - 4, 8, write=False)
    _map(iotlb, shared, IOVA + PAGE - 4, 8, IotlbPerm.RO)
    assert bytes(space.view(IOVA + PAGE - 4, 8, write=False)) == b"spanning"
    with pytest.raises(IotlbPermissionError):
        space.view(IOVA + PAGE - 4, 8, write=True)
    rows = iotlb_table(space)
    assert rows.shape[0] == 1 and (int(rows[0, 0]), int(rows[0, 1])) == (IOVA, 2 * PAGE)
    # The back-end's own mapping of the bytes, not the front-end's address.
    assert ctypes.string_at(int(rows[0, 2]) + PAGE - 4, 8) == b"spanning"
    # A translation to front-end memory the table does not hold is outside memory.
    iotlb.update(IOVA + 8 * PAGE, PAGE, 0x10, IotlbPerm.RW)
    with pytest.raises(GuestMemoryError) as outside:
        space.view(IOVA + 8 * PAGE, 8, write=True)
    assert not isinstance(outside.value, IotlbMissError)


def test_dirty_log_translates_iovas_to_guest_physical_pages(
    shared: SharedMemory, device_memory: GuestMemory
) -> None:
    iotlb = Iotlb()
    _map(iotlb, shared, IOVA + 3 * PAGE, PAGE, IotlbPerm.RW)
    # One bit per page up to just past the region.
    bitmap_size = ((GPA + SIZE) >> 15) + 1
    with allocate_shared(bitmap_size) as bitmap:
        log = DirtyLog(bitmap.fd, bitmap_size, 0)
        logger = IotlbDirtyLog(log, IotlbAddressSpace(iotlb, device_memory))
        logger.log_write(IOVA + 3 * PAGE + 10, 20)
        logger.log_write(IOVA + 9 * PAGE, 8)
        pfn = (GPA + 3 * PAGE) >> 12
        assert bitmap.buf[pfn >> 3] == 1 << (pfn & 7)
        assert sum(bitmap.buf) == 1 << (pfn & 7)
        assert logger.unlogged == 8
        log.close()


# ---------------------------------------------------------------------- rings over the IOTLB


def _pair(
    layout: str, space: IotlbAddressSpace, driver_memory: GuestMemory
) -> tuple[DriverQueue, DeviceQueue]:
    size = 8
    desc, avail, used = IOVA, IOVA + PAGE, IOVA + 2 * PAGE
    if layout == "split":
        driver: DriverQueue = SplitDriverQueue(
            driver_memory, size, desc, avail, used, event_idx=False
        )
        device: DeviceQueue = SplitDeviceQueue(
            space, size, desc, avail, used, event_idx=False, indirect=False
        )
    else:
        driver = PackedDriverQueue(driver_memory, size, desc, avail, used, event_idx=False)
        device = PackedDeviceQueue(space, size, desc, avail, used, event_idx=False, indirect=False)
    return driver, device


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_ring_areas_need_translations(
    layout: str, device_memory: GuestMemory, driver_memory: GuestMemory
) -> None:
    space = IotlbAddressSpace(Iotlb(), device_memory)
    with pytest.raises(IotlbMissError) as miss:
        _pair(layout, space, driver_memory)
    assert miss.value.iova == IOVA


@pytest.mark.parametrize("layout", ["split", "packed"])
def test_a_miss_does_not_consume_the_chain(
    layout: str, shared: SharedMemory, device_memory: GuestMemory, driver_memory: GuestMemory
) -> None:
    iotlb = Iotlb()
    _map(iotlb, shared, IOVA, 3 * PAGE, IotlbPerm.RW)
    space = IotlbAddressSpace(iotlb, device_memory)
    driver, device = _pair(layout, space, driver_memory)
    data = IOVA + 8 * PAGE
    driver_memory.write(data, b"request")
    head = driver.add([(data, 7)], [(data + 2 * PAGE - 4, 8)])
    base = device.base
    for _ in range(3):
        with pytest.raises(IotlbMissError) as miss:
            device.pop()
        assert device.base == base and device.inflight == 0 and not device.broken
    assert miss.value.iova == data and not miss.value.write
    _map(iotlb, shared, data, 7, IotlbPerm.RO)
    with pytest.raises(IotlbMissError) as miss:
        device.pop()
    # The writable buffer spans two pages: the first is asked for, then the second.
    assert miss.value.iova == data + 2 * PAGE - 4 and miss.value.write
    _map(iotlb, shared, data + 2 * PAGE - 4, 4, IotlbPerm.WO)
    with pytest.raises(IotlbMissError) as miss:
        device.pop()
    assert miss.value.iova == data + 2 * PAGE
    _map(iotlb, shared, data + 2 * PAGE, 4, IotlbPerm.WO)
    chain = device.pop()
    assert chain is not None and chain.id == head and chain.read_all() == b"request"
    assert device.inflight == 1
    chain.write(b"response")
    device.push(chain, 8)
    assert driver.get_used() == (head, 8)
    assert driver_memory.read(data + 2 * PAGE - 4, 8) == b"response"


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("writable", [True, False], ids=["write-to-ro", "read-from-wo"])
def test_a_forbidden_access_breaks_the_ring(
    layout: str,
    writable: bool,
    shared: SharedMemory,
    device_memory: GuestMemory,
    driver_memory: GuestMemory,
) -> None:
    iotlb = Iotlb()
    _map(iotlb, shared, IOVA, 3 * PAGE, IotlbPerm.RW)
    space = IotlbAddressSpace(iotlb, device_memory)
    driver, device = _pair(layout, space, driver_memory)
    data = IOVA + 8 * PAGE
    _map(iotlb, shared, data, 16, IotlbPerm.RO if writable else IotlbPerm.WO)
    if writable:
        driver.add([], [(data, 16)])
    else:
        driver.add([(data, 16)], [])
    with pytest.raises(BufferAddressError):
        device.pop()
    assert device.broken


def test_a_ring_area_without_write_permission_is_refused(
    shared: SharedMemory, device_memory: GuestMemory
) -> None:
    iotlb = Iotlb()
    _map(iotlb, shared, IOVA, 2 * PAGE, IotlbPerm.RO)
    _map(iotlb, shared, IOVA + 2 * PAGE, PAGE, IotlbPerm.RO)
    space = IotlbAddressSpace(iotlb, device_memory)
    with pytest.raises(IotlbPermissionError):
        SplitDeviceQueue(
            space, 8, IOVA, IOVA + PAGE, IOVA + 2 * PAGE, event_idx=False, indirect=False
        )
