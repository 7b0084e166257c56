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
DPDK's vhost blk examples do: a request is complete, used element
included, before the next one is popped.  A slow disk therefore delays
the other ports of the same worker; give the engine more workers when that
matters.

Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) is not
offered.  It exists so that a back-end that *dies* can hand its in-flight
requests to its successor.  Here no request is ever in flight when the
control plane stops a ring (the worker leaves its kernel only between
bursts, with every popped request completed), so a stop, a disconnect or a
memory-table change loses nothing; only a crash of the whole process in
the middle of a request would, and recording every request in the shared
region to cover that case would add two ordered stores to shared memory per
request on the hot path.  Front-ends that see the feature missing (QEMU's
vhost-user-blk among them) run without the region.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.engine import TX, Engine, EngineIommu, EngineMode, Port
from pyvdpa.dataplane.net import ENGINE_EXCLUDED_PROTOCOL_FEATURES, QueueCounters, shared_engine
from pyvdpa.dataplane.queues import CompiledQueue
from pyvdpa.device import Device, QueueNotRunningError, RingPosition, RingSpec
from pyvdpa.devices.blk import (
    BLK_PROTOCOL_FEATURES,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEG,
    BlkControl,
)
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.blk import BLK_ID_BYTES

__all__ = ["ENGINE_BLK_PROTOCOL_FEATURES", "ZERO_CHUNK", "EngineBlkDevice"]

#: Protocol features of the engine device: the Python device's, without
#: inflight tracking and in-band notifications (see ``ENGINE_EXCLUDED_PROTOCOL_FEATURES``).
ENGINE_BLK_PROTOCOL_FEATURES = BLK_PROTOCOL_FEATURES & ~(
    ProtocolFeature.INFLIGHT_SHMFD | ENGINE_EXCLUDED_PROTOCOL_FEATURES
)

ZERO_CHUNK = 1 << 16
"""Bytes of zeros the worker writes at a time where a file system cannot zero a range."""


class EngineBlkDevice(EngineIommu, BlkControl, Device):
    """A virtio-blk disk on a file or in memory whose queues run on an :class:`Engine`.

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

    @property
    def stats(self) -> list[QueueCounters]:
        """Per-queue counters, live."""
        return [QueueCounters(self._counters[i]) for i in range(self.num_queues)]

    # ------------------------------------------------------------------ queues

    def _port(self, index: int) -> Port:
        port = self._ports[index]
        if port is None:
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
            port = self.engine.add_port(unit, keep=(self._serial, self._zeros))
            self._ports[index] = port
        return port

    def start_queue(self, spec: RingSpec) -> None:
        """Build the ring's compiled queue and hand it to the engine."""
        queue = CompiledQueue.from_spec(spec, stats=self._counters[spec.index])
        with self._lock:
            self._port(spec.index).attach(TX, queue, spec.notifiers, armed=True)

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
