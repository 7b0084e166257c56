"""The compiled driver: ring loops running without the GIL, one thread per queue pair.

Theory of operation
-------------------
A :class:`~pyvdpa.drive.session.DriverSession` sets up the rings (memory,
negotiation, ring addresses, eventfds) as for the Python driver; this
module then hands the ring each queue pair drives (its transmit ring in
txonly, its receive ring in rxonly) to
:func:`pyvdpa.dataplane.kernels.driver.run_queue`, which runs on a thread
of its own with the GIL released until the run's deadline.  The ring's state
lives in a driver queue row (:data:`~pyvdpa.dataplane.kernels.driver_row.DRIVER`)
that this module fills from the session's ring and reads back: the frames
and bytes sent or received, received frames corrupted or foreign, the
kicks, and the rule of the ring the device broke, if it broke one.

Each descriptor owns one buffer slot.  A transmit slot holds the virtio-net
header and the frame, written here once before the run; a receive slot is
:data:`RX_BUFFER` bytes the device writes.  The kernel writes descriptors,
available entries and ring indexes, and reads what the device wrote.  The main thread waits
for the kernels, prints progress, and on an interrupt asks them to stop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pyvdpa.dataplane.kernels import driver_row as d
from pyvdpa.dataplane.kernels.driver import run_pair, run_queue
from pyvdpa.drive.session import DriverRing, DriverSession
from pyvdpa.errors import ConfigError
from pyvdpa.virtio.constants import VirtioFeature
from pyvdpa.virtio.packed import PackedLayout
from pyvdpa.virtio.split import SplitLayout

__all__ = [
    "BUFFER_ALIGN",
    "DRAIN_SECONDS",
    "RX_BUFFER",
    "CompiledQueue",
    "Figures",
    "load",
    "run_queues",
]

log = logging.getLogger(__name__)

BUFFER_ALIGN = 64
"""Each buffer slot starts on a cache line."""

DRAIN_SECONDS = 1.0
"""Seconds the device gets, once sending stops, to take the frames posted."""

RX_BUFFER = 2048 + 12
"""Bytes of a receive buffer: a virtio-net header and the largest frame, with room to spare."""


def _crc_table() -> npt.NDArray[np.uint32]:
    """The CRC-32 table of zlib's polynomial (reflected), one entry per byte value."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


_CRC_TABLE = _crc_table()

_RULES = {
    d.DE_USED_ID: "used entry names chain {a} (at used position {b}), which is not in flight",
    d.DE_USED_LEN: "used length {a} for a chain of {b} bytes",
    d.DE_USED_JUMP: "used index moved {a} entries with {b} chains in flight",
}
_SIGNATURE = "int64(int64[::1])"
_PAIR_SIGNATURE = "int64(int64[::1], int64[::1])"


def load() -> None:
    """Compile (or load from the cache) the transmit kernel, so that no run waits for it."""
    run_queue.compile(_SIGNATURE)
    run_pair.compile(_PAIR_SIGNATURE)


class CompiledQueue:
    """One ring driven by the compiled kernel: a transmit ring, or a receive ring.

    On a transmit ring ``hdr`` bytes of zeroed virtio-net header precede
    ``frame`` in every buffer slot; ``frame`` None makes a receive ring of
    :data:`RX_BUFFER`-byte buffers.  ``burst`` chains are added at most per
    pass.  ``room`` makes each buffer slot at least that large (a transmit
    ring that forwards received frames needs :data:`RX_BUFFER`).
    """

    def __init__(
        self,
        session: DriverSession,
        ring: DriverRing,
        hdr: int,
        frame: bytes | None,
        burst: int,
        *,
        room: int = 0,
    ) -> None:
        if ring.kick_fd is None:
            raise ConfigError("the compiled driver kicks through eventfds (no --inband)")
        queue = ring.queue
        size = queue.size
        packed = session.packed
        self.ring = ring
        chain = RX_BUFFER if frame is None else hdr + len(frame)
        slot = -(-max(chain, room) // BUFFER_ALIGN) * BUFFER_ALIGN
        base = session.alloc(slot * size, BUFFER_ALIGN)
        template = 0
        if frame is not None:
            payload = bytes(hdr) + frame
            for i in range(size):
                session.memory.write(base + i * slot, payload)
            # What replaces a corrupted frame when received frames are sent on.
            spare = session.alloc(chain, BUFFER_ALIGN)
            session.memory.write(spare, payload)
            template = session.host_address(spare, chain)
        # The free stack (descriptor 0 on top) and each descriptor's chain length in flight.
        self.tables: npt.NDArray[np.int64] = np.zeros((2, size), dtype=np.int64)
        self.tables[0] = np.arange(size - 1, -1, -1)
        desc, driver, device = ring.areas
        if packed:
            layout = PackedLayout(size)
            sizes = (layout.desc_size, layout.EVENT_SIZE, layout.EVENT_SIZE)
        else:
            split = SplitLayout(size)
            sizes = (split.desc_size, split.avail_size, split.used_size)
        row = np.zeros(d.DCOLS, dtype=np.int64)
        row[d.D_SIZE] = size
        row[d.D_PACKED] = packed
        row[d.D_EVENT_IDX] = bool(session.features & VirtioFeature.RING_EVENT_IDX)
        row[d.D_DESC] = session.host_address(desc, sizes[0])
        row[d.D_DRIVER] = session.host_address(driver, sizes[1])
        row[d.D_DEVICE] = session.host_address(device, sizes[2])
        row[d.D_KICK_FD] = ring.kick_fd
        row[d.D_RECEIVE] = frame is None
        row[d.D_BUFFERS] = session.host_address(base, slot * size)
        row[d.D_HDR] = hdr
        row[d.D_CRC_TABLE] = _CRC_TABLE.ctypes.data
        row[d.D_TEMPLATE] = template
        row[d.D_BUFFERS_DEV] = base
        row[d.D_SLOT] = slot
        row[d.D_CHAIN_LEN] = chain
        row[d.D_FRAME_LEN] = 0 if frame is None else len(frame)
        row[d.D_BURST] = burst
        row[d.D_FREE] = self.tables[0].ctypes.data
        row[d.D_BUSY] = self.tables[1].ctypes.data
        row[d.D_FREE_TOP] = size
        row[d.D_AVAIL_WRAP] = row[d.D_USED_WRAP] = 1
        # What a receive ring holds at the end are buffers, not frames to wait for.
        row[d.D_DRAIN_NS] = 0 if frame is None else int(DRAIN_SECONDS * 1e9)
        self.row = row
        #: The transmit ring this receive ring forwards to.
        self.peer: CompiledQueue | None = None
        # A polling driver wants no calls.
        queue.disable_interrupts()

    def forward_to(self, tx: CompiledQueue) -> None:
        """Send every frame this receive ring takes on through ``tx`` (io mode)."""
        if not self.receive or tx.receive:
            raise ValueError("frames are forwarded from a receive ring to a transmit ring")
        self.row[d.D_PEER] = tx.row.ctypes.data
        self.peer = tx

    @property
    def receive(self) -> bool:
        """Whether this is a receive ring."""
        return bool(self.row[d.D_RECEIVE])

    @property
    def packets(self) -> int:
        """Frames sent (or received) so far."""
        return int(self.row[d.D_PACKETS])

    def error(self) -> str | None:
        """The rule of the ring the device broke, as a sentence; None if it broke none."""
        code = int(self.row[d.D_ERROR])
        if code == 0:
            return None
        return _RULES[code].format(a=int(self.row[d.D_ERROR_A]), b=int(self.row[d.D_ERROR_B]))


class Figures:
    """What the kernels did: frames and bytes each way, checks, seconds of running, rings broken."""

    def __init__(self, paths: Sequence[CompiledQueue]) -> None:
        rows = [path.row for path in paths]
        tx = [path.row for path in paths if not path.receive]
        rx = [path.row for path in paths if path.receive]
        self.tx_packets = sum(int(row[d.D_PACKETS]) for row in tx)
        self.tx_bytes = sum(int(row[d.D_BYTES]) for row in tx)
        self.rx_packets = sum(int(row[d.D_PACKETS]) for row in rx)
        self.rx_bytes = sum(int(row[d.D_BYTES]) for row in rx)
        self.rx_bad = sum(int(row[d.D_BAD]) for row in rx)
        self.rx_foreign = sum(int(row[d.D_FOREIGN]) for row in rx)
        #: Receive buffers returned with a used length below the virtio-net header.
        self.rx_short = sum(int(row[d.D_SHORT]) for row in rx)
        self.kicks = sum(int(row[d.D_KICKS]) for row in rows)
        start = min(int(row[d.D_START_NS]) for row in rows)
        end = max(int(row[d.D_END_NS]) for row in rows)
        self.elapsed = max(end - start, 0) / 1e9
        #: Frames the device still held when the run ended.
        self.held = sum(int(row[d.D_INFLIGHT]) for row in tx)
        self.errors = [
            f"vring {path.ring.index}: {message}"
            for path in paths
            if (message := path.error()) is not None
        ]
        #: What the receive rings got wrong without breaking the ring, one line each.
        self.complaints = [
            f"vring {path.ring.index}: {int(path.row[d.D_SHORT])} receive buffers returned "
            f"short, the last with used length {int(path.row[d.D_SHORT_LEN])} for a "
            f"{RX_BUFFER}-byte receive buffer (header {int(path.row[d.D_HDR])})"
            for path in paths
            if path.receive and path.row[d.D_SHORT]
        ]


def _serve(path: CompiledQueue, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if path.peer is not None:
        run_pair(path.row, path.peer.row)
    else:
        run_queue(path.row)


def run_queues(
    paths: Sequence[CompiledQueue],
    *,
    duration: float,
    packets: int | None = None,
    cpus: Sequence[int] = (),
    progress: bool = False,
) -> Figures:
    """Drive ``paths`` for ``duration`` seconds (or until ``packets`` frames are sent); the figures.

    Path ``i`` runs on a thread of its own, pinned to ``cpus[i % len(cpus)]``
    when ``cpus`` is given; a receive ring that forwards runs with its
    transmit ring, which must not be in ``paths`` itself.  Returns within ``duration`` plus
    :data:`DRAIN_SECONDS` whatever the device does.
    """
    load()
    senders = sum(not path.receive for path in paths)
    queues = [*paths, *(path.peer for path in paths if path.peer is not None)]
    share = None if packets is None or senders == 0 else -(-packets // senders)
    deadline = time.monotonic_ns() + int(duration * 1e9)
    threads = []
    for path in queues:
        path.row[d.D_DEADLINE] = deadline
        path.row[d.D_LIMIT] = 0 if path.receive else share or 0
    for i, path in enumerate(paths):
        cpu = cpus[i % len(cpus)] if cpus else None
        thread = threading.Thread(
            target=_serve, args=(path, cpu), name=f"pyvdpa-drive-q{path.ring.index}"
        )
        threads.append(thread)
    start = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        next_report = start + 1.0
        for thread in threads:
            while thread.is_alive():
                thread.join(min(max(next_report - time.monotonic(), 0.01), 1.0))
                now = time.monotonic()
                if now >= next_report:
                    next_report += 1.0
                    if progress:
                        sent = sum(path.packets for path in queues if not path.receive)
                        got = sum(path.packets for path in queues if path.receive)
                        print(f"  {now - start:5.1f}s  tx {sent}  rx {got}", flush=True)
    finally:
        # An interrupt (or any error here) must not leave a kernel running on our memory.
        for path in queues:
            path.row[d.D_STOP] = 1
        for thread in threads:
            if thread.ident is not None:
                thread.join()
    figures = Figures(queues)
    for message in figures.errors + figures.complaints:
        log.error("%s", message)
    if figures.held and not figures.errors:
        log.warning(
            "%d frames still held by the device %.1f s after the run", figures.held, DRAIN_SECONDS
        )
    return figures
