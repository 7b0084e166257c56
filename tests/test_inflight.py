"""The inflight I/O tracking buffer (GET_INFLIGHT_FD / SET_INFLIGHT_FD)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.device.inflight import (
    INFLIGHT_VERSION,
    InflightChain,
    InflightDescriptor,
    InflightRegion,
)
from pyvdpa.errors import GuestMemoryError, RemoteProtocolError, RingError

SPLIT_HEADER = struct.Struct("=QHHHH")
SPLIT_DESC = struct.Struct("=B5xHQ")
PACKED_HEADER = struct.Struct("=QHHHHHHBB7x")
PACKED_DESC = struct.Struct("=BxHHHQHHIQ")


pytestmark = pytest.mark.usefixtures("no_fd_leak")


def reopen(region: InflightRegion) -> InflightRegion:
    """What a restarted back-end sees: the same fd handed back with SET_INFLIGHT_FD."""
    return InflightRegion.from_fd(
        region.fd,
        region.mmap_size,
        region.mmap_offset,
        region.num_queues,
        region.queue_size,
        packed=region.packed,
    )


class TestLayout:
    @pytest.mark.parametrize(
        ("queue_size", "packed", "size"),
        [
            (1, False, 64),
            (2, False, 64),
            (3, False, 64),
            (4, False, 128),
            (128, False, 2112),
            (256, False, 4160),
            (32768, False, 524352),
            (1, True, 64),
            (128, True, 4160),
            (256, True, 8256),
        ],
    )
    def test_queue_region_size(self, queue_size: int, packed: bool, size: int) -> None:
        assert InflightRegion.queue_region_size(queue_size, packed=packed) == size

    def test_allocate_split(self) -> None:
        with InflightRegion.allocate(2, 128, packed=False) as region:
            assert region.mmap_size == 2 * 2112
            assert region.mmap_offset == 0
            assert os.fstat(region.fd).st_size == region.mmap_size
            raw = os.pread(region.fd, region.mmap_size, 0)
            for q in range(2):
                base = q * 2112
                # Version 0: no ring started on it yet.
                assert SPLIT_HEADER.unpack_from(raw, base) == (0, 0, 128, 0, 0)
                assert raw[base + 16 : base + 2112] == bytes(2096)
            queue = region.split_queue(1)
            assert (queue.version, queue.desc_num, queue.used_idx) == (0, 128, 0)
            assert queue.fresh and queue.inflight_heads() == []

    def test_allocate_packed(self) -> None:
        with InflightRegion.allocate(3, 4, packed=True) as region:
            stride = InflightRegion.queue_region_size(4, packed=True)
            raw = os.pread(region.fd, region.mmap_size, 0)
            for q in range(3):
                base = q * stride
                assert PACKED_HEADER.unpack_from(raw, base) == (0, 0, 4, 0, 0, 0, 0, 1, 1)
                nexts = [PACKED_DESC.unpack_from(raw, base + 32 + 32 * i)[1] for i in range(4)]
                assert nexts == [1, 2, 3, 4]
            queue = region.packed_queue(2)
            assert (queue.free_head, queue.used_wrap_counter) == (0, 1)

    def test_split_entry_layout(self) -> None:
        with InflightRegion.allocate(1, 8, packed=False) as region:
            queue = region.split_queue(0)
            queue.mark_inflight(5)
            queue.mark_inflight(2)
            queue.record_batch([5])
            raw = os.pread(region.fd, region.mmap_size, 0)
            assert SPLIT_DESC.unpack_from(raw, 16 + 16 * 5) == (1, 0, 1)
            assert SPLIT_DESC.unpack_from(raw, 16 + 16 * 2) == (1, 0, 2)
            assert SPLIT_HEADER.unpack_from(raw, 0)[3] == 5  # last_batch_head

    def test_packed_entry_layout(self) -> None:
        with InflightRegion.allocate(1, 8, packed=True) as region:
            queue = region.packed_queue(0)
            chain = [
                InflightDescriptor(0x1000, 16, 7, 0x81),
                InflightDescriptor(0x2000, 1, 7, 0x82),
            ]
            assert queue.mark_inflight(chain) == 0
            raw = os.pread(region.fd, region.mmap_size, 0)
            # inflight, next, last, num, counter, id, flags, len, addr
            assert PACKED_DESC.unpack_from(raw, 32) == (1, 1, 1, 2, 1, 7, 0x81, 16, 0x1000)
            assert PACKED_DESC.unpack_from(raw, 64) == (0, 2, 0, 0, 0, 7, 0x82, 1, 0x2000)
            assert PACKED_HEADER.unpack_from(raw, 0)[3:5] == (2, 2)


class TestSplit:
    def test_flow(self) -> None:
        with InflightRegion.allocate(1, 16, packed=False) as region:
            queue = region.split_queue(0)
            for head in (3, 1, 7):
                queue.mark_inflight(head)
            assert queue.inflight_heads() == [3, 1, 7]
            queue.record_batch([1, 7])
            queue.commit_batch([1, 7], 2)
            assert queue.inflight_heads() == [3]
            assert queue.used_idx == 2
            queue.mark_inflight(1)
            assert queue.inflight_heads() == [3, 1]
            queue.commit_batch([], 0x1_0002)
            assert queue.used_idx == 2

    def test_recover_after_published_batch(self) -> None:
        with InflightRegion.allocate(1, 16, packed=False) as region:
            queue = region.split_queue(0)
            for head in (4, 9, 2, 11):
                queue.mark_inflight(head)
            queue.record_batch([9])
            queue.commit_batch([9], 1)
            # Crash after the used ring idx moved from 1 to 3, before commit.
            queue.record_batch([2, 4])
            with reopen(region) as again:
                heads = again.split_queue(0).recover(used_ring_idx=3)
                assert heads == [11]
                assert again.split_queue(0).used_idx == 3

    def test_recover_before_publish(self) -> None:
        with InflightRegion.allocate(1, 16, packed=False) as region:
            queue = region.split_queue(0)
            for head in (4, 9, 2):
                queue.mark_inflight(head)
            queue.record_batch([9, 2])
            with reopen(region) as again:
                assert again.split_queue(0).recover(used_ring_idx=0) == [4, 9, 2]

    def test_recover_across_wrap(self) -> None:
        with InflightRegion.allocate(1, 4, packed=False) as region:
            queue = region.split_queue(0)
            queue.commit_batch([], 0xFFFF)
            queue.mark_inflight(0)
            queue.mark_inflight(1)
            queue.record_batch([1])
            assert queue.recover(used_ring_idx=0) == [0]
            assert queue.used_idx == 0

    def test_counter_resumes(self) -> None:
        with InflightRegion.allocate(1, 8, packed=False) as region:
            queue = region.split_queue(0)
            for head in (6, 0, 3):
                queue.mark_inflight(head)
            with reopen(region) as again:
                resumed = again.split_queue(0)
                assert resumed.recover(0) == [6, 0, 3]
                resumed.mark_inflight(1)
                assert resumed.inflight_heads() == [6, 0, 3, 1]

    def test_a_fresh_region_adopts_the_ring_where_it_stands(self) -> None:
        # The destination of a migration: a new buffer, a ring whose used idx is far from 0.
        with InflightRegion.allocate(1, 4, packed=False) as region:
            queue = region.split_queue(0)
            assert queue.recover(used_ring_idx=12345) == []
            assert (queue.version, queue.used_idx, queue.fresh) == (INFLIGHT_VERSION, 12345, False)
            # Started once, it is recovered as usual from then on.
            queue.mark_inflight(2)
            assert queue.recover(used_ring_idx=12345) == [2]

    def test_a_recorded_chain_ends_freshness(self) -> None:
        with InflightRegion.allocate(1, 4, packed=False) as region:
            queue = region.split_queue(0)
            queue.mark_inflight(1)
            assert not queue.fresh and queue.recover(used_ring_idx=0) == [1]

    def test_corrupt_batch_list(self) -> None:
        with InflightRegion.allocate(1, 4, packed=False) as region:
            queue = region.split_queue(0)
            region.buffer[8:10] = struct.pack("=H", INFLIGHT_VERSION)  # a back-end used it
            with pytest.raises(RemoteProtocolError, match="more than the queue size"):
                queue.recover(used_ring_idx=5)
            region.buffer[12:14] = struct.pack("=H", 9)  # last_batch_head
            with pytest.raises(RemoteProtocolError, match="outside"):
                queue.recover(used_ring_idx=1)

    @pytest.mark.parametrize("head", [-1, 16, 0x10000])
    def test_bad_head(self, head: int) -> None:
        with InflightRegion.allocate(1, 16, packed=False) as region:
            queue = region.split_queue(0)
            with pytest.raises(RingError, match="outside"):
                queue.mark_inflight(head)
            with pytest.raises(RingError, match="outside"):
                queue.record_batch([head])
            with pytest.raises(RingError, match="outside"):
                queue.commit_batch([head], 0)

    @settings(max_examples=50, deadline=None)
    @given(st.data())
    def test_matches_model(self, data: st.DataObject) -> None:
        size = 8
        with InflightRegion.allocate(1, size, packed=False) as region:
            queue = region.split_queue(0)
            model: list[int] = []
            used = 0
            for _ in range(data.draw(st.integers(0, 30))):
                free = [h for h in range(size) if h not in model]
                take: bool = data.draw(st.booleans())
                if free and take:
                    head = data.draw(st.sampled_from(free))
                    queue.mark_inflight(head)
                    model.append(head)
                elif model:
                    batch = data.draw(st.lists(st.sampled_from(model), unique=True, min_size=1))
                    queue.record_batch(batch)
                    used += len(batch)
                    queue.commit_batch(batch, used)
                    model = [h for h in model if h not in batch]
                assert queue.inflight_heads() == model
            with reopen(region) as again:
                assert again.split_queue(0).recover(used) == model


def chain(n: int, tag: int) -> list[InflightDescriptor]:
    return [InflightDescriptor(tag << 16 | i, 512 * (i + 1), tag, 0x80) for i in range(n)]


class TestPacked:
    def test_flow(self) -> None:
        with InflightRegion.allocate(1, 8, packed=True) as region:
            queue = region.packed_queue(0)
            a = queue.mark_inflight(chain(3, 1))
            b = queue.mark_inflight(chain(1, 2))
            assert (a, b) == (0, 3)
            chains = queue.inflight_chains()
            assert [c.entry for c in chains] == [0, 3]
            assert chains[0].descriptors == tuple(chain(3, 1))
            assert chains[1] == InflightChain(3, 2, tuple(chain(1, 2)))
            queue.record_batch([a], used_idx=1, used_wrap_counter=1)
            queue.commit_batch([a])
            assert [c.entry for c in queue.inflight_chains()] == [3]
            assert (queue.free_head, queue.old_free_head) == (0, 0)
            assert (queue.used_idx, queue.old_used_idx) == (1, 1)
            # The completed chain's entries are reused first.
            c = queue.mark_inflight(chain(4, 3))
            assert c == 0
            assert queue.inflight_chains()[1].descriptors == tuple(chain(4, 3))

    def test_free_list_exhausted(self) -> None:
        with InflightRegion.allocate(1, 4, packed=True) as region:
            queue = region.packed_queue(0)
            queue.mark_inflight(chain(4, 1))
            with pytest.raises(RingError, match="in flight"):
                queue.mark_inflight(chain(1, 2))
            with pytest.raises(RingError, match="does not fit"):
                queue.mark_inflight([])
            with pytest.raises(RingError, match="does not fit"):
                queue.mark_inflight(chain(5, 2))

    def test_uncommitted_batch_blocks_fetch(self) -> None:
        with InflightRegion.allocate(1, 4, packed=True) as region:
            queue = region.packed_queue(0)
            entry = queue.mark_inflight(chain(1, 1))
            queue.record_batch([entry], used_idx=1, used_wrap_counter=1)
            with pytest.raises(RingError, match="not committed"):
                queue.mark_inflight(chain(1, 2))

    @pytest.mark.parametrize("written", [False, True])
    def test_recover_interrupted_batch(self, written: bool) -> None:
        with InflightRegion.allocate(1, 8, packed=True) as region:
            queue = region.packed_queue(0)
            a = queue.mark_inflight(chain(2, 1))
            b = queue.mark_inflight(chain(1, 2))
            queue.record_batch([a], used_idx=1, used_wrap_counter=1)
            asked: list[tuple[int, int]] = []

            def descriptor_used(index: int, wrap: int) -> bool:
                asked.append((index, wrap))
                return written

            with reopen(region) as again:
                restarted = again.packed_queue(0)
                chains = restarted.recover(descriptor_used)
                assert asked == [(0, 1)]
                if written:
                    assert [c.entry for c in chains] == [b]
                    assert (restarted.used_idx, restarted.free_head) == (1, a)
                else:
                    assert [c.entry for c in chains] == [a, b]
                    assert (restarted.used_idx, restarted.free_head) == (0, 3)
                assert restarted.old_used_idx == restarted.used_idx

    def test_recover_partial_fetch(self) -> None:
        with InflightRegion.allocate(1, 8, packed=True) as region:
            queue = region.packed_queue(0)
            queue.mark_inflight(chain(1, 1))
            # A crash in the middle of fetching a chain: the head entry is
            # marked but old_free_head was not advanced.
            region.buffer[32 + 32 + 0] = 1
            region.buffer[12:14] = struct.pack("=H", 2)  # free_head
            with reopen(region) as again:
                restarted = again.packed_queue(0)
                chains = restarted.recover(lambda index, wrap: False)
                assert [c.entry for c in chains] == [0]
                assert restarted.free_head == 1

    def test_recover_nothing_pending(self) -> None:
        with InflightRegion.allocate(1, 8, packed=True) as region:

            def unexpected(index: int, wrap: int) -> bool:
                raise AssertionError("no batch was in progress")

            assert region.packed_queue(0).recover(unexpected) == []

    def test_corrupt_chain(self) -> None:
        with InflightRegion.allocate(1, 4, packed=True) as region:
            queue = region.packed_queue(0)
            queue.mark_inflight(chain(2, 1))
            region.buffer[32 + 2 : 32 + 4] = struct.pack("=H", 40)  # next
            with pytest.raises(RemoteProtocolError, match="outside"):
                queue.inflight_chains()
            region.buffer[32 + 6 : 32 + 8] = struct.pack("=H", 0)  # num
            with pytest.raises(RemoteProtocolError, match="chain of 0"):
                queue.inflight_chains()

    def test_bad_entries(self) -> None:
        with InflightRegion.allocate(1, 4, packed=True) as region:
            queue = region.packed_queue(0)
            with pytest.raises(RingError):
                queue.record_batch([4], used_idx=0, used_wrap_counter=1)
            with pytest.raises(RingError):
                queue.commit_batch([-1])


class TestFromFd:
    def test_offset_inside_a_larger_fd(self) -> None:
        with InflightRegion.allocate(1, 4, packed=False) as original:
            size = original.mmap_size
            fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, 3 * size + 7)
                os.pwrite(fd, os.pread(original.fd, size, 0), size + 7)
                with InflightRegion.from_fd(fd, size, size + 7, 1, 4, packed=False) as region:
                    assert region.fd != fd
                    region.split_queue(0).mark_inflight(2)
                assert os.pread(fd, 1, size + 7 + 16 + 32) == b"\x01"
            finally:
                os.close(fd)

    def test_uninitialised_buffer(self) -> None:
        for packed in (False, True):
            size = 2 * InflightRegion.queue_region_size(8, packed=packed)
            fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                with InflightRegion.from_fd(fd, size, 0, 2, 8, packed=packed) as region:
                    if packed:
                        assert region.packed_queue(1).fresh
                        assert region.packed_queue(1).mark_inflight(chain(8, 1)) == 0
                        assert region.packed_queue(1).version == INFLIGHT_VERSION
                    else:
                        assert region.split_queue(1).fresh
                        assert region.split_queue(1).recover(0) == []
                        assert region.split_queue(1).version == INFLIGHT_VERSION
            finally:
                os.close(fd)

    def test_larger_mmap_size_accepted(self) -> None:
        with InflightRegion.allocate(1, 4, packed=False) as original:
            os.ftruncate(original.fd, original.mmap_size + 100)
            with InflightRegion.from_fd(
                original.fd, original.mmap_size + 100, 0, 1, 4, packed=False
            ) as region:
                assert region.mmap_size == original.mmap_size + 100

    @pytest.mark.parametrize(
        ("num_queues", "queue_size", "delta"),
        [(0, 4, 0), (1, 0, 0), (1, 32769, 0), (0x10000, 4, 0), (1, 4, -1), (2, 4, 0)],
    )
    def test_inconsistent_sizes(self, num_queues: int, queue_size: int, delta: int) -> None:
        with (
            InflightRegion.allocate(1, 4, packed=False) as original,
            pytest.raises(RemoteProtocolError),
        ):
            InflightRegion.from_fd(
                original.fd,
                original.mmap_size + delta,
                0,
                num_queues,
                queue_size,
                packed=False,
            )

    def test_wrong_contents(self) -> None:
        with InflightRegion.allocate(1, 4, packed=False) as original:
            original.split_queue(0).recover(0)  # started: version 1, checked when handed back
            for packed in (False, True):
                with pytest.raises(RemoteProtocolError, match="holds 4 entries, expected 1"):
                    InflightRegion.from_fd(original.fd, original.mmap_size, 0, 1, 1, packed=packed)
            original.buffer[8:10] = struct.pack("=H", 2)
            with pytest.raises(RemoteProtocolError, match="unknown version 2"):
                reopen(original)

    def test_unmappable_fds(self, tmp_path: Path) -> None:
        r, w = os.pipe()
        path = os.path.join(tmp_path, "inflight")
        with open(path, "wb") as f:
            f.write(bytes(4096))
        ro = os.open(path, os.O_RDONLY)
        closed = os.memfd_create("x")
        os.close(closed)
        try:
            for fd in (r, w, ro, closed, -1):
                with pytest.raises(GuestMemoryError):
                    InflightRegion.from_fd(fd, 64, 0, 1, 1, packed=False)
            small = os.memfd_create("small")
            os.ftruncate(small, 63)
            with pytest.raises(GuestMemoryError):
                InflightRegion.from_fd(small, 64, 0, 1, 1, packed=False)
            os.close(small)
        finally:
            for fd in (r, w, ro):
                os.close(fd)

    def test_accessors_and_close(self) -> None:
        region = InflightRegion.allocate(2, 4, packed=False)
        with pytest.raises(RingError, match="split layout"):
            region.packed_queue(0)
        with pytest.raises(RingError, match="outside"):
            region.split_queue(2)
        queue = region.split_queue(0)
        assert region.split_queue(0) is queue
        region.close()
        region.close()
        assert region.fd == -1
        with pytest.raises(GuestMemoryError, match="closed"):
            queue.mark_inflight(0)
        packed = InflightRegion.allocate(1, 4, packed=True)
        with pytest.raises(RingError):
            packed.split_queue(0)
        packed.close()
