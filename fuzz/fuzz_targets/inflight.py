"""The inflight region a front-end hands back with SET_INFLIGHT_FD, and the restart it drives.

Input: a flags byte (packed layout, event index, indirect descriptors,
whether popped chains are completed, whether ``mmap_size`` is the size
the geometry needs or the input's), a byte choosing the queue size, the
number of queues and the queue used, the ring's 16-bit base, the
``mmap_size`` and ``mmap_offset`` fields, the length of the buffer's
contents, those contents (the memfd's bytes), then guest memory laid out
as for the ``chain`` target.

The buffer is adopted with
:meth:`~pyvdpa.device.inflight.InflightRegion.from_fd`, the ring described
with it by :func:`~pyvdpa.device.ring.describe_ring`, and a
:class:`~pyvdpa.device.virtqueue.Virtqueue` recovers from it, then pops
(resubmitted chains first) and completes chains as a device does.

Verdict: every step returns or raises a
:class:`~pyvdpa.errors.PyvdpaError` subclass; nothing hangs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from fuzz_targets.chain import DESC_ADDR, DEVICE_ADDR, DRIVER_ADDR, MAX_SIZE
from fuzz_targets.chain import guest_memory as _the_guest
from fuzz_targets.chain import ring_image as _ring_image
from fuzz_targets.reader import Reader
from pyvdpa.device.inflight import InflightRegion
from pyvdpa.device.ring import RingNotifiers, RingPosition, describe_ring
from pyvdpa.device.virtqueue import Virtqueue
from pyvdpa.errors import PyvdpaError
from pyvdpa.virtio.constants import VirtioFeature

__all__ = ["seeds", "test_one_input"]

_PACKED, _EVENT_IDX, _INDIRECT, _COMPLETE, _EXACT_SIZE = 1, 2, 4, 8, 16


def _features(flags: int) -> int:
    features = VirtioFeature.RING_PACKED if flags & _PACKED else VirtioFeature(0)
    if flags & _EVENT_IDX:
        features |= VirtioFeature.RING_EVENT_IDX
    if flags & _INDIRECT:
        features |= VirtioFeature.RING_INDIRECT_DESC
    return int(features)


def _serve(region: InflightRegion, index: int, flags: int, size: int, base: int) -> None:
    packed = bool(flags & _PACKED)
    tracker = region.packed_queue(index) if packed else region.split_queue(index)
    spec = describe_ring(
        index, size, _features(flags), (DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR),
        RingPosition.decode(base, packed=packed), _the_guest().memory, RingNotifiers(index),
        inflight=tracker,
    )  # fmt: skip
    try:
        queue = Virtqueue(spec)
        for _ in range(2 * size + 1):
            chain = queue.pop()
            if chain is None:
                break
            if flags & _COMPLETE:
                queue.push(chain, 0)
    finally:
        spec.areas.release()


def test_one_input(data: bytes) -> None:
    """Adopt the buffer, restart a ring from it and serve the ring."""
    reader = Reader(data)
    flags, choice, queues, which = reader.u8(), reader.u8(), reader.u8(), reader.u8()
    base, mmap_size, mmap_offset = reader.u16(), reader.u16(), reader.u16()
    contents = reader.take(reader.u16() % 0x2000)
    packed = bool(flags & _PACKED)
    size = choice % MAX_SIZE + 1 if packed else 1 << choice % 6
    num_queues = queues % 3
    if flags & _EXACT_SIZE:
        mmap_size = max(num_queues, 1) * InflightRegion.queue_region_size(size, packed=packed)
    guest = _the_guest()
    guest.load(reader.rest())
    fd = os.memfd_create("fuzz-inflight", os.MFD_CLOEXEC)
    try:
        os.write(fd, contents)
        try:
            with InflightRegion.from_fd(
                fd, mmap_size, mmap_offset, num_queues, size, packed=packed
            ) as region:
                _serve(region, which % 3, flags, size, base)
        except PyvdpaError:
            pass
    finally:
        os.close(fd)


def seeds() -> Iterator[bytes]:
    """Buffers a device left with chains in flight, with the rings they came from."""
    for packed in (False, True):
        for size, popped, completed in ((4, 2, 1), (8, 3, 0)):
            flags = (_PACKED if packed else 0) | _INDIRECT | _EXACT_SIZE | _COMPLETE
            image = _ring_image(packed, size, indirect=True, event_idx=False)
            guest = _the_guest()
            guest.load(image)
            with InflightRegion.allocate(1, size, packed=packed) as region:
                tracker = region.packed_queue(0) if packed else region.split_queue(0)
                start = RingPosition(0, True, 0, True) if packed else RingPosition(0)
                spec = describe_ring(
                    0, size, _features(flags), (DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR),
                    start, guest.memory, RingNotifiers(0), inflight=tracker,
                )  # fmt: skip
                queue = Virtqueue(spec)
                chains = [queue.pop() for _ in range(popped)]
                for chain in chains[:completed]:
                    assert chain is not None
                    queue.push(chain, 0)
                base = queue.position().encode(packed=packed) & 0xFFFF
                contents = bytes(region.buffer)
                spec.areas.release()
            memory = guest.snapshot()[: len(image)].rstrip(b"\0")
            choice = size - 1 if packed else size.bit_length() - 1
            head = bytes([flags, choice, 1, 0]) + base.to_bytes(2, "little")
            head += bytes(4) + len(contents).to_bytes(2, "little")
            yield head + contents + memory
