"""The compiled queue against the Python queues behind an IOMMU, on the same rings.

Both device sides translate I/O virtual addresses through the same
:class:`~pyvdpa.memory.Iotlb`: the Python queues through
:class:`~pyvdpa.memory.IotlbAddressSpace`, the compiled one through the
table :func:`~pyvdpa.dataplane.queues.iotlb_table` builds from it.  Random
IOTLB contents and random chains must give the same outcome chain by chain
(the same chain, the same miss, the same broken rule); a miss is served
with an UPDATE and the retry must agree again.  Dirty logging through the
IOTLB must mark the same guest-physical pages.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.queues import CompiledQueue, host_address
from pyvdpa.errors import IotlbMissError, IotlbPermissionError, RingError
from pyvdpa.memory import (
    DirtyLog,
    GuestMemory,
    Iotlb,
    IotlbAddressSpace,
    IotlbDirtyLog,
    MemoryRegion,
    SharedMemory,
    allocate_shared,
)
from pyvdpa.vhost_user.protocol import MAX_MEM_REGIONS, IotlbPerm
from pyvdpa.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from pyvdpa.virtio.ring import (
    AddressSpace,
    BufferAddressError,
    DescriptorChain,
    DeviceQueue,
    DriverQueue,
)
from pyvdpa.virtio.split import SplitDeviceQueue, SplitDriverQueue

PAGE = 0x1000
GPA = 0x4000_0000
"""Guest-physical start of the one memory region."""
IOVA = 0x10_4000_0000
"""I/O virtual address of the region's first page when mapped one to one."""
SIZE = 8
"""Queue size."""
FRAMES = 9
"""Pages of guest memory: the rings, two pages of indirect tables, buffers."""
BUFFER_PAGE = 3
"""First page of buffer space."""

DESC, DRIVER_AREA, DEVICE_AREA = IOVA, IOVA + 0x400, IOVA + 0x800
INDIRECT = IOVA + 2 * PAGE - 512
"""The driver's indirect tables (SIZE * SIZE * 16 bytes), straddling pages 1 and 2."""
PERMS = (IotlbPerm.RO, IotlbPerm.WO, IotlbPerm.RW)
_PERM = st.sampled_from((IotlbPerm.RW, *PERMS))
"""Read/write more often, so chains get past their first buffer."""
LAYOUTS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


class IommuGuest:
    """One region of guest memory, the IOTLB in front of it, and a one-to-one driver view.

    Frame ``f`` is the memory's page ``f``; frames outside ``[0, FRAMES)``
    are front-end addresses no region holds.  With ``boundary``, frames from
    there on are a second region, next to the first in front-end memory but
    not in guest-physical memory.
    """

    def __init__(self, boundary: int = FRAMES) -> None:
        self.shared: SharedMemory = allocate_shared(FRAMES * PAGE, "iotlb-dataplane")
        self.memory = GuestMemory(MAX_MEM_REGIONS)
        address, fd = self.shared.address, self.shared.fd
        self.memory.add_region(MemoryRegion(GPA, boundary * PAGE, address, 0), fd)
        if boundary < FRAMES:
            second = boundary * PAGE
            self.memory.add_region(
                MemoryRegion(GPA + 0x100_0000, FRAMES * PAGE - second, address + second, second),
                fd,
            )
        # The driver addresses page f at IOVA + f * PAGE, whatever the IOTLB says.
        self.driver_memory = GuestMemory(MAX_MEM_REGIONS)
        self.driver_memory.add_region(
            MemoryRegion(IOVA, FRAMES * PAGE, self.shared.address, 0), self.shared.fd
        )
        self.iotlb = Iotlb()
        self.space = IotlbAddressSpace(self.iotlb, self.memory)

    def map(self, iova: int, size: int, frame: int, perm: IotlbPerm, offset: int = 0) -> None:
        """Map ``[iova, iova + size)`` to ``offset`` bytes into ``frame``."""
        self.iotlb.update(iova, size, self.shared.address + frame * PAGE + offset, perm)

    def map_page(self, page: int, frame: int, perm: IotlbPerm) -> None:
        """Map I/O virtual page ``page`` (counted from IOVA) to ``frame``."""
        self.map(IOVA + page * PAGE, PAGE, frame, perm)

    def close(self) -> None:
        self.driver_memory.close()
        self.memory.close()
        self.shared.close()


@pytest.fixture
def guest() -> Iterator[IommuGuest]:
    iommu = IommuGuest()
    yield iommu
    iommu.close()


def _driver(memory: AddressSpace, packed: bool) -> DriverQueue:
    cls = PackedDriverQueue if packed else SplitDriverQueue
    return cls(
        memory, SIZE, DESC, DRIVER_AREA, DEVICE_AREA, event_idx=False, indirect_addr=INDIRECT
    )


def _python_device(
    space: IotlbAddressSpace, packed: bool, *, event_idx: bool = False, **kw: Any
) -> DeviceQueue:
    cls = PackedDeviceQueue if packed else SplitDeviceQueue
    return cls(
        space, SIZE, DESC, DRIVER_AREA, DEVICE_AREA, event_idx=event_idx, indirect=True,
        base=0x8000 if packed else 0, **kw,
    )  # fmt: skip


def _compiled_device(
    guest: IommuGuest, packed: bool, *, event_idx: bool = False, **kw: Any
) -> CompiledQueue:
    return CompiledQueue(
        guest.memory, SIZE, DESC, DRIVER_AREA, DEVICE_AREA, packed=packed,
        event_idx=event_idx, indirect=True, base=0x8000 if packed else 0, space=guest.space,
        **kw,
    )  # fmt: skip


@dataclass
class Queues:
    """A driver and both device sides over the same rings."""

    driver: DriverQueue
    python: DeviceQueue
    compiled: CompiledQueue

    def state(self) -> tuple[tuple[bool, int, int], tuple[bool, int, int]]:
        """(broken, inflight, base) of the Python side, then of the compiled side."""
        python, compiled = self.python, self.compiled
        return (
            (python.broken, python.inflight, python.base),
            (compiled.broken, compiled.inflight, compiled.base),
        )


def _queues(guest: IommuGuest, packed: bool) -> Queues:
    """Both device sides over rings on page 0, mapped one to one read/write."""
    guest.map_page(0, 0, IotlbPerm.RW)
    driver = _driver(guest.driver_memory, packed)
    return Queues(driver, _python_device(guest.space, packed), _compiled_device(guest, packed))


Outcome = tuple[Any, ...]


def _pop(queue: DeviceQueue) -> tuple[Outcome, DescriptorChain | None]:
    try:
        chain = queue.pop()
    except IotlbMissError as miss:
        return ("miss", miss.iova, miss.write), None
    except RingError as exc:
        return ("error", type(exc)), None
    if chain is None:
        return ("empty",), None
    segments = tuple((s.addr, s.length, False) for s in chain.readable) + tuple(
        (s.addr, s.length, True) for s in chain.writable
    )
    return ("chain", chain.id, chain.desc_count, segments), chain


def _check_hosts(compiled: CompiledQueue, chain: DescriptorChain) -> None:
    """The kernel translated every segment to the bytes the Python view holds."""
    segs = compiled._segments()
    for i, seg in enumerate((*chain.readable, *chain.writable)):
        if seg.length:
            assert int(segs[i, 1]) == host_address(seg.view)


def _pop_both(queues: Queues) -> tuple[Outcome, DescriptorChain | None, DescriptorChain | None]:
    expected, python_chain = _pop(queues.python)
    got, compiled_chain = _pop(queues.compiled)
    assert got == expected
    assert queues.compiled.stalled is None
    python_state, compiled_state = queues.state()
    assert compiled_state == python_state
    if compiled_chain is not None:
        _check_hosts(queues.compiled, compiled_chain)
    return expected, python_chain, compiled_chain


# ---------------------------------------------------------------------- random parity

# How a page is mapped: not at all, or to its own frame, to any frame (some
# outside memory), or to the frame after the previous page's (contiguous in
# front-end memory, whatever that frame is).
_page_plan = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(["own", "own", "own", "any", "next"]),
        st.integers(-1, FRAMES),
        _PERM,
    ),
)

_buffer = st.tuples(
    st.integers(IOVA + PAGE, IOVA + (FRAMES + 1) * PAGE), st.integers(0, 2 * PAGE + 64)
)

# Buffers, how many of them are device-readable (the first ones), indirect or not.
_chain = st.tuples(st.lists(_buffer, min_size=1, max_size=4), st.integers(0, 4), st.booleans())

_update = st.tuples(st.sampled_from(["own", "own", "any"]), st.integers(-1, FRAMES), _PERM)


def _apply_plan(guest: IommuGuest, plan: list[tuple[str, int, IotlbPerm] | None]) -> None:
    previous: int | None = None
    for page, choice in enumerate(plan, start=1):
        if choice is None:
            previous = None
            continue
        how, frame, perm = choice
        if how == "own" or (how == "next" and previous is None):
            frame = page
        elif how == "next":
            assert previous is not None
            frame = previous + 1
        guest.map_page(page, frame, perm)
        previous = frame


@settings(max_examples=300, deadline=None)
@given(
    packed=st.booleans(),
    plan=st.lists(_page_plan, min_size=FRAMES, max_size=FRAMES),
    chains=st.lists(_chain, min_size=1, max_size=4),
    data=st.data(),
)
def test_random_iotlb_and_chains_same_outcome_as_python(
    packed: bool,
    plan: list[tuple[str, int, IotlbPerm] | None],
    chains: list[tuple[list[tuple[int, int]], int, bool]],
    data: st.DataObject,
) -> None:
    guest = IommuGuest()
    try:
        queues = _queues(guest, packed)
        _apply_plan(guest, plan)
        queues.compiled.retranslate()
        for buffers, nread, indirect in chains:
            if queues.driver.num_free < (1 if indirect else len(buffers)):
                break
            queues.driver.add(buffers[:nread], buffers[nread:], indirect=indirect)
        for _ in range(64):
            outcome, python_chain, compiled_chain = _pop_both(queues)
            event(outcome[0] if outcome[0] != "error" else outcome[1].__name__)
            if outcome[0] == "miss":
                page = outcome[1] & ~(PAGE - 1)
                how, frame, perm = data.draw(_update, label="update")
                if how == "own":
                    frame = (page - IOVA) // PAGE
                guest.map(page, PAGE, frame, perm)
                queues.compiled.retranslate()
                continue
            if python_chain is None or compiled_chain is None:
                break
            queues.python.push(python_chain, 0)
            queues.compiled.push(compiled_chain, 0)
            python_state, compiled_state = queues.state()
            assert compiled_state == python_state
        else:
            pytest.fail("the queues kept missing")
    finally:
        guest.close()


# ---------------------------------------------------------------------- focused cases


@LAYOUTS
def test_a_miss_consumes_nothing_and_the_chain_comes_back(packed: bool, guest: IommuGuest) -> None:
    queues = _queues(guest, packed)
    readable = IOVA + BUFFER_PAGE * PAGE + 100
    writable = IOVA + (BUFFER_PAGE + 2) * PAGE - 8
    guest.map_page(BUFFER_PAGE, BUFFER_PAGE, IotlbPerm.RO)
    guest.map_page(BUFFER_PAGE + 1, BUFFER_PAGE + 1, IotlbPerm.WO)
    queues.compiled.retranslate()
    head = queues.driver.add([(readable, 64)], [(writable, 16)])
    before = queues.state()
    for _ in range(2):
        outcome, _, _ = _pop_both(queues)
        # The writable buffer runs from a mapped page into an unmapped one.
        assert outcome == ("miss", IOVA + (BUFFER_PAGE + 2) * PAGE, True)
        assert queues.state() == before
    guest.map_page(BUFFER_PAGE + 2, BUFFER_PAGE + 2, IotlbPerm.WO)
    # The compiled queue works from its table until it is rebuilt.
    assert _pop(queues.compiled)[0] == outcome
    queues.compiled.retranslate()
    outcome, _, _ = _pop_both(queues)
    assert outcome == ("chain", head, 2, ((readable, 64, False), (writable, 16, True)))
    assert queues.compiled.inflight == 1


@LAYOUTS
def test_a_stalled_kernel_queue_records_the_miss(packed: bool, guest: IommuGuest) -> None:
    queues = _queues(guest, packed)
    queues.driver.add([(IOVA + BUFFER_PAGE * PAGE, 8)], [])
    segs = queues.compiled._segments()
    status = k.ring_pop(queues.compiled.row, segs, 0)[0]
    assert status == k.EMPTY
    assert queues.compiled.stalled == (IOVA + BUFFER_PAGE * PAGE, False)
    # Stalled, the kernel does not walk again until the table is rebuilt.
    guest.map_page(BUFFER_PAGE, BUFFER_PAGE, IotlbPerm.RO)
    assert k.ring_pop(queues.compiled.row, segs, 0)[0] == k.EMPTY
    queues.compiled.retranslate()
    assert queues.compiled.stalled is None
    assert _pop_both(queues)[0][0] == "chain"


@LAYOUTS
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_a_write_into_a_read_only_entry_breaks_both(
    packed: bool, indirect: bool, guest: IommuGuest
) -> None:
    queues = _queues(guest, packed)
    guest.map_page(1, 1, IotlbPerm.RO)
    guest.map_page(2, 2, IotlbPerm.RO)
    guest.map_page(BUFFER_PAGE, BUFFER_PAGE, IotlbPerm.RO)
    queues.compiled.retranslate()
    queues.driver.add([], [(IOVA + BUFFER_PAGE * PAGE, 32)], indirect=indirect)
    outcome, _, _ = _pop_both(queues)
    assert outcome == ("error", BufferAddressError)
    assert queues.compiled.broken and isinstance(queues.compiled.error, BufferAddressError)


@LAYOUTS
def test_a_buffer_over_rw_and_wo_entries_contiguous_in_front_end_memory_is_writable(
    packed: bool, guest: IommuGuest
) -> None:
    queues = _queues(guest, packed)
    # Contiguous in both address spaces, different permissions: two entries.
    guest.map_page(BUFFER_PAGE, 6, IotlbPerm.RW)
    guest.map_page(BUFFER_PAGE + 1, 7, IotlbPerm.WO)
    assert len(guest.iotlb) == 3
    queues.compiled.retranslate()
    start = IOVA + (BUFFER_PAGE + 1) * PAGE - 100
    head = queues.driver.add([], [(start, 300)])
    outcome, python_chain, compiled_chain = _pop_both(queues)
    assert outcome == ("chain", head, 1, ((start, 300, True),))
    assert compiled_chain is not None and python_chain is not None
    assert compiled_chain.write(b"z" * 300) == 300
    assert guest.memory.read(GPA + 7 * PAGE - 100, 300) == b"z" * 300
    queues.compiled.push(compiled_chain, 300)
    queues.python.push(python_chain, 300)
    assert queues.driver.get_used() == (head, 300)


@LAYOUTS
@pytest.mark.parametrize("writable", [False, True], ids=["read", "write"])
@pytest.mark.parametrize(
    ("frame", "length"),
    [(FRAMES, 16), (-1, 16), (FRAMES - 1, PAGE + 16)],
    ids=["past-memory", "before-memory", "running-out-of-memory"],
)
def test_an_entry_outside_guest_memory_breaks_both(
    packed: bool, writable: bool, frame: int, length: int, guest: IommuGuest
) -> None:
    queues = _queues(guest, packed)
    # Two pages contiguous in front-end memory, from ``frame`` on.
    guest.map_page(BUFFER_PAGE, frame, IotlbPerm.RW)
    guest.map_page(BUFFER_PAGE + 1, frame + 1, IotlbPerm.RW)
    queues.compiled.retranslate()
    buffer = [(IOVA + BUFFER_PAGE * PAGE + 8, length)]
    queues.driver.add([] if writable else buffer, buffer if writable else [])
    assert _pop_both(queues)[0] == ("error", BufferAddressError)


@LAYOUTS
def test_an_entry_across_two_regions_misses_then_breaks_both(packed: bool) -> None:
    """Contiguous in front-end memory, not in this process: translated whole, still refused."""
    guest = IommuGuest(boundary=BUFFER_PAGE + 1)
    try:
        queues = _queues(guest, packed)
        for page in (BUFFER_PAGE, BUFFER_PAGE + 1):
            guest.map_page(page, page, IotlbPerm.RW)
        queues.compiled.retranslate()
        queues.driver.add([(IOVA + (BUFFER_PAGE + 1) * PAGE - 8, PAGE + 16)], [])
        assert _pop_both(queues)[0] == ("miss", IOVA + (BUFFER_PAGE + 2) * PAGE, False)
        guest.map_page(BUFFER_PAGE + 2, BUFFER_PAGE + 2, IotlbPerm.RW)
        queues.compiled.retranslate()
        assert _pop_both(queues)[0] == ("error", BufferAddressError)
    finally:
        guest.close()


@LAYOUTS
def test_scattered_pages_break_both(packed: bool, guest: IommuGuest) -> None:
    queues = _queues(guest, packed)
    guest.map_page(BUFFER_PAGE, 5, IotlbPerm.RW)
    guest.map_page(BUFFER_PAGE + 1, 4, IotlbPerm.RW)
    queues.compiled.retranslate()
    queues.driver.add([(IOVA + (BUFFER_PAGE + 1) * PAGE - 8, 16)], [])
    assert _pop_both(queues)[0] == ("error", BufferAddressError)


@LAYOUTS
@pytest.mark.parametrize(
    "mapped",
    [0, DRIVER_AREA - IOVA, DEVICE_AREA - IOVA],
    ids=["nothing", "descriptors", "descriptors-and-driver-area"],
)
def test_an_untranslated_ring_area_is_a_miss_for_both(
    packed: bool, mapped: int, guest: IommuGuest
) -> None:
    if mapped:
        guest.map(IOVA, mapped, 0, IotlbPerm.RW)
    with pytest.raises(IotlbMissError) as python_miss:
        _python_device(guest.space, packed)
    with pytest.raises(IotlbMissError) as compiled_miss:
        _compiled_device(guest, packed)
    assert (compiled_miss.value.iova, compiled_miss.value.write) == (
        python_miss.value.iova,
        python_miss.value.write,
    )
    assert python_miss.value.iova == IOVA + mapped


@LAYOUTS
def test_read_only_descriptors_are_refused_alike(packed: bool, guest: IommuGuest) -> None:
    """A packed device writes used descriptors into the ring; a split one only reads it."""
    guest.map(IOVA, DRIVER_AREA - IOVA, 0, IotlbPerm.RO)
    guest.map(DRIVER_AREA, PAGE - (DRIVER_AREA - IOVA), 0, IotlbPerm.RW, DRIVER_AREA - IOVA)
    if not packed:
        _python_device(guest.space, packed)
        _compiled_device(guest, packed)
        return
    with pytest.raises(IotlbPermissionError) as python_refusal:
        _python_device(guest.space, packed)
    with pytest.raises(IotlbPermissionError) as compiled_refusal:
        _compiled_device(guest, packed)
    assert compiled_refusal.value.iova == python_refusal.value.iova == DESC


# ---------------------------------------------------------------------- dirty log


def _dirty_pages(bitmap: SharedMemory) -> set[int]:
    bits = bytes(bitmap.buf)
    return {i for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1}


@LAYOUTS
@pytest.mark.parametrize("event_idx", [False, True], ids=["plain", "event-idx"])
def test_dirty_log_marks_the_pages_behind_the_iovas(
    packed: bool, event_idx: bool, guest: IommuGuest
) -> None:
    # Rings and indirect tables on frames other than their own, buffers
    # scattered: only the IOTLB knows which guest-physical pages are written.
    for page, frame, perm in (
        (0, 5, IotlbPerm.RW),
        (1, 1, IotlbPerm.RW),
        (2, 2, IotlbPerm.RW),
        (BUFFER_PAGE, 7, IotlbPerm.RO),
        (BUFFER_PAGE + 1, 3, IotlbPerm.RW),
        (BUFFER_PAGE + 2, 4, IotlbPerm.WO),
        (BUFFER_PAGE + 3, 8, IotlbPerm.WO),
    ):
        guest.map_page(page, frame, perm)
    bitmap_size = ((GPA + FRAMES * PAGE) >> 15) + 1
    log_addr = DESC if packed else DEVICE_AREA
    with (
        allocate_shared(bitmap_size) as python_bitmap,
        allocate_shared(bitmap_size) as compiled_bitmap,
    ):
        python_log = DirtyLog(python_bitmap.fd, bitmap_size, 0)
        compiled_log = DirtyLog(compiled_bitmap.fd, bitmap_size, 0)
        iotlb_log = IotlbDirtyLog(python_log, guest.space)
        # The driver reaches memory through the IOTLB too, so both agree on the rings.
        driver = _driver(IotlbAddressSpace(guest.iotlb, guest.memory), packed)
        python = _python_device(
            guest.space, packed, event_idx=event_idx, log=iotlb_log, log_addr=log_addr
        )
        compiled = _compiled_device(
            guest, packed, event_idx=event_idx, log=compiled_log, log_addr=log_addr
        )
        queues = Queues(driver, python, compiled)
        # A buffer over two pages contiguous in front-end memory (frames 3 and 4),
        # and one written only in part.
        spanning = IOVA + (BUFFER_PAGE + 2) * PAGE - 40
        partial = IOVA + (BUFFER_PAGE + 3) * PAGE + 100
        driver.add([(IOVA + BUFFER_PAGE * PAGE, 32)], [(spanning, 80), (partial, 3000)])
        driver.add([], [(IOVA + (BUFFER_PAGE + 1) * PAGE, 16)], indirect=True)
        for written in (80 + 500, 16):
            _, python_chain, compiled_chain = _pop_both(queues)
            assert python_chain is not None and compiled_chain is not None
            python.push(python_chain, written)
            compiled.push(compiled_chain, written)
        assert _pop_both(queues)[0] == ("empty",)
        pages = _dirty_pages(compiled_bitmap)
        assert pages == _dirty_pages(python_bitmap)
        assert pages == {(GPA >> 12) + frame for frame in (5, 3, 4, 8)}
        assert iotlb_log.unlogged == 0
        assert compiled.row[k.Q_LOG_MISSED] == 0
        python_log.close()
        compiled_log.close()


def test_dirty_log_counts_what_it_cannot_translate(guest: IommuGuest) -> None:
    """An IOVA the IOTLB lost is counted as missed by both loggers, never logged elsewhere."""
    guest.map_page(0, 0, IotlbPerm.RW)
    bitmap_size = ((GPA + FRAMES * PAGE) >> 15) + 1
    with allocate_shared(bitmap_size) as bitmap:
        log = DirtyLog(bitmap.fd, bitmap_size, 0)
        compiled = _compiled_device(guest, False, log=log, log_addr=DEVICE_AREA)
        guest.map_page(BUFFER_PAGE, BUFFER_PAGE, IotlbPerm.RW)
        compiled.retranslate()
        k.log_write(compiled.row, IOVA + BUFFER_PAGE * PAGE - 8, 16)
        iotlb_log = IotlbDirtyLog(log, guest.space)
        iotlb_log.log_write(IOVA + BUFFER_PAGE * PAGE - 8, 16)
        assert _dirty_pages(bitmap) == {(GPA >> 12) + BUFFER_PAGE}
        assert compiled.row[k.Q_LOG_MISSED] == 1
        assert iotlb_log.unlogged == 8
        log.close()
