"""Guest memory table, shared allocations and the dirty log."""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fds import fd_count
from pyvdpa.errors import GuestMemoryError
from pyvdpa.memory import (
    LOG_PAGE_SIZE,
    MAX_MEM_SLOTS,
    DirtyLog,
    FdMapping,
    GuestMemory,
    MemoryRegion,
    allocate_shared,
)
from pyvdpa.vhost_user.protocol import MAX_MEM_REGIONS

PAGE = 4096


pytestmark = pytest.mark.usefixtures("no_fd_leak")


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """fds to close at the end of the test."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def pattern(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(size))


class TestTranslation:
    def test_regions_with_odd_offsets(self, fds: list[int]) -> None:
        # Two regions share one memfd at unaligned offsets; a third has its own.
        shared = memfd(4 * PAGE, pattern(4 * PAGE, 1))
        other = memfd(PAGE + 3, pattern(PAGE + 3, 2))
        fds += [shared, other]
        regions = [
            MemoryRegion(0x0, 0x1000, 0x7F00_0000_0000, 0x1001),
            MemoryRegion(0x10_0000, 0x800, 0x7F00_0010_0000, 3),
            MemoryRegion(0x20_0000, PAGE, 0x7F00_0020_0000, 3),
        ]
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(regions[0], shared)
            mem.add_region(regions[1], shared)
            mem.add_region(regions[2], other)
            assert mem.regions == tuple(regions)
            assert mem.read(0x0, 0x1000) == pattern(4 * PAGE, 1)[0x1001:0x2001]
            assert mem.read(0x10_0000, 0x800) == pattern(4 * PAGE, 1)[3:0x803]
            assert mem.read(0x20_0000, PAGE) == pattern(PAGE + 3, 2)[3:]
            mem.write(0x10, b"hello")
            assert os.pread(shared, 5, 0x1011) == b"hello"
            os.pwrite(other, b"front-end", 3 + 100)
            assert mem.read(0x20_0000 + 100, 9) == b"front-end"

    def test_views_are_writable_and_shared(self, fds: list[int]) -> None:
        fd = memfd(2 * PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(MemoryRegion(0x1000, 2 * PAGE, 0x5000, 0), fd)
            view = mem.view(0x1800, 4)
            view[:] = b"\x01\x02\x03\x04"
            assert os.pread(fd, 4, 0x800) == b"\x01\x02\x03\x04"
            view.release()

    def test_uva_translation(self, fds: list[int]) -> None:
        fd = memfd(3 * PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(MemoryRegion(0x4000_0000, PAGE, 0x7000_0000, 0), fd)
            mem.add_region(MemoryRegion(0x1000, PAGE, 0x7000_1000, PAGE), fd)
            assert mem.uva_to_gpa(0x7000_0000) == 0x4000_0000
            assert mem.uva_to_gpa(0x7000_0FFF) == 0x4000_0FFF
            assert mem.uva_to_gpa(0x7000_1010, 16) == 0x1010
            # Adjacent in UVA space, not in GPA space: no straddling.
            with pytest.raises(GuestMemoryError):
                mem.uva_to_gpa(0x7000_0FF0, 32)
            with pytest.raises(GuestMemoryError):
                mem.uva_to_gpa(0x6FFF_FFFF)
            with pytest.raises(GuestMemoryError):
                mem.uva_to_gpa(0x7000_2000)
            mem.write(0x1020, b"ring")
            with mem.uva_view(0x7000_1020, 4) as view:
                assert bytes(view) == b"ring"

    def test_dpdk_style_identity_mapping(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(MemoryRegion(0x7F12_3456_0000, PAGE, 0x7F12_3456_0000, 0), fd)
            assert mem.uva_to_gpa(0x7F12_3456_0100) == 0x7F12_3456_0100


class TestBounds:
    @pytest.fixture
    def mem(self, fds: list[int]) -> Iterator[GuestMemory]:
        fd = memfd(2 * PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            # Two regions adjacent in GPA space.
            mem.add_region(MemoryRegion(0x1000, PAGE, 0x10000, 0), fd)
            mem.add_region(MemoryRegion(0x2000, PAGE, 0x20000, PAGE), fd)
            yield mem

    def test_edges(self, mem: GuestMemory) -> None:
        assert len(mem.view(0x1000, PAGE)) == PAGE
        assert mem.read(0x1FFF, 1) == b"\0"
        assert mem.read(0x2FFF, 1) == b"\0"
        assert mem.view(0x1FFF, 0).nbytes == 0
        assert mem.read(0x1000, 0) == b""

    @pytest.mark.parametrize(
        ("addr", "length"),
        [
            (0x0FFF, 1),  # one before the first region
            (0x0FFF, 2),  # starts before, ends inside
            (0x1FFF, 2),  # straddles the two regions
            (0x1000, 2 * PAGE),  # covers both regions
            (0x2FFF, 2),  # one past the end
            (0x3000, 0),  # zero length just past the end
            (0x3000, 1),
            (-1, 1),
            (0x1000, -1),
            (2**64 - 1, 2),
            (2**64, 0),
            (2**70, 1),
        ],
    )
    def test_refused(self, mem: GuestMemory, addr: int, length: int) -> None:
        with pytest.raises(GuestMemoryError):
            mem.view(addr, length)

    def test_empty_table(self) -> None:
        with (
            GuestMemory(MAX_MEM_REGIONS) as mem,
            pytest.raises(GuestMemoryError, match="not inside"),
        ):
            mem.view(0, 0)


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Disjoint (gpa, size) regions, sizes in pages, possibly adjacent."""
    gaps = draw(st.lists(st.integers(0, 3), min_size=1, max_size=4))
    sizes = draw(st.lists(st.integers(1, 3), min_size=len(gaps), max_size=len(gaps)))
    regions, cursor = [], 0
    for gap, size in zip(gaps, sizes, strict=True):
        cursor += gap * PAGE
        regions.append((cursor, size * PAGE))
        cursor += size * PAGE
    return regions


@settings(max_examples=60, deadline=None)
@given(layouts(), st.lists(st.tuples(st.integers(-2, 20 * PAGE), st.integers(0, 3 * PAGE))))
def test_view_matches_model(layout: list[tuple[int, int]], accesses: list[tuple[int, int]]) -> None:
    total = sum(size for _, size in layout)
    fd = memfd(total)
    try:
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            offset = 0
            for gpa, size in layout:
                mem.add_region(MemoryRegion(gpa, size, 0x1_0000_0000 + gpa, offset), fd)
                offset += size
            for addr, length in accesses:
                inside = any(g <= addr < g + s and addr + length <= g + s for g, s in layout)
                if inside:
                    with mem.view(addr, length) as view:
                        assert view.nbytes == length
                else:
                    with pytest.raises(GuestMemoryError):
                        mem.view(addr, length)
    finally:
        os.close(fd)


class TestRegionValidation:
    @pytest.mark.parametrize(
        "region",
        [
            MemoryRegion(0x0, 0, 0x1000, 0),  # zero size
            MemoryRegion(-PAGE, PAGE, 0x1000, 0),
            MemoryRegion(0x0, PAGE, -1, 0),
            MemoryRegion(0x0, PAGE, 0x1000, -1),
            MemoryRegion(2**64 - PAGE + 1, PAGE, 0x1000, 0),  # GPA end passes 2**64
            MemoryRegion(0x0, PAGE, 2**64 - 1, 0),  # UVA end passes 2**64
            MemoryRegion(0x0, PAGE, 0x1000, 2**64 - 1),
            MemoryRegion(0x0, 2**64, 0x0, 0),
        ],
    )
    def test_bad_region(self, region: MemoryRegion, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem, pytest.raises(GuestMemoryError):
            mem.add_region(region, fd)

    @pytest.mark.parametrize(
        "second",
        [
            MemoryRegion(0x1FFF, PAGE, 0x90000, 0),  # GPA overlap, last byte
            MemoryRegion(0x0, 0x1001, 0x90000, 0),  # GPA overlap, first byte
            MemoryRegion(0x1800, 0x100, 0x90000, 0),  # GPA inside
            MemoryRegion(0x8000, PAGE, 0x10FFF, 0),  # UVA overlap
            MemoryRegion(0x8000, PAGE, 0x0F001, 0),
        ],
    )
    def test_overlap_refused(self, second: MemoryRegion, fds: list[int]) -> None:
        fd = memfd(2 * PAGE)
        fds.append(fd)
        first = MemoryRegion(0x1000, PAGE, 0x10000, 0)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(first, fd)
            with pytest.raises(GuestMemoryError, match="overlaps"):
                mem.add_region(second, fd)
            assert mem.regions == (first,)

    def test_adjacent_regions_accepted(self, fds: list[int]) -> None:
        fd = memfd(2 * PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(MemoryRegion(0x1000, PAGE, 0x10000, 0), fd)
            mem.add_region(MemoryRegion(0x2000, PAGE, 0x11000, PAGE), fd)
            mem.add_region(MemoryRegion(0x0, PAGE, 0xF000, 0), fd)
            assert len(mem.regions) == 3

    def test_too_many_regions(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            assert mem.max_regions == MAX_MEM_REGIONS
            for i in range(MAX_MEM_REGIONS):
                mem.add_region(MemoryRegion(i * PAGE, PAGE, i * PAGE, 0), fd)
            with pytest.raises(GuestMemoryError, match="full"):
                mem.add_region(MemoryRegion(0x100000, PAGE, 0x100000, 0), fd)
            with pytest.raises(GuestMemoryError, match="limit"):
                mem.set_table([(MemoryRegion(i * PAGE, PAGE, i * PAGE, 0), fd) for i in range(9)])
            assert len(mem.regions) == MAX_MEM_REGIONS

    def test_max_mem_slots(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_SLOTS) as mem:
            for i in range(MAX_MEM_SLOTS):
                mem.add_region(MemoryRegion(i * PAGE, 16, 0x1_0000_0000 + i * PAGE, i), fd)
            with pytest.raises(GuestMemoryError):
                mem.add_region(MemoryRegion(2**40, 16, 2**41, 0), fd)
            mem.write(300 * PAGE, b"x")
            assert os.pread(fd, 1, 300) == b"x"

    def test_bad_max_regions(self) -> None:
        with pytest.raises(ValueError, match="positive"):
            GuestMemory(0)


class TestUnmappableFds:
    REGION = MemoryRegion(0x0, PAGE, 0x10000, 0)

    def check(self, fd: int) -> None:
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            with pytest.raises(GuestMemoryError):
                mem.add_region(self.REGION, fd)
            assert mem.regions == ()
            assert mem.generation == 0

    def test_pipe(self) -> None:
        r, w = os.pipe()
        try:
            self.check(r)
            self.check(w)
        finally:
            os.close(r)
            os.close(w)

    def test_socket(self) -> None:
        a, b = socket.socketpair()
        with a, b:
            self.check(a.fileno())

    def test_closed_fd(self) -> None:
        fd = memfd(PAGE)
        os.close(fd)
        self.check(fd)

    def test_negative_fd(self) -> None:
        self.check(-1)

    def test_file_too_small(self, fds: list[int]) -> None:
        fd = memfd(PAGE - 1)
        fds.append(fd)
        self.check(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem, pytest.raises(GuestMemoryError, match="holds"):
            mem.add_region(MemoryRegion(0x0, 0x10, 0x0, PAGE - 0x8), fd)

    def test_read_only_file(self, tmp_path: Path) -> None:
        path = tmp_path / "ram"
        path.write_bytes(bytes(PAGE))
        fd = os.open(path, os.O_RDONLY)
        try:
            self.check(fd)
        finally:
            os.close(fd)

    def test_directory(self, tmp_path: Path) -> None:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.check(fd)
        finally:
            os.close(fd)

    def test_plain_file(self, tmp_path: Path) -> None:
        path = tmp_path / "ram"
        path.write_bytes(pattern(3 * PAGE, 5))
        fd = os.open(path, os.O_RDWR)
        try:
            with GuestMemory(MAX_MEM_REGIONS) as mem:
                mem.add_region(MemoryRegion(0x0, PAGE, 0x0, PAGE + 1), fd)
                assert mem.read(0, PAGE) == pattern(3 * PAGE, 5)[PAGE + 1 : 2 * PAGE + 1]
        finally:
            os.close(fd)


class TestTableChanges:
    def test_caller_keeps_fd(self) -> None:
        fd = memfd(PAGE, b"kept")
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(MemoryRegion(0, PAGE, 0, 0), fd)
            os.close(fd)
            assert mem.read(0, 4) == b"kept"

    def test_set_table_replaces(self, fds: list[int]) -> None:
        a, b = memfd(PAGE, b"old"), memfd(PAGE, b"new")
        fds += [a, b]
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.set_table([(MemoryRegion(0, PAGE, 0, 0), a)])
            generation = mem.generation
            mem.set_table([(MemoryRegion(0x1000, PAGE, 0x1000, 0), b)])
            assert mem.generation > generation
            assert mem.read(0x1000, 3) == b"new"
            with pytest.raises(GuestMemoryError):
                mem.view(0, 1)

    @pytest.mark.parametrize("failure", ["pipe", "overlap", "too_small", "zero_size"])
    def test_set_table_all_or_nothing(self, failure: str, fds: list[int]) -> None:
        old_fd, new_fd = memfd(PAGE, b"old"), memfd(2 * PAGE, b"new")
        r, w = os.pipe()
        fds += [old_fd, new_fd, r, w]
        old = MemoryRegion(0x0, PAGE, 0x0, 0)
        good = [
            (MemoryRegion(0x10000, PAGE, 0x10000, 0), new_fd),
            (MemoryRegion(0x20000, PAGE, 0x20000, PAGE), new_fd),
        ]
        bad = {
            "pipe": (MemoryRegion(0x30000, PAGE, 0x30000, 0), r),
            "overlap": (MemoryRegion(0x10800, PAGE, 0x30000, 0), new_fd),
            "too_small": (MemoryRegion(0x30000, PAGE, 0x30000, 2 * PAGE), new_fd),
            "zero_size": (MemoryRegion(0x30000, 0, 0x30000, 0), new_fd),
        }[failure]
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.set_table([(old, old_fd)])
            generation = mem.generation
            before = fd_count()
            with pytest.raises(GuestMemoryError):
                mem.set_table([*good, bad])
            assert fd_count() == before
            assert mem.regions == (old,)
            assert mem.generation == generation
            assert mem.read(0, 3) == b"old"

    def test_remove_region(self, fds: list[int]) -> None:
        fd = memfd(2 * PAGE)
        fds.append(fd)
        keep = MemoryRegion(0x0, PAGE, 0x10000, 0)
        drop = MemoryRegion(0x1000, PAGE, 0x20000, PAGE)
        with GuestMemory(MAX_MEM_SLOTS) as mem:
            before = fd_count()
            mem.add_region(keep, fd)
            mem.add_region(drop, fd)
            generation = mem.generation
            # REM_MEM_REG matches without regard to mmap_offset.
            mem.remove_region(MemoryRegion(0x1000, PAGE, 0x20000, 0))
            assert mem.generation == generation + 1
            assert mem.regions == (keep,)
            with pytest.raises(GuestMemoryError):
                mem.view(0x1000, 1)
            with pytest.raises(GuestMemoryError):
                mem.uva_to_gpa(0x20000)
            for unknown in (drop, MemoryRegion(0x0, PAGE, 0x10001, 0), MemoryRegion(0, 1, 0, 0)):
                with pytest.raises(GuestMemoryError, match="no mapped region"):
                    mem.remove_region(unknown)
            mem.remove_region(keep)
            assert not mem.regions
            assert fd_count() == before

    def test_clear_and_close(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        mem = GuestMemory(MAX_MEM_REGIONS)
        mem.add_region(MemoryRegion(0, PAGE, 0, 0), fd)
        mem.clear()
        assert mem.regions == ()
        mem.add_region(MemoryRegion(0, PAGE, 0, 0), fd)
        view = mem.view(0, 8)
        mem.close()
        mem.close()
        with pytest.raises(ValueError, match="released"):
            view[0] = 1
        with pytest.raises(GuestMemoryError, match="closed"):
            mem.add_region(MemoryRegion(0, PAGE, 0, 0), fd)
        with pytest.raises(GuestMemoryError, match="closed"):
            mem.set_table([])


class TestRemapWithLiveViews:
    def test_views_released_on_removal(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        region = MemoryRegion(0x1000, PAGE, 0x1000, 0)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(region, fd)
            view = mem.view(0x1000, 16)
            uva = mem.uva_view(0x1000, 16)
            generation = mem.generation
            mem.remove_region(region)
            assert mem.generation == generation + 1
            assert mem.pending_unmaps == 0
            for stale in (view, uva):
                with pytest.raises(ValueError, match="released"):
                    stale[0]
            with pytest.raises(GuestMemoryError):
                mem.view(0x1000, 1)

    def test_exported_view_kept_pending(self, fds: list[int]) -> None:
        fd = memfd(PAGE, b"\x2a")
        fds.append(fd)
        region = MemoryRegion(0x1000, PAGE, 0x1000, 0)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(region, fd)
            array = np.frombuffer(mem.view(0x1000, 16), dtype=np.uint8)
            mem.set_table([(MemoryRegion(0x8000, PAGE, 0x8000, 0), fd)])
            # The old region is gone from the table but cannot be unmapped yet.
            assert mem.pending_unmaps == 1
            with pytest.raises(GuestMemoryError):
                mem.view(0x1000, 1)
            assert array[0] == 0x2A
            del array
            mem.clear()
            assert mem.pending_unmaps == 0

    def test_exported_view_at_close(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        mem = GuestMemory(MAX_MEM_REGIONS)
        mem.add_region(MemoryRegion(0, PAGE, 0, 0), fd)
        array = np.frombuffer(mem.view(0, 16), dtype=np.uint8)
        mem.close()
        assert mem.pending_unmaps == 0
        # The mapping outlives the table until its last export goes.
        assert array.sum() == 0
        del array

    def test_untracked_views_die_quietly(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        with GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(MemoryRegion(0, PAGE, 0, 0), fd)
            for i in range(1000):
                mem.write(i, b"\x01")
            assert mem.read(0, 1000) == b"\x01" * 1000


class TestFdMapping:
    def test_unaligned_offset(self, fds: list[int]) -> None:
        fd = memfd(3 * PAGE, pattern(3 * PAGE, 9))
        fds.append(fd)
        mapping = FdMapping(fd, 100, PAGE + 17)
        assert bytes(mapping.buffer) == pattern(3 * PAGE, 9)[PAGE + 17 : PAGE + 117]
        assert ctypes.string_at(mapping.address, 100) == bytes(mapping.buffer)
        assert mapping.close()
        assert mapping.closed
        with pytest.raises(GuestMemoryError, match="closed"):
            mapping.view(0, 1)

    @pytest.mark.parametrize(("size", "offset"), [(0, 0), (-1, 0), (1, -1), (2**64, 1)])
    def test_bad_sizes(self, size: int, offset: int, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        with pytest.raises(GuestMemoryError):
            FdMapping(fd, size, offset)


class TestSharedMemory:
    def test_allocate(self) -> None:
        with allocate_shared(3 * PAGE, "ram") as shm:
            assert shm.size == 3 * PAGE
            assert os.fstat(shm.fd).st_size == 3 * PAGE
            buf = shm.buf
            assert bytes(buf[:16]) == bytes(16)
            buf[100:105] = b"guest"
            assert ctypes.string_at(shm.address + 100, 5) == b"guest"
            assert os.pread(shm.fd, 5, 100) == b"guest"
        with pytest.raises(ValueError, match="released"):
            buf[0]
        assert shm.fd == -1
        shm.close()

    def test_front_end_and_back_end_share(self) -> None:
        with allocate_shared(2 * PAGE) as shm, GuestMemory(MAX_MEM_REGIONS) as mem:
            mem.add_region(MemoryRegion(0x4000_0000, shm.size, shm.address, 0), shm.fd)
            gpa = mem.uva_to_gpa(shm.address + 0x123)
            assert gpa == 0x4000_0123
            mem.write(gpa, b"from the back-end")
            assert bytes(shm.buf[0x123 : 0x123 + 17]) == b"from the back-end"

    @pytest.mark.parametrize("size", [0, -5])
    def test_bad_size(self, size: int) -> None:
        with pytest.raises(GuestMemoryError):
            allocate_shared(size)


class TestDirtyLog:
    def bits(self, fd: int, size: int, offset: int = 0) -> set[int]:
        data = os.pread(fd, size, offset)
        return {i * 8 + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}

    @pytest.mark.parametrize(
        ("gpa", "length", "pages"),
        [
            (0, 1, {0}),
            (0xFFF, 1, {0}),
            (0xFFF, 2, {0, 1}),
            (0x1000, 0x1000, {1}),
            (0x7000, 0x2000, {7, 8}),
            (0x3000, 0x10000, set(range(3, 19))),
            (0x5000, 0, set()),
            (63 * LOG_PAGE_SIZE, 1, {63}),
        ],
    )
    def test_bit_math(self, gpa: int, length: int, pages: set[int], fds: list[int]) -> None:
        fd = memfd(8)
        fds.append(fd)
        log = DirtyLog(fd, 8, 0)
        log.log_write(gpa, length)
        log.close()
        assert self.bits(fd, 8) == pages
        assert log.out_of_range == 0

    def test_pfn_byte_and_bit(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        fds.append(fd)
        log = DirtyLog(fd, PAGE, 0)
        pfn = 0x1234
        log.log_write(pfn * LOG_PAGE_SIZE + 5, 10)
        assert os.pread(fd, 1, pfn >> 3)[0] == 1 << (pfn & 7)
        log.close()

    def test_out_of_range(self, fds: list[int]) -> None:
        fd = memfd(PAGE, b"\0" * 2 + b"\xee" * 100)
        fds.append(fd)
        log = DirtyLog(fd, 2, 0)  # 16 pages
        log.log_write(14 * LOG_PAGE_SIZE, 4 * LOG_PAGE_SIZE)
        assert log.out_of_range == 2
        log.log_write(100 * LOG_PAGE_SIZE, 1)
        log.log_write(2**64 - 1, 1)
        log.log_write(2**40, 2**41)
        assert log.out_of_range == 2 + 1 + 1 + 2**41 // LOG_PAGE_SIZE
        log.close()
        assert self.bits(fd, 2) == {14, 15}
        assert os.pread(fd, 100, 2) == b"\xee" * 100

    def test_offset_and_bad_input(self, fds: list[int]) -> None:
        fd = memfd(2 * PAGE)
        fds.append(fd)
        log = DirtyLog(fd, 16, PAGE + 3)
        assert log.size == 16
        log.log_write(0, 1)
        with pytest.raises(GuestMemoryError):
            log.log_write(-1, 1)
        with pytest.raises(GuestMemoryError):
            log.log_write(0, -1)
        log.close()
        log.close()
        with pytest.raises(GuestMemoryError, match="closed"):
            log.log_write(0, 1)
        assert os.pread(fd, 1, PAGE + 3) == b"\x01"
        assert os.pread(fd, 3, PAGE) == bytes(3)

    def test_validation(self, fds: list[int]) -> None:
        fd = memfd(PAGE)
        r, w = os.pipe()
        fds += [fd, r, w]
        for args in [(fd, 0, 0), (fd, PAGE + 1, 0), (fd, 16, PAGE), (r, 16, 0), (-1, 16, 0)]:
            with pytest.raises(GuestMemoryError):
                DirtyLog(*args)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 70 * LOG_PAGE_SIZE), st.integers(0, 9 * PAGE))))
    def test_matches_model(self, writes: list[tuple[int, int]]) -> None:
        size = 8  # 64 pages
        fd = memfd(size)
        try:
            log = DirtyLog(fd, size, 0)
            expected: set[int] = set()
            skipped = 0
            for gpa, length in writes:
                log.log_write(gpa, length)
                if length:
                    pages = range(gpa // PAGE, (gpa + length - 1) // PAGE + 1)
                    expected |= {p for p in pages if p < size * 8}
                    skipped += sum(1 for p in pages if p >= size * 8)
            log.close()
            assert self.bits(fd, size) == expected
            assert log.out_of_range == skipped
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- hugetlbfs

_HUGE = 2 << 20
_NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def _hugetlbfs_mount(tmp_path: Path) -> tuple[Path, bool]:
    """A hugetlbfs mount point with 2 MiB pages, and whether this test mounted it."""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, where, kind, options = line.split()[:4]
            if kind == "hugetlbfs" and "pagesize=1" not in options:
                return Path(where), False
    point = tmp_path / "huge"
    point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount hugetlbfs: {done.stderr.strip() or done.returncode}")
    return point, True


@pytest.fixture
def huge_pages(tmp_path: Path) -> Iterator[Path]:
    """Three reserved 2 MiB huge pages and a hugetlbfs directory; restored afterwards."""
    if os.geteuid() != 0 or not _NR_HUGEPAGES.exists():
        pytest.skip("reserving huge pages needs root and /proc/sys/vm/nr_hugepages")
    previous = int(_NR_HUGEPAGES.read_text())
    try:
        _NR_HUGEPAGES.write_text(f"{previous + 3}\n")
    except OSError as exc:
        pytest.skip(f"the kernel refuses to reserve huge pages: {exc.strerror}")
    try:
        got = int(_NR_HUGEPAGES.read_text())
        if got < previous + 3:
            pytest.skip(
                f"the kernel reserved {got - previous} of 3 huge pages (memory too fragmented)"
            )
        point, mounted = _hugetlbfs_mount(tmp_path)
        try:
            yield point
        finally:
            if mounted:
                subprocess.run(["umount", str(point)], check=False)
    finally:
        _NR_HUGEPAGES.write_text(f"{previous}\n")


def test_hugetlbfs_region_with_an_offset(huge_pages: Path) -> None:
    """A region from a hugetlbfs file, starting inside its second huge page.

    hugetlbfs only maps at huge-page boundaries and cannot be written with
    write(2): the file is filled through a mapping of its own.
    """
    path = huge_pages / f"guest-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, 3 * _HUGE)
        assert os.fstat(fd).st_blksize == _HUGE
        offset = _HUGE + 0x3000
        size = 3 * _HUGE - offset
        gpa, uva = 0x4000_0000, 0x7F00_0000_3000
        with mmap.mmap(fd, 3 * _HUGE) as file_view:
            file_view[offset + 0x1234 : offset + 0x1238] = b"huge"
            file_view[3 * _HUGE - 4 :] = b"tail"
            memory = GuestMemory(MAX_MEM_REGIONS)
            try:
                memory.add_region(MemoryRegion(gpa, size, uva, offset), fd)
                assert memory.uva_to_gpa(uva + 0x1234) == gpa + 0x1234
                assert memory.read(gpa + 0x1234, 4) == b"huge"
                assert memory.read(gpa + size - 4, 4) == b"tail"
                memory.write(gpa + 0x10, b"back")
                assert file_view[offset + 0x10 : offset + 0x14] == b"back"
                with pytest.raises(GuestMemoryError):
                    memory.read(gpa + size - 2, 4)
            finally:
                memory.close()
    finally:
        os.close(fd)
