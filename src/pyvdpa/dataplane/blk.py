"""A simulated virtio-blk device whose data path runs on the compiled engine.

Theory of operation (virtio 1.2, section 5.2; Linux ``vdpa_sim_blk``): the
device offers what :class:`~pyvdpa.devices.blk.BlkDevice` offers (the same
backing store, feature bits, config space and per-queue counters, through
the shared :class:`~pyvdpa.devices.blk.BlkControl`), but its queues never
run Python.  Each virtqueue becomes one :class:`~pyvdpa.dataplane.engine.Port`
running the kernels' ``blk`` program, its queue in the ``TX`` role (requests
flow from the driver):

* :meth:`EngineBlkDevice.start_queue` builds the queue's compiled state from
  the ring description and attaches it to the queue's port;
* :meth:`EngineBlkDevice.stop_queue` detaches it and returns the ring's
  exact position: when it returns the worker no longer touches the ring.

A RAM disk is read and written by the worker itself, synchronously,
straight between the memfd and the guest's buffers (``preadv``/``pwritev``),
as DPDK's vhost blk examples do.  A disk on a file hands its I/O to a
bounded pool of threads (:class:`IoPool`, ``io_threads`` per device) that
run the same compiled request code without the GIL, on every ring whose
front-end shares an inflight region: requests complete out of order, and
a slow one holds neither its queue's other requests nor the other ports
of the worker.  Without the region (VDUSE, front-ends that do not ask for
it) the worker does the I/O itself, in order, because a restarted
back-end then resumes at the used index, which is right only for
requests completed in order.  Stopping a queue waits until the pool has
finished its requests, so a stop, a disconnect or a memory-table change
loses nothing (see ``docs/ARCHITECTURE.md`` for why threads rather than
io_uring).

Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, vhost-user
spec "Inflight I/O tracking") is offered, split and packed: with the
region the front-end hands over, the kernel records every chain it takes
and every batch it completes
(:mod:`pyvdpa.dataplane.kernels.inflight`), so that a process killed at
any point leaves its successor the exact list of requests to serve again.
:meth:`EngineBlkDevice.start_queue` repairs the region and serves that
list first, in Python, with the reference request rules
(:meth:`~pyvdpa.devices.blk.BlkControl.serve`) and the Python queue's
inflight bookkeeping (:class:`~pyvdpa.device.Virtqueue`), then hands the
ring to the kernel.  A split ring then resumes its available index at the
used ring's index plus the requests in flight, as libvhost-user does:
after a crash QEMU rewinds the index it sends to the used index.

``PYVDPA_TEST_NO_INFLIGHT=1`` in the environment is a **test-only**
switch, read once at import: the device still offers the feature but
records nothing and serves nothing again, so that the suite can show what
a restart loses without it.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.engine import TX, Engine, EngineIommu, EngineMode, Port
from pyvdpa.dataplane.net import ENGINE_EXCLUDED_PROTOCOL_FEATURES, QueueCounters, shared_engine
from pyvdpa.dataplane.queues import CompiledQueue
from pyvdpa.device import Device, QueueNotRunningError, RingPosition, RingSpec, Virtqueue
from pyvdpa.device.inflight import PackedInflightQueue, SplitInflightQueue
from pyvdpa.device.ring import RingSetupError
from pyvdpa.devices.blk import (
    BLK_PROTOCOL_FEATURES,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    SEG_MAX,
    BlkControl,
)
from pyvdpa.devices.stats import QueueStats
from pyvdpa.errors import ConfigError, GuestMemoryError, IotlbMissError, RemoteProtocolError
from pyvdpa.virtio.blk import BLK_ID_BYTES

__all__ = [
    "ENGINE_BLK_PROTOCOL_FEATURES",
    "IO_THREADS",
    "TEST_BLK_DELAY",
    "TEST_NO_INFLIGHT",
    "ZERO_CHUNK",
    "EngineBlkDevice",
    "IoPool",
]

log = logging.getLogger(__name__)

#: Protocol features of the engine device: the Python device's, without
#: in-band notifications (see ``ENGINE_EXCLUDED_PROTOCOL_FEATURES``).
ENGINE_BLK_PROTOCOL_FEATURES = BLK_PROTOCOL_FEATURES & ~ENGINE_EXCLUDED_PROTOCOL_FEATURES

TEST_NO_INFLIGHT = os.environ.get("PYVDPA_TEST_NO_INFLIGHT") == "1"
"""Test-only: offer inflight tracking but record nothing (see the module's theory)."""


def _test_delay(value: str | None) -> tuple[int, int] | None:
    """``MS,EVERY`` from ``PYVDPA_TEST_BLK_DELAY``: sleep MS before every EVERY-th request."""
    if not value:
        return None
    try:
        ms, every = (int(part) for part in value.split(","))
    except ValueError:
        log.warning("PYVDPA_TEST_BLK_DELAY=%r is not MS,EVERY; ignored", value)
        return None
    return (ms, every) if ms > 0 and every > 0 else None


TEST_BLK_DELAY = _test_delay(os.environ.get("PYVDPA_TEST_BLK_DELAY"))
"""Test-only: the I/O pool sleeps ``ms`` before every ``every``-th file request of a queue.

Read once at import from ``PYVDPA_TEST_BLK_DELAY=MS,EVERY``; the tests use
it to make one request slow and to complete requests out of order.
"""

IO_THREADS = 4
"""Threads in a file-backed device's I/O pool."""
IO_SLOTS = 1024
"""Requests one queue hands the pool at most at a time (at most the queue size)."""
SLOT_SEGMENTS = SEG_MAX + 2
"""Segments a request slot holds: the data segments the config space allows, header and status."""
DRAIN_TIMEOUT = 30.0
"""Seconds a stopping queue waits for the pool to finish its requests."""


class IoPool:
    """A bounded pool of threads running the compiled :func:`blk_io_loop` without the GIL.

    Request slots arrive as 8-byte addresses on one pipe, which every
    thread reads (each read takes one whole message); a thread executes the
    request and writes the address to the slot's completion pipe.
    :meth:`close` sends each thread a 0 and joins them.
    """

    def __init__(self, threads: int = IO_THREADS) -> None:
        if threads < 1:
            raise ConfigError(f"an I/O pool needs at least one thread, not {threads}")
        # Compiled (or loaded from the cache) here, not on a pool thread: a bad fd returns at once.
        k.blk_io_loop(-1, 0, -1)
        self._read, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self._threads = [
            threading.Thread(target=self._run, name=f"pyvdpa-blk-io{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        scratch = np.zeros(3 + 2 * k.IOV_MAX + 2, dtype=np.int64)
        base = scratch.ctypes.data
        scratch[0], scratch[1] = base + 16, 8
        with select.epoll() as sleeper:
            if k.blk_io_loop(self._read, base, sleeper.fileno()) != 0:
                log.error("blk I/O pool: the request pipe failed")

    def close(self) -> None:
        """Stop and join the threads, then close the pipe."""
        for _ in self._threads:
            os.write(self.write_fd, bytes(8))
        for thread in self._threads:
            thread.join(DRAIN_TIMEOUT)
        os.close(self._read)
        os.close(self.write_fd)


class _QueueIo:
    """One queue's side of the pool: request slots, free stack, completion pipe."""

    def __init__(
        self,
        unit: npt.NDArray[np.int64],
        queue: CompiledQueue,
        pool: IoPool,
        test_delay: tuple[int, int] | None,
    ) -> None:
        slots = min(queue.size, IO_SLOTS)
        names = k.REQUEST.names
        self.requests = np.zeros((slots, k.REQUEST.width), dtype=np.int64)
        self.segments = np.zeros((slots * SLOT_SEGMENTS, 4), dtype=np.int64)
        self.free = np.arange(slots, dtype=np.int64)
        self.reaped = np.zeros(slots, dtype=np.int64)
        self.reap_iov = np.array([self.reaped.ctypes.data, 8 * slots], dtype=np.int64)
        self.completions, self.done_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.completions, False)
        base = self.requests.ctypes.data
        row_bytes = 8 * k.REQUEST.width
        for i in range(slots):
            row = self.requests[i]
            addr = base + row_bytes * i
            row[names.index("addr")] = row[names.index("iov_base")] = addr
            row[names.index("iov_len")] = 8
            row[names.index("unit")] = unit.ctypes.data
            row[names.index("queue")] = queue.row.ctypes.data
            row[names.index("done_fd")] = self.done_fd
            row[names.index("segs")] = self.segments.ctypes.data + 32 * SLOT_SEGMENTS * i
        unit[k.U_IO_FD] = pool.write_fd
        unit[k.U_REQUESTS] = base
        unit[k.U_FREE] = self.free.ctypes.data
        unit[k.U_FREE_TOP] = slots
        unit[k.U_SLOT_SEGS] = SLOT_SEGMENTS
        unit[k.U_REAP_IOV] = self.reap_iov.ctypes.data
        if test_delay is not None:
            unit[k.U_TEST_DELAY_MS], unit[k.U_TEST_DELAY_EVERY] = test_delay

    def close(self) -> None:
        """Close the completion pipe (the port is gone and nothing is pending)."""
        os.close(self.completions)
        os.close(self.done_fd)


ZERO_CHUNK = 1 << 16
"""Bytes of zeros the worker writes at a time where a file system cannot zero a range."""


class EngineBlkDevice(EngineIommu, BlkControl, Device):
    """A virtio-blk disk on a file or in memory whose queues run on an :class:`Engine`.

    Records in-flight requests in the ring's inflight region when the
    front-end shares one, and serves what a previous back-end left undone.

    ``engine`` defaults to the process-wide engine of ``engine_mode`` on
    ``cpus``.  A disk on a file does its I/O on a pool of ``io_threads``
    threads.  The other arguments are those of
    :class:`~pyvdpa.devices.blk.BlkControl`.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        size: int | None = None,
        readonly: bool = False,
        serial: str = "pyvdpa",
        queues: int = 1,
        engine_mode: EngineMode | str = EngineMode.ADAPTIVE,
        cpus: Sequence[int] | None = None,
        engine: Engine | None = None,
        io_threads: int = IO_THREADS,
    ) -> None:
        super().__init__(path=path, size=size, readonly=readonly, serial=serial, queues=queues)
        self.protocol_features = ENGINE_BLK_PROTOCOL_FEATURES
        try:
            self.engine = engine if engine is not None else shared_engine(engine_mode, cpus)
            # A RAM disk is served by the worker itself: a copy costs less than a hand-over.
            self._pool = IoPool(io_threads) if path is not None else None
        except BaseException:
            super().close()
            raise
        self._serial = np.frombuffer(self.serial.ljust(BLK_ID_BYTES, b"\0"), np.uint8).copy()
        self._zeros = np.zeros(ZERO_CHUNK, dtype=np.uint8)
        self._counters = np.zeros((queues, k.NSTATS), dtype=np.int64)
        self._ports: list[Port | None] = [None] * queues
        self._io: list[_QueueIo | None] = [None] * queues
        self._test_delay = TEST_BLK_DELAY
        if TEST_NO_INFLIGHT:
            log.warning("PYVDPA_TEST_NO_INFLIGHT=1 (test only): in-flight requests go unrecorded")
        if self._test_delay is not None and self._pool is not None:
            log.warning(
                "PYVDPA_TEST_BLK_DELAY=%d,%d (test only): the I/O pool delays requests",
                *self._test_delay,
            )
        self._lock = threading.Lock()

    inflight_tracking = True

    @property
    def stats(self) -> list[QueueCounters]:
        """Per-queue counters, live."""
        return [QueueCounters(self._counters[i]) for i in range(self.num_queues)]

    # ------------------------------------------------------------------ queues

    def _port(
        self,
        index: int,
        queue: CompiledQueue,
        record: SplitInflightQueue | PackedInflightQueue | None,
        *,
        pooled: bool,
    ) -> Port:
        """A new port for ring ``index`` (replacing any), its unit row filled in."""
        self._remove(index)
        size = queue.size
        unit = np.zeros(k.UCOLS, dtype=np.int64)
        unit[k.U_PROGRAM] = k.P_BLK
        unit[k.U_BLK_FD] = self.fd
        unit[k.U_CAPACITY] = self.capacity
        unit[k.U_READONLY] = self.readonly
        unit[k.U_SERIAL] = self._serial.ctypes.data
        unit[k.U_ZEROS] = self._zeros.ctypes.data
        unit[k.U_ZEROS_LEN] = len(self._zeros)
        unit[k.U_MAX_SEG] = MAX_DISCARD_SEG
        unit[k.U_MAX_SECTORS] = MAX_DISCARD_SECTORS
        done = np.zeros((size, k.DONE.width), dtype=np.int64)
        unit[k.U_DONE] = done.ctypes.data
        unit[k.U_DONE_LEN] = size
        keep: list[object] = [self._serial, self._zeros, done]
        if record is not None:
            # The array's export keeps the region mapped while the kernel may write it.
            region = np.frombuffer(record.view, dtype=np.uint8)
            unit[k.U_INFLIGHT] = region.ctypes.data
            unit[k.U_INFLIGHT_COUNTER] = record.next_counter
            keep.append(region)
        io = None
        if self._pool is not None and pooled:
            io = _QueueIo(unit, queue, self._pool, self._test_delay)
            keep.append(io)
        else:
            unit[k.U_IO_FD] = -1
        port = self.engine.add_port(unit, keep=keep, fd=None if io is None else io.completions)
        self._ports[index] = port
        self._io[index] = io
        return port

    def _remove(self, index: int) -> CompiledQueue | None:
        """Stop ring ``index``'s port once the pool has finished its requests; return its queue."""
        port = self._ports[index]
        if port is None:
            return None
        io = self._io[index]
        drained = True
        if io is not None:
            port.set(k.U_DRAIN, 1)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while port.unit[k.U_IO_PENDING] > 0:
                if time.monotonic() > deadline:
                    log.error("sim-blk: ring %d: the I/O pool did not finish in time", index)
                    drained = False
                    break
                time.sleep(0.0005)
        queue = port.detach(TX)
        self.engine.remove_port(port)
        self._ports[index] = None
        self._io[index] = None
        if io is not None and drained:
            io.close()
        return queue

    def start_queue(self, spec: RingSpec) -> None:
        """Serve what a previous back-end left in flight, then hand the ring to the engine."""
        record = None if TEST_NO_INFLIGHT else spec.inflight
        if record is not None:
            spec = self._resubmit(spec, record)
        queue = CompiledQueue.from_spec(spec, stats=self._counters[spec.index])
        with self._lock:
            # Out of order only where a restart can recover it: with an inflight region.
            pooled = spec.inflight is not None
            port = self._port(spec.index, queue, record, pooled=pooled)
            port.attach(TX, queue, spec.notifiers, armed=True)

    def _resubmit(
        self, spec: RingSpec, record: SplitInflightQueue | PackedInflightQueue
    ) -> RingSpec:
        """Repair the ring's inflight record and serve the requests it lists.

        Returns the ring's description with the position the kernel
        resumes from.  A split ring's available index is the used ring's
        index plus the requests in flight, except on a fresh region (no
        earlier back-end recorded anything: a first start, or the
        destination of a migration), where SET_VRING_BASE's position holds.
        """
        try:
            if isinstance(record, SplitInflightQueue) and not spec.packed and not record.fresh:
                used = int.from_bytes(spec.areas.device.view[2:4], "little")
                pending = len(record.recover(used))
                spec = spec.resumed_at(RingPosition.split((used + pending) & 0xFFFF))
            vring = Virtqueue(spec)
            counted = QueueStats()
            served = 0
            while vring.resubmit:
                chain = vring.pop()
                if chain is None:
                    break
                counted.received_desc += 1
                vring.push(chain, self.serve(chain, counted))
                counted.completed_desc += 1
                served += 1
            counters = self._counters[spec.index]
            for column, name in enumerate(k.KERNEL_STAT_NAMES):
                counters[column] += getattr(counted, name, 0)
            if served:
                vring.notify()
        except (RemoteProtocolError, GuestMemoryError, IotlbMissError) as exc:
            raise RingSetupError(f"ring {spec.index}: in-flight requests: {exc}") from exc
        return spec

    def iotlb_invalidate(self, iova: int, size: int, invalidate: Callable[[], None]) -> bool:
        """Withdraw translations in place, unless the I/O pool serves a ring.

        The pool's threads hold host addresses of requests in flight: then
        the rings restart instead, and stopping a ring waits for the pool.
        """
        with self._lock:
            pooled = any(io is not None for io in self._io)
        if pooled:
            return False
        return super().iotlb_invalidate(iova, size, invalidate)

    def stop_queue(self, index: int) -> RingPosition:
        """Take the ring back from the engine and say where it stands."""
        with self._lock:
            queue = self._remove(index)
        if queue is None:
            raise QueueNotRunningError(f"ring {index} is not running")
        return queue.position

    def close(self) -> None:
        """Take every remaining ring back from the engine, then close the backing store."""
        with self._lock:
            for index in range(self.num_queues):
                self._remove(index)
            if self._pool is not None:
                self._pool.close()
                self._pool = None
        super().close()
