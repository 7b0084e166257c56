"""A virtio driver session: memory, negotiation, rings; over vhost-user or vhost-vdpa.

Theory of operation: this is what a VMM does before a guest driver can use
a device (QEMU's ``vhost_dev_start``, DPDK virtio-user's
``virtio_user_start_device``).  :class:`DriverSession` holds what every
transport shares: one memfd of shared memory, mapped here and seen by the
device from :attr:`DriverSession.dma_base` on (a bump allocator hands out
its bytes), the rings allocated in it as the driver-side queues of
:mod:`pyvdpa.virtio` (:class:`DriverRing`, with their kick and call
eventfds) and the wait for calls.  A transport describes the memory and the
rings to the device its own way (:meth:`DriverSession._describe_ring`) and
negotiates; :mod:`pyvdpa.drive.net` and :mod:`pyvdpa.drive.blk` run traffic
on any session.  :class:`Session` is vhost-user, and
:class:`pyvdpa.drive.vhost_vdpa.VdpaSession` the kernel's vhost-vdpa device.

:class:`Session` over vhost-user:

1. share memory: the memfd is described to the back-end as one region whose
   guest-physical base (``GPA_BASE``) differs from the mapping's virtual
   address, so the back-end must really translate;
2. negotiate: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
   SET_OWNER, SET_FEATURES (the intersection of what both sides want);
3. per ring: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
   SET_VRING_CALL, then SET_VRING_ENABLE when protocol features are on.

With in-band notifications (vhost-user spec, "In-band notifications") the
session negotiates INBAND_NOTIFICATIONS with BACKEND_REQ and REPLY_ACK, opens
the back-end channel (SET_BACKEND_REQ_FD) and uses no eventfd at all:
SET_VRING_CALL carries the NOFD bit (as Linux UML's vhost-user driver sends
it), no SET_VRING_KICK is sent and the first VRING_KICK starts a ring, and
the back-end's VRING_CALL / VRING_ERR arrive on the back-end channel.

With ``iommu`` the session is a VMM with a vIOMMU (vhost-user spec, "IOMMU
support"): it requires ``VIRTIO_F_ACCESS_PLATFORM`` and the BACKEND_REQ and
REPLY_ACK protocol features, and the device sees I/O virtual addresses
(IOVAs) ``IOVA_OFFSET`` above the guest-physical ones, so a back-end that
ignored the IOTLB would touch nothing of ours.  Nothing is mapped up front:
as QEMU does, each IOTLB MISS the back-end sends is answered with an
``IOTLB_MSG`` UPDATE of the 4 KiB page around the address
(:attr:`Session.iotlb_misses` counts them), and :meth:`Session.invalidate`
withdraws translations.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import select
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from pyvdpa.drive.dirtylog import LogCoverage, coverage, device_written_pages
from pyvdpa.errors import ConfigError, PyvdpaError, RemoteProtocolError, RingError
from pyvdpa.memory import GuestMemory, MemoryRegion, SharedMemory, allocate_shared
from pyvdpa.memory.dirty import log_size
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.codec import Message
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import (
    ACKED_BACKEND_CHANNEL,
    MAX_MEM_REGIONS,
    BackendRequest,
    IotlbPerm,
    IotlbType,
    ProtocolFeature,
)
from pyvdpa.virtio.constants import DeviceId, VirtioFeature
from pyvdpa.virtio.packed import PackedDriverQueue
from pyvdpa.virtio.ring import DriverQueue
from pyvdpa.virtio.split import SplitDriverQueue, SplitLayout

__all__ = [
    "GPA_BASE",
    "INBAND_PROTOCOL_FEATURES",
    "IOMMU_PAGE_SIZE",
    "IOVA_OFFSET",
    "DriverRing",
    "DriverSession",
    "Session",
]

log = logging.getLogger(__name__)

#: Guest-physical base of the shared region (not its virtual address).
GPA_BASE = 0x4000_0000

#: With an IOMMU, how far above its guest-physical address the device sees a byte.
IOVA_OFFSET = 0x10_0000_0000

#: Granule of the translations the front-end's IOMMU hands out (Linux maps pages).
IOMMU_PAGE_SIZE = 0x1000

#: Protocol features a session uses when the back-end offers them.
WANTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
)

#: What in-band notifications need: the feature, the back-end channel its
#: calls arrive on and the acknowledgements that make each one synchronous.
INBAND_PROTOCOL_FEATURES = ProtocolFeature.INBAND_NOTIFICATIONS | ACKED_BACKEND_CHANNEL


@dataclass(eq=False)
class DriverRing:
    """One virtqueue as the driver sees it, with its eventfds.

    With in-band notifications there are no eventfds: kicks are VRING_KICK
    requests sent by ``inband``.
    """

    index: int
    queue: DriverQueue
    kick_fd: int | None
    call_fd: int | None
    inband: Frontend | None = None
    #: The buffers of each chain the device holds, by chain id: memory a
    #: VMM must leave mapped until the chain is used.
    in_flight: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: Device addresses of the ring's three areas: descriptors, driver area, device area.
    areas: tuple[int, int, int] = (0, 0, 0)

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
    ) -> int:
        """Make a chain of (addr, len) buffers available; return its id."""
        head = self.queue.add(readable, writable)
        self.in_flight[head] = [*readable, *writable]
        return head

    def get_used(self) -> tuple[int, int] | None:
        """(id, written length) of the next used chain, or None."""
        used = self.queue.get_used()
        if used is not None:
            self.in_flight.pop(used[0], None)
        return used

    def holds(self, start: int, size: int) -> bool:
        """Whether a chain in flight has a buffer in ``[start, start + size)``."""
        end = start + size
        return any(
            addr < end and start < addr + length
            for buffers in self.in_flight.values()
            for addr, length in buffers
        )

    def kick(self) -> None:
        """Notify the device if it asked for notifications."""
        if not self.queue.kick_needed():
            return
        if self.kick_fd is not None:
            os.eventfd_write(self.kick_fd, 1)
        elif self.inband is not None:
            self.inband.vring_kick(self.index)

    def clear_call(self) -> None:
        """Consume pending interrupts (non-blocking)."""
        if self.call_fd is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.call_fd)


def feature_names(mask: int) -> str:
    """Spec names of the generic feature bits in ``mask`` (others as hex)."""
    names = [f.name for f in VirtioFeature if f.name and mask & f]
    rest = mask & ~sum(int(f) for f in VirtioFeature)
    if rest:
        names.append(f"{rest:#x}")
    return ", ".join(names)


class DriverSession(abc.ABC):
    """Shared memory and rings, ready for a device driver, over some transport.

    The device sees the memory from :attr:`dma_base` on: guest-physical
    addresses, or I/O virtual addresses behind an IOMMU.  A transport
    implements :meth:`negotiate`, :meth:`max_queues`, :meth:`read_config`,
    :meth:`enable_rings`, :meth:`stop` and :meth:`_describe_ring`.
    """

    def __init__(self, memory_size: int, dma_base: int, *, iommu: bool = False) -> None:
        self.iommu = iommu
        self.shared: SharedMemory = allocate_shared(memory_size, "pyvdpa-drive")
        #: Where the device sees the first byte of the shared memory.
        self.dma_base = dma_base
        # The driver's own view, addressed as the device addresses it.
        self.memory = GuestMemory(MAX_MEM_REGIONS)
        try:
            self.memory.add_region(
                MemoryRegion(dma_base, memory_size, self.shared.address, 0), self.shared.fd
            )
        except BaseException:
            self.shared.close()
            raise
        self.memory_size = memory_size
        self._next = dma_base
        self.features = 0
        self.rings: list[DriverRing] = []
        #: IOTLB misses the device sent and the session answered.
        self.iotlb_misses = 0
        #: Mappings withdrawn and given again while traffic ran.
        self.iotlb_remaps = 0
        #: ``(address, size)`` areas only the device writes (buffers it fills, split used rings).
        self.device_areas: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ memory

    def alloc(self, size: int, align: int = 64, *, device_writes: bool = False) -> int:
        """Reserve ``size`` bytes of shared memory; return their device address.

        The device address is guest-physical, or an IOVA with ``iommu``.
        ``device_writes``: only the device writes there (recorded in
        :attr:`device_areas`).
        """
        start = (self._next + align - 1) & ~(align - 1)
        end = start + size
        if end > self.dma_base + self.memory_size:
            raise ConfigError(
                f"shared memory exhausted ({self.memory_size} bytes): "
                "use fewer queues, smaller rings or smaller buffers"
            )
        self._next = end
        if device_writes:
            self.device_areas.append((start, size))
        return start

    def offset_of(self, addr: int) -> int:
        """Offset in the shared memory of device address ``addr``."""
        return addr - self.dma_base

    def host_address(self, addr: int, size: int) -> int:
        """This process's address of the ``size`` bytes at device address ``addr``.

        Raises :class:`ConfigError` unless they lie in the shared memory.
        """
        offset = self.offset_of(addr)
        if not 0 <= offset <= self.memory_size - size or size < 0:
            raise ConfigError(f"{size} bytes at {addr:#x} lie outside the shared memory")
        return self.shared.address + offset

    # ------------------------------------------------------------------ transport

    @abc.abstractmethod
    def negotiate(
        self,
        wanted: int,
        required: int,
        *,
        device: DeviceId | None = None,
    ) -> int:
        """Run the start-up handshake; return the negotiated feature bits.

        ``required`` bits missing from the device's offer are a
        :class:`ConfigError` naming them; ``device``, when given, is the
        device type the caller drives (a transport that reads the device's
        type refuses another with a :class:`ConfigError`).
        """

    @abc.abstractmethod
    def max_queues(self) -> int:
        """Queues the device has (0: unknown)."""

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device's config space at ``offset``."""

    @abc.abstractmethod
    def enable_rings(self) -> None:
        """Let the device run the rings set up."""

    @abc.abstractmethod
    def stop(self) -> list[int]:
        """Take every ring back from the device; return their bases (-1: unknown)."""

    @abc.abstractmethod
    def _describe_ring(self, ring: DriverRing, desc: int, avail: int, used: int) -> None:
        """Tell the device about ``ring`` (its areas at device addresses ``desc``, ...)."""

    def tick(self) -> None:
        """Called by the traffic loops between bursts (a transport's housekeeping)."""
        return

    def quiescing(self) -> bool:
        """Whether the traffic loops should add no chain until the device returns all.

        A transport asks this before a change the device must not see while
        it holds buffers; :meth:`tick` makes the change once all are back.
        """
        return False

    # ------------------------------------------------------------------ rings

    @property
    def packed(self) -> bool:
        """Whether the packed ring layout was negotiated."""
        return bool(self.features & VirtioFeature.RING_PACKED)

    def _new_ring(self, index: int, queue: DriverQueue) -> DriverRing:
        """The ring's notifications: a kick and a call eventfd."""
        return DriverRing(
            index,
            queue,
            os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
            os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
        )

    def setup_ring(self, index: int, size: int, *, indirect_area: bool = False) -> DriverRing:
        """Allocate, describe and start ring ``index`` of ``size`` descriptors."""
        event_idx = bool(self.features & VirtioFeature.RING_EVENT_IDX)
        in_order = bool(self.features & VirtioFeature.IN_ORDER)
        indirect_addr = self.alloc(size * size * 16, 16) if indirect_area else None
        queue: DriverQueue
        if self.packed:
            desc = self.alloc(16 * size, 16)
            driver = self.alloc(4, 4)
            device = self.alloc(4, 4)
            queue = PackedDriverQueue(
                self.memory, size, desc, driver, device,
                event_idx=event_idx, indirect_addr=indirect_addr, in_order=in_order,
            )  # fmt: skip
            avail, used = driver, device
        else:
            desc = self.alloc(SplitLayout(size).desc_size, 16)
            avail = self.alloc(SplitLayout(size).avail_size, 2)
            used = self.alloc(SplitLayout(size).used_size, 4, device_writes=True)
            queue = SplitDriverQueue(
                self.memory, size, desc, avail, used,
                event_idx=event_idx, indirect_addr=indirect_addr, in_order=in_order,
            )  # fmt: skip
        ring = self._new_ring(index, queue)
        ring.areas = (desc, avail, used)
        self.rings.append(ring)
        self._describe_ring(ring, desc, avail, used)
        return ring

    def wait_call(self, timeout: float) -> bool:
        """Block until any ring's call fires or ``timeout`` seconds pass."""
        fds = [ring.call_fd for ring in self.rings if ring.call_fd is not None]
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
        return bool(ready)

    def close(self) -> None:
        """Close the eventfds and the shared memory (a transport closes itself first)."""
        for ring in self.rings:
            for fd in (ring.kick_fd, ring.call_fd):
                if fd is not None:
                    os.close(fd)
        self.rings.clear()
        self.memory.close()
        self.shared.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session(DriverSession):
    """A vhost-user front-end with shared memory and rings, ready for a device driver.

    ``inband`` uses in-band notifications instead of eventfds (the back-end
    must offer :data:`INBAND_PROTOCOL_FEATURES`).  ``log_all`` acts as a VMM
    migrating its guest: ``VHOST_F_LOG_ALL`` negotiated, a dirty log shared
    (SET_LOG_BASE, ``LOG_SHMFD`` required) and every ring logging, checked by
    :meth:`log_coverage` (:mod:`pyvdpa.drive.dirtylog`).
    """

    def __init__(
        self,
        frontend: Frontend,
        *,
        memory_size: int = 64 << 20,
        inband: bool = False,
        iommu: bool = False,
        log_all: bool = False,
    ) -> None:
        if log_all and iommu:
            raise ConfigError("--log-all with --iommu is not supported (the log takes GPAs)")
        super().__init__(memory_size, GPA_BASE + (IOVA_OFFSET if iommu else 0), iommu=iommu)
        self.frontend = frontend
        self.inband = inband
        self.log_all = log_all
        self._log: SharedMemory | None = None
        self._called = threading.Event()
        self._ring_error: RingError | None = None
        self.region = MemoryRegion(GPA_BASE, memory_size, self.shared.address, 0)
        self.protocol_features = ProtocolFeature(0)
        #: IOTLB misses that named no memory of ours.
        self.iotlb_faults = 0
        self._iotlb_lock = threading.Lock()

    # ------------------------------------------------------------------ memory

    def gpa_to_uva(self, gpa: int) -> int:
        """Front-end virtual address of a guest-physical address."""
        return gpa - GPA_BASE + self.shared.address

    def ring_address(self, addr: int) -> int:
        """What SET_VRING_ADDR carries for device address ``addr``: a UVA, or the IOVA itself."""
        return addr if self.iommu else self.gpa_to_uva(addr)

    # ------------------------------------------------------------------ IOMMU

    def _serve_iotlb_miss(self, message: Message) -> int:
        """Answer a back-end's IOTLB MISS with an UPDATE of the page around it."""
        miss = message.payload
        if not isinstance(miss, codec.IotlbMsg) or miss.type is not IotlbType.MISS:
            return 1
        page = miss.iova - miss.iova % IOMMU_PAGE_SIZE
        offset = page - self.dma_base
        if not 0 <= offset < self.region.memory_size:
            # Like an IOMMU fault: no translation exists, the device gets none.
            log.error("IOTLB miss at %#x outside the device's memory", miss.iova)
            with self._iotlb_lock:
                self.iotlb_faults += 1
            return 1
        update = codec.IotlbMsg(
            page, IOMMU_PAGE_SIZE, self.shared.address + offset, IotlbPerm.RW, IotlbType.UPDATE
        )
        self.frontend.iotlb_msg(update)
        with self._iotlb_lock:
            self.iotlb_misses += 1
        return 0

    def invalidate(self, iova: int, size: int) -> None:
        """Withdraw the device's translations of ``[iova, iova + size)`` (IOTLB INVALIDATE).

        When this returns the back-end no longer uses them; it will miss
        and be answered again on its next access.
        """
        self.frontend.iotlb_msg(codec.IotlbMsg(iova, size, 0, IotlbPerm.NONE, IotlbType.INVALIDATE))

    # ------------------------------------------------------------------ negotiation

    def negotiate(
        self,
        wanted: int,
        required: int,
        *,
        protocol: ProtocolFeature = WANTED_PROTOCOL_FEATURES,
        device: DeviceId | None = None,
    ) -> int:
        """Run the start-up handshake; return the negotiated feature bits.

        ``required`` bits missing from the back-end's offer are a
        :class:`ConfigError` naming them; ``protocol`` is the set of protocol
        features to use when the back-end offers them.  vhost-user does not
        tell the device type: ``device`` is not checked.
        """
        fe = self.frontend
        offered = fe.get_features()
        if self.iommu:
            required |= VirtioFeature.ACCESS_PLATFORM | VirtioFeature.PROTOCOL_FEATURES
            protocol |= ACKED_BACKEND_CHANNEL
        if self.log_all:
            required |= VirtioFeature.LOG_ALL | VirtioFeature.PROTOCOL_FEATURES
            protocol |= ProtocolFeature.LOG_SHMFD
        missing = required & ~offered
        if missing:
            raise ConfigError(f"back-end does not offer {feature_names(missing)}")
        if self.inband:
            protocol |= INBAND_PROTOCOL_FEATURES
        if offered & VirtioFeature.PROTOCOL_FEATURES:
            proto = fe.get_protocol_features() & protocol
            if self.inband and INBAND_PROTOCOL_FEATURES & ~proto:
                missing_proto = ProtocolFeature(INBAND_PROTOCOL_FEATURES & ~proto)
                raise ConfigError(
                    f"in-band notifications: back-end does not offer {missing_proto.name}"
                )
            fe.set_protocol_features(proto)
            self.protocol_features = proto
        elif self.inband:
            raise ConfigError("in-band notifications: back-end has no protocol features")
        if self.log_all and not self.protocol_features & ProtocolFeature.LOG_SHMFD:
            raise ConfigError("--log-all: back-end does not offer the LOG_SHMFD protocol feature")
        if self.inband:
            fe.backend_handlers[BackendRequest.VRING_CALL] = self._on_vring_call
            fe.backend_handlers[BackendRequest.VRING_ERR] = self._on_vring_err
        if self.iommu:
            lacking = ACKED_BACKEND_CHANNEL & ~self.protocol_features
            if lacking:
                raise ConfigError(
                    f"an IOMMU needs protocol features the back-end lacks: {lacking!r}"
                )
            fe.backend_handlers[BackendRequest.IOTLB_MSG] = self._serve_iotlb_miss
        if self.inband or self.iommu:
            fe.open_backend_channel()
        fe.set_owner()
        self.features = offered & (wanted | required)
        fe.set_features(self.features)
        fe.set_mem_table([(self.region, self.shared.fd)])
        if self.log_all:
            size = log_size(GPA_BASE + self.memory_size)
            self._log = allocate_shared(size, "pyvdpa-drive-log")
            fe.set_log_base(self._log.fd, size)
        return self.features

    def max_queues(self) -> int:
        """Queues the back-end has (GET_QUEUE_NUM when MQ was negotiated)."""
        if self.protocol_features & ProtocolFeature.MQ:
            return self.frontend.get_queue_num()
        return 0

    def read_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG."""
        return self.frontend.get_config(offset, size)

    # ------------------------------------------------------------------ rings

    def _new_ring(self, index: int, queue: DriverQueue) -> DriverRing:
        if self.inband:
            return DriverRing(index, queue, None, None, self.frontend)
        return super()._new_ring(index, queue)

    def _describe_ring(self, ring: DriverRing, desc: int, avail: int, used: int) -> None:
        fe = self.frontend
        index = ring.index
        fe.set_vring_call(index, ring.call_fd)
        fe.set_vring_num(index, ring.queue.size)
        fe.set_vring_base(index, 0x8000 if self.packed else 0)
        flags = codec.VringAddrFlags(0)
        log_addr = 0
        if self.log_all:
            # Where the device writes its used entries: the used ring, or a
            # packed ring's descriptors (as DPDK and pyvdpa log them).
            flags = codec.VringAddrFlags.LOG
            log_addr = desc if self.packed else used
        addr = codec.VringAddr(
            index,
            flags,
            self.ring_address(desc),
            self.ring_address(used),
            self.ring_address(avail),
            log_addr,
        )
        fe.set_vring_addr(addr)
        if ring.kick_fd is not None:
            fe.set_vring_kick(index, ring.kick_fd)

    def enable_rings(self) -> None:
        """SET_VRING_ENABLE 1 on every ring (only with protocol features)."""
        if self.features & VirtioFeature.PROTOCOL_FEATURES:
            for ring in self.rings:
                self.frontend.set_vring_enable(ring.index, True)

    def wait_call(self, timeout: float) -> bool:
        """Block until any ring's call fires or ``timeout`` seconds pass.

        With in-band notifications, raises the back-end channel's first
        error (:attr:`Frontend.backend_error`) or a :class:`RingError` for a
        ring the back-end reported broken with VRING_ERR.
        """
        if not self.inband:
            return super().wait_call(timeout)
        called = self._called.wait(timeout)
        # A call landing between wait and clear is lost, not missed: the
        # driver looks at its used rings after every wait.
        self._called.clear()
        if self.frontend.backend_error is not None:
            raise self.frontend.backend_error
        if self._ring_error is not None:
            raise self._ring_error
        return called

    def _ring_of(self, message: codec.Message) -> DriverRing:
        assert isinstance(message.payload, codec.VringState)
        index = message.payload.index
        for ring in self.rings:
            if ring.index == index:
                return ring
        name = BackendRequest(message.request).name
        raise RemoteProtocolError(f"{name} for vring {index}, which was not set up")

    def _on_vring_call(self, message: codec.Message) -> int:
        self._ring_of(message)
        self._called.set()
        return 0

    def _on_vring_err(self, message: codec.Message) -> int:
        ring = self._ring_of(message)
        if self._ring_error is None:
            self._ring_error = RingError(f"back-end reports vring {ring.index} broken (VRING_ERR)")
        self._called.set()
        return 0

    def stop(self) -> list[int]:
        """GET_VRING_BASE on every ring; return the bases (best effort on a dead peer)."""
        bases = []
        for ring in self.rings:
            try:
                bases.append(self.frontend.get_vring_base(ring.index))
            except PyvdpaError:
                bases.append(-1)
        return bases

    def log_coverage(self) -> LogCoverage:
        """After :meth:`stop`: the pages the back-end wrote, and those its log lacks."""
        if self._log is None:
            raise ConfigError("the session shares no dirty log (log_all)")
        packed = [(ring.areas[0], ring.queue.size) for ring in self.rings] if self.packed else []
        pages = device_written_pages(self.memory.read, self.device_areas, packed)
        return coverage(self._log.buf, pages)

    def close(self) -> None:
        """Close the connection, the eventfds, the shared memory and the dirty log."""
        self.frontend.close()
        if self._log is not None:
            self._log.close()
        super().close()
