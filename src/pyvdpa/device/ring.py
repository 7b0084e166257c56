"""The ring description: how any control plane hands a virtqueue to a device.

Theory of operation (virtio 1.2, sections 2.7 and 2.8; vhost-user spec, "Ring
states"; Linux ``vduse.h``): whatever tells pyvdpa where a ring lies — a
vhost-user front-end with SET_VRING_NUM/ADDR/BASE, the kernel's vDPA bus
through VDUSE_VQ_GET_INFO, a test — says the same things: the layout and
size, the three areas' device addresses, the ring-affecting features, where
processing resumes, the address space the addresses belong to (guest memory
or an IOTLB), the dirty log, and where notifications go.  The control plane
that received those values checks them once, with :func:`describe_ring`,
which maps the three areas from the address space; the result is a
:class:`RingSpec`.

A device builds its own queue from a :class:`RingSpec` (a Python queue or a
compiled one) and, when told to stop, hands back the exact
:class:`RingPosition`.  The control plane never holds or reaches into a
device's queue; it owns the spec's mapped areas and releases them after the
device has stopped.

:class:`RingNotifiers` are the ring's live connections to the driver: the
kick eventfd the device waits on, the call and err eventfds (which the
control plane may replace while the ring runs: SET_VRING_CALL), and, for
control planes without eventfds, callables (vhost-user's in-band
VRING_CALL/VRING_ERR, VDUSE's VDUSE_VQ_INJECT_IRQ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvdpa.device.inflight import PackedInflightQueue, SplitInflightQueue
from pyvdpa.errors import PyvdpaError, RingError
from pyvdpa.memory import DirtyLog, Iotlb, IotlbAddressSpace, IotlbDirtyLog
from pyvdpa.virtio.constants import VirtioFeature
from pyvdpa.virtio.packed import PackedLayout, check_packed_base
from pyvdpa.virtio.ring import MAX_QUEUE_SIZE, AddressSpace, DirtyLogger, RingAreas
from pyvdpa.virtio.split import SplitLayout, check_split_base

__all__ = [
    "RingNotifiers",
    "RingPosition",
    "RingSetupError",
    "RingSpec",
    "Signal",
    "check_ring_size",
    "describe_ring",
]

log = logging.getLogger(__name__)

_WRAP_SHIFT = 15
_SLOT_MASK = (1 << _WRAP_SHIFT) - 1


class RingSetupError(RingError):
    """A ring description the device cannot take (size, alignment, position)."""


def check_ring_size(size: int, *, packed: bool, limit: int = MAX_QUEUE_SIZE) -> None:
    """Raise :class:`RingSetupError` unless ``size`` is a valid ring size up to ``limit``.

    Split rings need a power of two (section 2.7), packed rings any size
    (section 2.8); both at most :data:`~pyvdpa.virtio.ring.MAX_QUEUE_SIZE`.
    """
    if not 0 < size <= min(limit, MAX_QUEUE_SIZE):
        raise RingSetupError(f"ring size {size} out of range 1..{min(limit, MAX_QUEUE_SIZE)}")
    if not packed and size & (size - 1):
        raise RingSetupError(f"split ring size {size} is not a power of 2")


@dataclass(frozen=True, slots=True)
class RingPosition:
    """Where a device resumes a ring.

    Split rings: ``avail_idx`` is the free-running next available index
    (the used index is the ring's own).  Packed rings: ``avail_idx`` is the
    next available slot and ``avail_wrap`` its wrap counter; ``used_idx``
    and ``used_wrap`` the next used slot and its counter.
    """

    avail_idx: int
    avail_wrap: bool = False
    used_idx: int = 0
    used_wrap: bool = False

    @classmethod
    def split(cls, avail_idx: int) -> RingPosition:
        """A split ring's position."""
        check_split_base(avail_idx)
        return cls(avail_idx)

    @classmethod
    def decode(cls, base: int, *, packed: bool) -> RingPosition:
        """The position GET_VRING_BASE's ``num`` encodes (vhost-user and vhost)."""
        if not packed:
            return cls.split(base)
        return cls(
            base & _SLOT_MASK,
            bool(base >> _WRAP_SHIFT & 1),
            base >> 16 & _SLOT_MASK,
            bool(base >> 31 & 1),
        )

    def encode(self, *, packed: bool) -> int:
        """As GET_VRING_BASE reports it: split the avail index; packed both sides."""
        if not packed:
            return self.avail_idx
        avail = self.avail_idx | int(self.avail_wrap) << _WRAP_SHIFT
        used = self.used_idx | int(self.used_wrap) << _WRAP_SHIFT
        return avail | used << 16


class Signal(enum.Enum):
    """A notification a device sends the driver."""

    CALL = "call"
    ERR = "err"


#: Delivers a signal for a ring index without an eventfd (vhost-user in-band
#: VRING_CALL/VRING_ERR, VDUSE_VQ_INJECT_IRQ); returns once delivered.
SignalSender = Callable[[Signal, int], None]

#: Asks for the IOTLB translation of (iova, write) (vhost-user IOTLB MISS).
TranslationRequester = Callable[[int, bool], None]


class RingNotifiers:
    """A ring's notification channels, owned by the control plane, used by the device.

    ``kick_fd`` does not change while the ring runs (a new kick fd restarts
    the ring).  The call and err eventfds may be replaced at any time, so a
    device signals through :meth:`signal_call` and :meth:`fail`, or takes a
    duplicate with :meth:`dup_call_fd` and watches :attr:`call_generation`.
    Without an eventfd, ``sender`` delivers the signal, if there is one.
    """

    def __init__(
        self,
        index: int,
        label: str = "ring",
        *,
        kick_fd: int | None = None,
        call_fd: int | None = None,
        err_fd: int | None = None,
        sender: SignalSender | None = None,
        translation: TranslationRequester | None = None,
    ) -> None:
        self.index = index
        self.label = label
        self.kick_fd = kick_fd
        self._call_fd = call_fd
        self._err_fd = err_fd
        self.sender = sender
        self.translation = translation
        #: Set once the device found the ring broken (cleared by the control plane).
        self.broken = False
        #: Bumped whenever the call eventfd is replaced.
        self.call_generation = 0
        self._lock = threading.Lock()

    @property
    def call_fd(self) -> int | None:
        """The call eventfd, if the driver gave one."""
        return self._call_fd

    @property
    def err_fd(self) -> int | None:
        """The err eventfd, if the driver gave one."""
        return self._err_fd

    def replace_call_fd(self, fd: int | None) -> int | None:
        """Install a new call eventfd; return the old one for the caller to close."""
        with self._lock:
            old, self._call_fd = self._call_fd, fd
            self.call_generation += 1
        return old

    def replace_err_fd(self, fd: int | None) -> int | None:
        """Install a new err eventfd; return the old one for the caller to close."""
        with self._lock:
            old, self._err_fd = self._err_fd, fd
        return old

    def replace_kick_fd(self, fd: int | None) -> int | None:
        """Install a new kick eventfd (the ring is stopped); return the old one."""
        old, self.kick_fd = self.kick_fd, fd
        return old

    def dup_call_fd(self) -> tuple[int, int | None]:
        """The call generation and a duplicate of the call eventfd (or None).

        Taken under the lock that guards replacement, so it never duplicates
        an fd that is being closed.
        """
        with self._lock:
            fd = None if self._call_fd is None else os.dup(self._call_fd)
            return self.call_generation, fd

    def signal_call(self) -> None:
        """Interrupt the driver unconditionally (eventfd, else the sender)."""
        with self._lock:
            fd = self._call_fd
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.eventfd_write(fd, 1)
                return
        # Outside the lock: replacing the call fd must not wait for a reply.
        self._send(Signal.CALL)

    def fail(self, error: RingError) -> None:
        """The device found the ring broken: log once, tell the driver."""
        if not self.broken:
            log.error("%s: vring %d broken: %s", self.label, self.index, error)
        self.broken = True
        with self._lock:
            fd = self._err_fd
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.eventfd_write(fd, 1)
                return
        self._send(Signal.ERR)

    def request_translation(self, iova: int, write: bool) -> None:
        """Ask for the IOTLB translation of ``iova`` (thread-safe), if anyone can give it."""
        if self.translation is not None:
            self.translation(iova, write)

    def _send(self, signal: Signal) -> None:
        sender = self.sender
        if sender is None:
            return
        try:
            sender(signal, self.index)
        except PyvdpaError as exc:
            # A device thread must go on: a driver that left is noticed by
            # the control plane itself.
            log.warning(
                "%s: vring %d: %s not delivered: %s", self.label, self.index, signal.name, exc
            )

    def close_fds(self) -> None:
        """Close the kick, call and err eventfds."""
        for fd in (
            self.replace_kick_fd(None),
            self.replace_call_fd(None),
            self.replace_err_fd(None),
        ):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


@dataclass(frozen=True, eq=False)
class RingSpec:
    """A validated description of one ring, from which a device builds its queue.

    Built only by :func:`describe_ring`.  ``areas`` are the three ring areas
    mapped from ``space`` (owned by the control plane); ``position`` is
    where processing resumes; ``dirty_log`` with ``log_addr`` (the device
    address at which the used ring, or packed descriptor ring, is logged)
    when the driver logs dirty pages; ``inflight`` the ring's inflight
    record when the control plane tracks in-flight requests for a restart;
    ``in_order`` when VIRTIO_F_IN_ORDER was negotiated.
    """

    index: int
    size: int
    packed: bool
    event_idx: bool
    indirect: bool
    areas: RingAreas
    position: RingPosition
    space: AddressSpace
    notifiers: RingNotifiers
    dirty_log: DirtyLog | None = None
    log_addr: int | None = None
    inflight: SplitInflightQueue | PackedInflightQueue | None = None
    in_order: bool = False

    @property
    def addrs(self) -> tuple[int, int, int]:
        """Descriptor, driver and device area addresses in the device's address space."""
        return self.areas.addresses

    @property
    def iotlb(self) -> Iotlb | None:
        """The IOTLB the ring's addresses go through (behind an IOMMU), else None."""
        space = self.space
        return space.iotlb if isinstance(space, IotlbAddressSpace) else None

    @property
    def logger(self) -> DirtyLogger | None:
        """The dirty logger for Python queues: IOVAs logged at their GPAs behind an IOMMU."""
        if self.dirty_log is None:
            return None
        if isinstance(self.space, IotlbAddressSpace):
            return IotlbDirtyLog(self.dirty_log, self.space)
        return self.dirty_log

    @property
    def base(self) -> int:
        """The position in the vhost encoding the queues take."""
        return self.position.encode(packed=self.packed)

    def resumed_at(self, position: RingPosition) -> RingSpec:
        """The same ring, resuming at ``position``."""
        return dataclasses.replace(self, position=position)


def _ring_features(features: int) -> tuple[bool, bool, bool]:
    """(packed, event_idx, indirect) from negotiated feature bits."""
    return (
        bool(features & VirtioFeature.RING_PACKED),
        bool(features & VirtioFeature.RING_EVENT_IDX),
        bool(features & VirtioFeature.RING_INDIRECT_DESC),
    )


def describe_ring(
    index: int,
    size: int,
    features: int,
    addrs: tuple[int, int, int],
    position: RingPosition,
    space: AddressSpace,
    notifiers: RingNotifiers,
    *,
    max_size: int = MAX_QUEUE_SIZE,
    dirty_log: DirtyLog | None = None,
    log_addr: int | None = None,
    inflight: SplitInflightQueue | PackedInflightQueue | None = None,
) -> RingSpec:
    """Check a ring's values once and map its areas: the one place a ring is validated.

    Raises :class:`RingSetupError` for a size, alignment or position the
    layout refuses; :class:`~pyvdpa.errors.GuestMemoryError` for an area
    outside ``space``; :class:`~pyvdpa.errors.IotlbMissError` for an area
    whose translation is missing (nothing is mapped then).
    """
    packed, event_idx, indirect = _ring_features(features)
    check_ring_size(size, packed=packed, limit=max_size)
    if dirty_log is not None and log_addr is None:
        # Without a ring log address the used ring is logged where it lies.
        log_addr = addrs[0] if packed else addrs[2]
    try:
        if packed:
            check_packed_base(position.encode(packed=True), size)
            if position.used_idx >= size:
                raise ValueError(f"packed ring used slot {position.used_idx} beyond {size}")
            areas = PackedLayout(size).map(space, *addrs)
        else:
            check_split_base(position.avail_idx)
            areas = SplitLayout(size).map(space, *addrs)
    except ValueError as exc:
        raise RingSetupError(f"vring {index}: {exc}") from exc
    return RingSpec(
        index, size, packed, event_idx, indirect, areas, position, space, notifiers,
        dirty_log, log_addr, inflight, bool(features & VirtioFeature.IN_ORDER),
    )  # fmt: skip
