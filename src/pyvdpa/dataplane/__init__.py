"""The accelerated data path: compiled ring kernels run by GIL-free worker threads.

In vDPA terms this package is the "hardware".  The vhost-user control plane
hands it ring addresses, guest memory and eventfds, and it processes the
virtqueues straight in guest memory:

* :mod:`~pyvdpa.dataplane.kernels` — numba-compiled kernels (cached on
  disk): chain validation with the rules of :mod:`pyvdpa.virtio.ring`,
  split and packed pop and push, notification decisions, the net and blk
  programs and the worker loop, with explicit memory ordering;
* :mod:`~pyvdpa.dataplane.queues` — a queue's compiled state, usable step by
  step from Python as a :class:`~pyvdpa.virtio.ring.DeviceQueue`;
* :mod:`~pyvdpa.dataplane.engine` — worker threads in poll, event or
  adaptive mode, and the ports they serve;
* :mod:`~pyvdpa.dataplane.net` — :class:`EngineNetDevice`, a virtio-net
  device (loopback, drop, gen, tap) on the engine;
* :mod:`~pyvdpa.dataplane.blk` — :class:`EngineBlkDevice`, a virtio-blk
  device (a file or a RAM disk) on the engine.
"""

from pyvdpa.dataplane.blk import EngineBlkDevice
from pyvdpa.dataplane.engine import Engine, EngineMode, Port
from pyvdpa.dataplane.net import EngineNetDevice, QueueCounters, shared_engine, shared_engines
from pyvdpa.dataplane.queues import (
    CompiledPackedQueue,
    CompiledQueue,
    CompiledSplitQueue,
)

__all__ = [
    "CompiledPackedQueue",
    "CompiledQueue",
    "CompiledSplitQueue",
    "Engine",
    "EngineBlkDevice",
    "EngineMode",
    "EngineNetDevice",
    "Port",
    "QueueCounters",
    "shared_engine",
    "shared_engines",
]
