"""Regression: ring fields published while another process polls them.

``struct.pack_into`` zero-fills its target before packing, so a device in
another process polling ``avail.idx`` could read 0 and declare the ring
broken (an avail index "jump").  Driver and device run here in two
processes sharing one memfd, as a VMM and a back-end do.
"""

from __future__ import annotations

import multiprocessing
import time

import pytest

from pyvdpa.memory import GuestMemory, MemoryRegion, allocate_shared
from pyvdpa.vhost_user.protocol import MAX_MEM_REGIONS
from pyvdpa.virtio.packed import PackedDeviceQueue, PackedDriverQueue
from pyvdpa.virtio.split import SplitDeviceQueue, SplitDriverQueue, SplitLayout

SIZE = 64
CHAINS = 20000
GPA = 0x10000
MEM = 1 << 20


def _layout(packed: bool) -> tuple[int, int, int, int]:
    desc = GPA
    if packed:
        return desc, desc + 16 * SIZE, desc + 16 * SIZE + 64, desc + 8192
    lay = SplitLayout(SIZE)
    avail = desc + lay.desc_size
    used = (avail + lay.avail_size + 3) & ~3
    return desc, avail, used, desc + 8192


def _device(fd: int, packed: bool, result: multiprocessing.SimpleQueue[str]) -> None:
    mem = GuestMemory(MAX_MEM_REGIONS)
    mem.add_region(MemoryRegion(GPA, MEM, 0, 0), fd)
    desc, avail, used, _ = _layout(packed)
    cls = PackedDeviceQueue if packed else SplitDeviceQueue
    queue = cls(mem, SIZE, desc, avail, used, event_idx=False, indirect=False)
    done = 0
    deadline = time.monotonic() + 30
    try:
        while done < CHAINS and time.monotonic() < deadline:
            chain = queue.pop()
            if chain is None:
                continue
            data = chain.read_all()
            written = chain.write(data[::-1])
            queue.push(chain, written)
            done += 1
        result.put("ok" if done == CHAINS else f"only {done} chains")
    except Exception as exc:  # reported to the parent, which fails the test
        result.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_regression_ring_fields_published_atomically(packed: bool) -> None:
    shared = allocate_shared(MEM, "crossprocess")
    ctx = multiprocessing.get_context("fork")
    result: multiprocessing.SimpleQueue[str] = ctx.SimpleQueue()
    child = ctx.Process(target=_device, args=(shared.fd, packed, result))
    child.start()
    mem = GuestMemory(MAX_MEM_REGIONS)
    mem.add_region(MemoryRegion(GPA, MEM, 0, 0), shared.fd)
    desc, avail, used, buffers = _layout(packed)
    cls = PackedDriverQueue if packed else SplitDriverQueue
    queue = cls(mem, SIZE, desc, avail, used, event_idx=False)
    sent = received = 0
    try:
        while received < CHAINS and child.is_alive():
            while sent < CHAINS and queue.num_free >= 2:
                slot = buffers + (sent % SIZE) * 64
                mem.write(slot, sent.to_bytes(8, "little"))
                queue.add([(slot, 8)], [(slot + 32, 8)])
                sent += 1
            while (done := queue.get_used()) is not None:
                assert done[1] == 8
                received += 1
        child.join(timeout=30)
        assert result.get() == "ok"
        assert received == CHAINS
    finally:
        if child.is_alive():
            child.kill()
        mem.close()
        shared.close()
