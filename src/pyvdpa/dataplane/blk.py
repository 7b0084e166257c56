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

The worker reads and writes the backing file synchronously, straight
between the file and the guest's buffers (``preadv``/``pwritev``), as
DPDK's vhost blk examples do: a burst's requests are executed as they are
popped and returned together.  A slow disk therefore delays the other ports
of the same worker; give the engine more workers when that matters.

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
import threading
from collections.abc import Sequence

import numpy as np

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
    BlkControl,
)
from pyvdpa.devices.stats import QueueStats
from pyvdpa.errors import GuestMemoryError, IotlbMissError, RemoteProtocolError
from pyvdpa.virtio.blk import BLK_ID_BYTES

__all__ = ["ENGINE_BLK_PROTOCOL_FEATURES", "TEST_NO_INFLIGHT", "ZERO_CHUNK", "EngineBlkDevice"]

log = logging.getLogger(__name__)

#: Protocol features of the engine device: the Python device's, without
#: in-band notifications (see ``ENGINE_EXCLUDED_PROTOCOL_FEATURES``).
ENGINE_BLK_PROTOCOL_FEATURES = BLK_PROTOCOL_FEATURES & ~ENGINE_EXCLUDED_PROTOCOL_FEATURES

TEST_NO_INFLIGHT = os.environ.get("PYVDPA_TEST_NO_INFLIGHT") == "1"
"""Test-only: offer inflight tracking but record nothing (see the module's theory)."""

ZERO_CHUNK = 1 << 16
"""Bytes of zeros the worker writes at a time where a file system cannot zero a range."""


class EngineBlkDevice(EngineIommu, BlkControl, Device):
    """A virtio-blk disk on a file or in memory whose queues run on an :class:`Engine`.

    Records in-flight requests in the ring's inflight region when the
    front-end shares one, and serves what a previous back-end left undone.

    ``engine`` defaults to the process-wide engine of ``engine_mode`` on
    ``cpus``.  The other arguments are those of
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
    ) -> None:
        super().__init__(path=path, size=size, readonly=readonly, serial=serial, queues=queues)
        self.protocol_features = ENGINE_BLK_PROTOCOL_FEATURES
        try:
            self.engine = engine if engine is not None else shared_engine(engine_mode, cpus)
        except BaseException:
            super().close()
            raise
        self._serial = np.frombuffer(self.serial.ljust(BLK_ID_BYTES, b"\0"), np.uint8).copy()
        self._zeros = np.zeros(ZERO_CHUNK, dtype=np.uint8)
        self._counters = np.zeros((queues, k.NSTATS), dtype=np.int64)
        self._ports: list[Port | None] = [None] * queues
        self._lock = threading.Lock()

    inflight_tracking = True

    @property
    def stats(self) -> list[QueueCounters]:
        """Per-queue counters, live."""
        return [QueueCounters(self._counters[i]) for i in range(self.num_queues)]

    # ------------------------------------------------------------------ queues

    def _port(
        self, index: int, size: int, record: SplitInflightQueue | PackedInflightQueue | None
    ) -> Port:
        """A new port for ring ``index`` (replacing any), its unit row filled in."""
        old = self._ports[index]
        if old is not None:
            self.engine.remove_port(old)
            self._ports[index] = None
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
        port = self.engine.add_port(unit, keep=keep)
        self._ports[index] = port
        return port

    def start_queue(self, spec: RingSpec) -> None:
        """Serve what a previous back-end left in flight, then hand the ring to the engine."""
        record = None if TEST_NO_INFLIGHT else spec.inflight
        if record is not None:
            spec = self._resubmit(spec, record)
        queue = CompiledQueue.from_spec(spec, stats=self._counters[spec.index])
        with self._lock:
            self._port(spec.index, spec.size, record).attach(TX, queue, spec.notifiers, armed=True)

    def _resubmit(
        self, spec: RingSpec, record: SplitInflightQueue | PackedInflightQueue
    ) -> RingSpec:
        """Repair the ring's inflight record and serve the requests it lists.

        Returns the ring's description with the position the kernel
        resumes from.  A split ring's available index is the used ring's
        index plus the requests in flight.
        """
        try:
            if isinstance(record, SplitInflightQueue) and not spec.packed:
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

    def stop_queue(self, index: int) -> RingPosition:
        """Take the ring back from the engine and say where it stands."""
        with self._lock:
            port = self._ports[index]
            queue = None if port is None else port.detach(TX)
            if port is None or queue is None:
                raise QueueNotRunningError(f"ring {index} is not running")
            self.engine.remove_port(port)
            self._ports[index] = None
        return queue.position

    def close(self) -> None:
        """Take every remaining ring back from the engine, then close the backing store."""
        with self._lock:
            for index, port in enumerate(self._ports):
                if port is not None:
                    self.engine.remove_port(port)
                    self._ports[index] = None
        super().close()
