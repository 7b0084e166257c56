"""Guest memory shared by the front-end, the dirty-page log, and shared allocations.

The parts, each importing only those listed before it:

* :mod:`~pyvdpa.memory.regions`: the memory table (:class:`MemoryRegion`,
  :class:`FdMapping`, :class:`GuestMemory`): GPA and front-end virtual
  address translation into bounds-checked views;
* :mod:`~pyvdpa.memory.iotlb`: the I/O TLB of a device behind an IOMMU
  (:class:`IotlbPerm`, :class:`IotlbEntry`, :class:`Iotlb`,
  :class:`IotlbAddressSpace`);
* :mod:`~pyvdpa.memory.dirty`: the migration dirty-page log
  (:class:`DirtyLog`, :class:`IotlbDirtyLog`);
* :mod:`~pyvdpa.memory.shared`: memory the front-end role shares
  (:class:`SharedMemory`, :func:`allocate_shared`);
* :mod:`~pyvdpa.memory.iova`: an IOVA space of files mapped into this
  process, as VDUSE hands them out (:class:`IovaSpace`).

Each part's docstring gives its theory of operation.
"""

from __future__ import annotations

from pyvdpa.memory.dirty import LOG_PAGE_SIZE, DirtyLog, IotlbDirtyLog
from pyvdpa.memory.iotlb import Iotlb, IotlbAddressSpace, IotlbEntry, IotlbPerm
from pyvdpa.memory.iova import IovaMapping, IovaSpace
from pyvdpa.memory.regions import MAX_MEM_SLOTS, FdMapping, GuestMemory, MemoryRegion
from pyvdpa.memory.shared import SharedMemory, allocate_shared

__all__ = [
    "LOG_PAGE_SIZE",
    "MAX_MEM_SLOTS",
    "DirtyLog",
    "FdMapping",
    "GuestMemory",
    "Iotlb",
    "IotlbAddressSpace",
    "IotlbDirtyLog",
    "IotlbEntry",
    "IotlbPerm",
    "IovaMapping",
    "IovaSpace",
    "MemoryRegion",
    "SharedMemory",
    "allocate_shared",
]
