"""A virtio driver session over the kernel's vhost-vdpa device (``/dev/vhost-vdpa-N``).

Theory of operation (Linux 6.12 ``drivers/vhost/vdpa.c``; QEMU's
``hw/virtio/vhost-vdpa.c`` plays the same role): the session is the VMM of
a vDPA device bound to ``vhost_vdpa``.  What it shares with the vhost-user
session (memory, rings, buffers, calls) is :class:`DriverSession`; what
differs is how the device learns about them:

1. open the device (one user at a time), VHOST_SET_OWNER, acknowledge the
   back-end features (IOTLB_MSG_V2 and IOTLB_BATCH, plus IOTLB_ASID,
   SUSPEND and RESUME when the kernel offers them), read the device id,
   the largest ring, the config space size and the IOVA range;
2. the virtio status sequence (virtio 1.2, 3.1.1): reset (0), ACKNOWLEDGE,
   DRIVER, VHOST_SET_FEATURES, FEATURES_OK read back (a device that clears
   it refuses the features), then the memory: there is no memory table,
   the memfd is mapped into the device's IOVA space with IOTLB UPDATE
   messages written to the device, inside the range the kernel reported,
   in one batch; VHOST_VDPA_SET_CONFIG_CALL;
3. per ring: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (IOVAs),
   SET_VRING_KICK, SET_VRING_CALL; then SET_VRING_ENABLE on each and
   DRIVER_OK (read back);
4. on stop SUSPEND (when acknowledged) and GET_VRING_BASE per ring; on
   close status 0 (reset), the mappings invalidated, the device closed.  A
   failure during set-up writes FAILED before the error is raised.

Without ``iommu`` the memory sits at ``GPA_BASE`` in IOVA space as one
mapping, as QEMU maps guest RAM at its guest-physical address.  With
``iommu`` the session is a VMM with a vIOMMU: the memory sits
``IOVA_OFFSET`` higher, in :data:`REMAP_CHUNK` mappings, and while traffic
runs (:meth:`VdpaSession.tick`) one chunk after another is invalidated and
mapped again in one IOTLB batch, as a guest's IOMMU driver unmaps and maps
DMA buffers: never a chunk holding a buffer the device has not returned
(the kernel may apply a batch as a removal then an addition, and a device
translating in between would fail the request);
:meth:`VdpaSession.unmap` withdraws a range for good, and the device can
then reach none of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

from pyvdpa.drive.session import (
    GPA_BASE,
    IOMMU_PAGE_SIZE,
    IOVA_OFFSET,
    DriverRing,
    DriverSession,
    feature_names,
)
from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.vhost_vdpa.device import VhostVdpaDevice
from pyvdpa.vhost_vdpa.uapi import (
    BackendFeature,
    IotlbPerm,
    IovaRange,
    VhostVdpaError,
    VringAddr,
    VringAddrFlags,
)
from pyvdpa.virtio.constants import DeviceId, DeviceStatus, VirtioFeature

__all__ = [
    "OPTIONAL_BACKEND_FEATURES",
    "REMAP_CHUNK",
    "REMAP_INTERVAL",
    "REQUIRED_BACKEND_FEATURES",
    "VdpaSession",
    "device_name",
]

log = logging.getLogger(__name__)

#: Back-end features a session cannot do without.
REQUIRED_BACKEND_FEATURES = BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH
#: Back-end features acknowledged when the kernel offers them.
OPTIONAL_BACKEND_FEATURES = (
    BackendFeature.IOTLB_ASID | BackendFeature.SUSPEND | BackendFeature.RESUME
)
#: With ``iommu``: bytes per mapping, and seconds between two remaps while traffic runs.
REMAP_CHUNK = 1 << 20
REMAP_INTERVAL = 0.1

# Feature bits of vhost-user that a vhost-vdpa device never takes.
_VHOST_USER_ONLY = VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.LOG_ALL
# The status a device must hold before its rings are described.
_NEGOTIATED = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK


def device_name(device_id: int) -> str:
    """``net``, ``blk`` or the id's spec name, for messages."""
    if device_id == DeviceId.BLOCK:
        return "blk"
    try:
        return DeviceId(device_id).name.lower()
    except ValueError:
        return f"device id {device_id}"


class VdpaSession(DriverSession):
    """A driver of a vhost-vdpa device with shared memory and rings.

    Takes ``device`` over (closed by :meth:`close`, also when the
    constructor fails).
    """

    def __init__(
        self,
        device: VhostVdpaDevice,
        *,
        memory_size: int = 64 << 20,
        iommu: bool = False,
        remap_idle: bool = False,
    ) -> None:
        self.device = device
        #: Remap only while the device holds no chain at all (see :meth:`tick`).
        self.remap_idle = remap_idle
        try:
            device.set_owner()
            offered = device.get_backend_features()
            missing = REQUIRED_BACKEND_FEATURES & ~offered
            if missing:
                raise ConfigError(
                    f"{device.path}: the kernel does not offer the back-end features {missing!r}"
                )
            device.set_backend_features(
                REQUIRED_BACKEND_FEATURES | (offered & OPTIONAL_BACKEND_FEATURES)
            )
            #: Back-end features the kernel offered.
            self.backend_features_offered = offered
            self.device_id = device.get_device_id()
            self.max_ring_size = device.get_vring_num()
            self.config_size = device.get_config_size()
            self.iova_range = device.get_iova_range()
            wanted = GPA_BASE + (IOVA_OFFSET if iommu else 0)
            base = _place(self.iova_range, memory_size, wanted)
            if base is None:
                raise ConfigError(
                    f"{device.path}: the IOVA range [{self.iova_range.first:#x}, "
                    f"{self.iova_range.last:#x}] cannot hold the {memory_size} bytes of memory "
                    "asked for (--memory)"
                )
            super().__init__(memory_size, base, iommu=iommu)
        except BaseException:
            device.close()
            raise
        self.chunk = REMAP_CHUNK if iommu else memory_size
        #: Ranges mapped now: device address -> size.
        self.mappings: dict[int, int] = {}
        self._config_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._next_remap = 0.0
        self._remap_cursor = 0

    # ------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """Write FAILED (best effort) when the body raises, then let the error go."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(PyvdpaError, OSError):
                self.device.set_status(self.device.get_status() | DeviceStatus.FAILED)
            raise

    # ------------------------------------------------------------------ memory

    def _map_range(self, addr: int, size: int) -> None:
        uaddr = self.shared.address + self.offset_of(addr)
        self.device.iotlb_update(addr, size, uaddr, IotlbPerm.RW)
        self.mappings[addr] = size

    def map_memory(self) -> None:
        """Map the whole shared memory into the device's IOVA space (one batch)."""
        with self.device.iotlb_batch():
            for offset in range(0, self.memory_size, self.chunk):
                self._map_range(self.dma_base + offset, min(self.chunk, self.memory_size - offset))

    def unmap(self, addr: int, size: int) -> None:
        """Withdraw the mappings that lie in ``[addr, addr + size)`` for good.

        Only whole mappings go (with ``iommu`` they are :data:`REMAP_CHUNK`
        bytes); the device can reach none of their bytes afterwards.
        """
        with self.device.iotlb_batch():
            for start, length in sorted(self.mappings.items()):
                if addr <= start and start + length <= addr + size:
                    self.device.iotlb_invalidate(start, length)
                    del self.mappings[start]

    def chunk_of(self, addr: int) -> tuple[int, int]:
        """The mapping that holds device address ``addr``: its start and size."""
        for start, length in self.mappings.items():
            if start <= addr < start + length:
                return start, length
        raise ConfigError(f"device address {addr:#x} is not mapped")

    def remap(self, addr: int, size: int) -> None:
        """Invalidate the mapping at ``addr`` and map it again, in one IOTLB batch.

        With IOTLB_BATCH the device applies both at BATCH_END: its
        translations change, and none is missing at any time.
        """
        with self.device.iotlb_batch():
            self.device.iotlb_invalidate(addr, size)
            self._map_range(addr, size)
        self.iotlb_remaps += 1

    def tick(self) -> None:
        """With ``iommu``, every :data:`REMAP_INTERVAL` seconds remap the next idle chunk.

        A chunk holding a buffer the device has not returned yet is left
        alone, as a guest's IOMMU driver unmaps a buffer only after its
        completion.  With :attr:`remap_idle` nothing is remapped while the
        device holds any chain: for devices that drop the translations of
        every request in flight on any IOTLB change (VDUSE tells its device
        that the whole IOVA space changed after each batch, and
        qemu-storage-daemon 7.2 then unmaps the buffers of requests it is
        still working on); :meth:`quiescing` asks the traffic loops to let
        the device drain first.
        """
        if not self._remap_due():
            return
        if self.remap_idle and any(ring.in_flight for ring in self.rings):
            return
        self._next_remap = time.monotonic() + REMAP_INTERVAL
        chunks = sorted(self.mappings.items())
        for _ in range(len(chunks)):
            start, size = chunks[self._remap_cursor % len(chunks)]
            self._remap_cursor += 1
            if not any(ring.holds(start, size) for ring in self.rings):
                self.remap(start, size)
                return

    def quiescing(self) -> bool:
        """Whether a remap waits for the device to return every chain (:attr:`remap_idle`)."""
        return self.remap_idle and self._remap_due()

    def _remap_due(self) -> bool:
        """Whether ``iommu`` remapping is on and the next remap's time has come."""
        return self.iommu and bool(self.mappings) and time.monotonic() >= self._next_remap

    # ------------------------------------------------------------------ negotiation

    def negotiate(
        self,
        wanted: int,
        required: int,
        *,
        device: DeviceId | None = None,
    ) -> int:
        """The status sequence up to FEATURES_OK, then the memory mapped.

        Raises :class:`ConfigError` when the device is not of type
        ``device`` or lacks a ``required`` feature, and
        :class:`~pyvdpa.vhost_vdpa.uapi.FeaturesRefusedError` when it clears
        FEATURES_OK.
        """
        dev = self.device
        if device is not None and self.device_id != device:
            raise ConfigError(
                f"{dev.path} is a virtio {device_name(self.device_id)} device, "
                f"not {device_name(device)}"
            )
        with self._failing():
            dev.set_status(0)
            dev.add_status(DeviceStatus.ACKNOWLEDGE)
            dev.add_status(DeviceStatus.DRIVER)
            offered = dev.get_features()
            required = (required | VirtioFeature.VERSION_1) & ~_VHOST_USER_ONLY
            missing = required & ~offered
            if missing:
                raise ConfigError(f"{dev.path} does not offer {feature_names(missing)}")
            # ACCESS_PLATFORM: the device's addresses are IOVAs, which they are.
            accepted = (wanted | required | VirtioFeature.ACCESS_PLATFORM) & ~_VHOST_USER_ONLY
            self.features = offered & accepted
            dev.set_features(self.features)
            dev.add_status(DeviceStatus.FEATURES_OK)
            self.map_memory()
            dev.set_config_call(self._config_call)
        return self.features

    def max_queues(self) -> int:
        """VHOST_VDPA_GET_VQS_COUNT (0 when the kernel lacks it)."""
        with contextlib.suppress(VhostVdpaError):
            return self.device.get_vqs_count()
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        """VHOST_VDPA_GET_CONFIG."""
        return self.device.get_config(offset, size)

    # ------------------------------------------------------------------ rings

    def _describe_ring(self, ring: DriverRing, desc: int, avail: int, used: int) -> None:
        dev = self.device
        index, size = ring.index, ring.queue.size
        with self._failing():
            if size > self.max_ring_size:
                raise ConfigError(
                    f"{dev.path}: rings hold at most {self.max_ring_size} descriptors, "
                    f"{size} asked (--ring-size)"
                )
            dev.set_vring_num(index, size)
            # Packed: both wrap counters start at 1 (bit 15 of each half).
            dev.set_vring_base(index, 0x8000_8000 if self.packed else 0)
            dev.set_vring_addr(VringAddr(index, VringAddrFlags(0), desc, used, avail))
            dev.set_vring_kick(index, ring.kick_fd)
            dev.set_vring_call(index, ring.call_fd)

    def enable_rings(self) -> None:
        """SET_VRING_ENABLE on every ring, then DRIVER_OK (read back)."""
        with self._failing():
            for ring in self.rings:
                self.device.set_vring_enable(ring.index, True)
            self.device.add_status(DeviceStatus.DRIVER_OK)

    def stop(self) -> list[int]:
        """SUSPEND (when acknowledged), then GET_VRING_BASE on every ring."""
        dev = self.device
        if dev.backend_features & BackendFeature.SUSPEND:
            with contextlib.suppress(VhostVdpaError):
                dev.suspend()
        bases = []
        for ring in self.rings:
            try:
                bases.append(dev.get_vring_base(ring.index))
            except VhostVdpaError as exc:
                log.warning("%s", exc)
                bases.append(-1)
        return bases

    def close(self) -> None:
        """Reset the device (status 0), invalidate every mapping, close it and the memory."""
        dev = self.device
        if dev.closed:
            return
        with contextlib.suppress(VhostVdpaError):
            dev.set_status(0)
        with contextlib.suppress(VhostVdpaError), dev.iotlb_batch():
            for start, size in sorted(self.mappings.items()):
                dev.iotlb_invalidate(start, size)
        self.mappings.clear()
        dev.close()
        os.close(self._config_call)
        super().close()


def _place(iova_range: IovaRange, size: int, wanted: int) -> int | None:
    """Where ``size`` bytes go in ``iova_range``: at ``wanted`` if they fit, else lowest."""
    if iova_range.contains(wanted, size):
        return wanted
    first = -(-iova_range.first // IOMMU_PAGE_SIZE) * IOMMU_PAGE_SIZE
    if iova_range.contains(first, size):
        return first
    return None
