"""The back-end's device interface: what a device author implements.

Theory of operation (vhost-user spec, "Ring states"): a vring is *started*
when its kick fd arrives (or its first kick, in polling mode) and *stopped*
by GET_VRING_BASE; it is separately *enabled* or *disabled*.  The back-end
connection (:mod:`pyvdpa.vhost_user.backend`) keeps that state in a
:class:`Vring`, builds the device-side queue object over guest memory, and
calls the device:

* :meth:`VhostUserDevice.start_queue` once the ring is started, enabled and
  fully configured (size, addresses inside the memory table, memory mapped);
* :meth:`VhostUserDevice.stop_queue` before anything the ring depends on
  changes (disable, GET_VRING_BASE, a new memory table, reset, disconnect).
  When it returns the device no longer touches the ring; the back-end then
  reads the exact next avail index from the queue.

Devices process rings on threads of their own; :class:`ThreadedDevice` is
the simple slow path (one Python thread per running queue, woken by the kick
eventfd or an in-band VRING_KICK).  A compiled data-plane engine implements
the same two calls.

A device takes chains with :meth:`Vring.pop`, completes them with
:meth:`Vring.push` and interrupts the driver with :meth:`Vring.notify`; the
vring records them in the inflight region (vhost-user spec, "Inflight I/O
tracking") and signals through the call eventfd or, with in-band
notifications and no eventfd (spec, "In-band notifications"), a VRING_CALL
message that the device thread waits to see acknowledged.

IOMMU (vhost-user spec, "IOMMU support"): a device whose
:attr:`VhostUserDevice.access_platform` is true is offered with
``VIRTIO_F_ACCESS_PLATFORM``.  Once negotiated, every ring address is an
I/O virtual address: :attr:`Vring.iotlb` is set, :attr:`Vring.space`
translates through it, and a chain whose buffers have no translation yet
raises :class:`~pyvdpa.errors.IotlbMissError` from :meth:`Vring.pop`
without being consumed.  The device then calls
:meth:`Vring.request_translation` (an IOTLB MISS to the front-end, once per
outstanding address) and retries after :meth:`VhostUserDevice.iotlb_updated`.
An invalidation never reaches a running ring: the back-end stops the rings,
invalidates, and starts them again (``stop_queue`` then ``start_queue``).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvdpa.errors import IotlbMissError, PyvdpaError, RingError
from pyvdpa.memory import DirtyLog, GuestMemory, Iotlb
from pyvdpa.vhost_user.inflight import (
    InflightChain,
    InflightDescriptor,
    PackedInflightQueue,
    SplitInflightQueue,
)
from pyvdpa.vhost_user.protocol import BackendRequest, ProtocolFeature
from pyvdpa.virtio.packed import PackedDeviceQueue
from pyvdpa.virtio.ring import AddressSpace, DescriptorChain, DescriptorIndexError, DeviceQueue
from pyvdpa.virtio.split import SplitDeviceQueue

__all__ = [
    "InbandSender",
    "ThreadedDevice",
    "UnsupportedRequestError",
    "VhostUserDevice",
    "Vring",
]

#: Sends an in-band notification (VRING_CALL or VRING_ERR) for a vring index
#: over the back-end channel and waits for the front-end to process it.
InbandSender = Callable[[BackendRequest, int], None]

log = logging.getLogger(__name__)


class UnsupportedRequestError(PyvdpaError):
    """The device does not implement an optional request (e.g. GET_CONFIG)."""


@dataclass(eq=False)
class Vring:
    """Back-end state of one virtqueue.

    ``queue`` is the device-side ring (split or packed) while the ring runs,
    ``None`` otherwise.  ``kick_fd`` is ``None`` in polling mode (the
    front-end set the NOFD bit), with in-band kicks, or before
    SET_VRING_KICK; ``call_fd`` and ``err_fd`` are ``None`` when the
    front-end gave none, and then with :attr:`inband` set the ring signals
    with VRING_CALL / VRING_ERR messages.
    """

    index: int
    #: Who the ring belongs to in log lines (the back-end's socket path).
    label: str = "vhost-user"
    num: int = 0
    base: int = 0
    started: bool = False
    enabled: bool = False
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    queue: DeviceQueue | None = None
    broken: bool = False
    #: While running: guest memory, negotiated features and the ring's
    #: device addresses (descriptor table, driver area, device area) for data
    #: planes that walk the ring themselves instead of using ``queue``.  The
    #: addresses are guest-physical, or I/O virtual when ``iotlb`` is set.
    memory: GuestMemory | None = None
    features: int = 0
    ring_addrs: tuple[int, int, int] = (0, 0, 0)
    #: The dirty log and the device-address at which ring writes are logged
    #: (an IOVA with ``iotlb``: translate through it, as ``queue`` does).
    dirty_log: DirtyLog | None = None
    log_addr: int | None = None
    #: While running: the IOTLB when VIRTIO_F_ACCESS_PLATFORM was negotiated
    #: (``None`` otherwise), and the address space every device address of
    #: this ring goes through (an ``IotlbAddressSpace``, or ``memory``).
    iotlb: Iotlb | None = None
    space: AddressSpace | None = None
    #: Sends an IOTLB MISS for (iova, write); set by the back-end connection.
    translation_requester: Callable[[int, bool], None] | None = field(default=None, repr=False)
    #: Inflight I/O tracking (GET/SET_INFLIGHT_FD), and what a previous
    #: back-end took but never completed, to serve first: split heads or
    #: packed chains.  Set with :meth:`track_inflight`.
    inflight: SplitInflightQueue | PackedInflightQueue | None = None
    resubmit: list[int | InflightChain] = field(default_factory=list)
    #: With in-band notifications negotiated: how VRING_CALL / VRING_ERR reach
    #: the front-end when it gave no call (err) eventfd.
    inband: InbandSender | None = None
    _call_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Packed rings: the inflight entry of each buffer id in flight.
    _entries: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def running(self) -> bool:
        """Started, enabled and configured: the device may process it."""
        return self.queue is not None

    def track_inflight(
        self,
        tracker: SplitInflightQueue | PackedInflightQueue | None,
        pending: Sequence[int | InflightChain] = (),
    ) -> None:
        """Record taken and completed chains in ``tracker``; serve ``pending`` first."""
        self.inflight = tracker
        self.resubmit = list(pending)
        self._entries = {}

    def pop(self) -> DescriptorChain | None:
        """The next chain to serve: resubmitted ones first, then the avail ring.

        With inflight tracking, the chain is recorded as in flight in the
        shared region before the device touches it.
        """
        queue = self.queue
        assert queue is not None
        tracker = self.inflight
        if isinstance(queue, PackedDeviceQueue) and isinstance(tracker, PackedInflightQueue):
            return self._pop_packed(queue, tracker)
        if self.resubmit and isinstance(queue, SplitDeviceQueue):
            # Taken off the list only once walked: a missing IOTLB
            # translation leaves it to be tried again.
            head = self.resubmit[0]
            assert isinstance(head, int)
            resubmitted = queue.resubmit(head)
            self.resubmit.pop(0)
            return resubmitted
        chain = queue.pop()
        if chain is not None and isinstance(tracker, SplitInflightQueue):
            tracker.mark_inflight(chain.id)
        return chain

    def _pop_packed(
        self, queue: PackedDeviceQueue, tracker: PackedInflightQueue
    ) -> DescriptorChain | None:
        if self.resubmit:
            pending = self.resubmit[0]
            assert isinstance(pending, InflightChain)
            raw = [(d.addr, d.len, d.id, d.flags) for d in pending.descriptors]
            chain = queue.resubmit(raw)
            # Off the list only once walked, as for split rings.
            self.resubmit.pop(0)
            entry = pending.entry
        else:
            first = queue.avail_position
            popped = queue.pop()
            if popped is None:
                return None
            chain = popped
            copies = queue.ring_descriptors(first, chain.desc_count)
            entry = tracker.mark_inflight([InflightDescriptor(*desc) for desc in copies])
        if chain.id in self._entries:
            # Two chains under one buffer id could not be told apart on completion.
            raise DescriptorIndexError(f"buffer id {chain.id} is already in flight")
        self._entries[chain.id] = entry
        return chain

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Complete ``chain``; with inflight tracking, in the spec's batch order."""
        queue = self.queue
        assert queue is not None
        tracker = self.inflight
        if isinstance(queue, SplitDeviceQueue) and isinstance(tracker, SplitInflightQueue):
            tracker.record_batch((chain.id,))
            queue.push(chain, written)
            tracker.commit_batch((chain.id,), queue.used_idx)
        elif isinstance(queue, PackedDeviceQueue) and isinstance(tracker, PackedInflightQueue):
            entry = self._entries.pop(chain.id, None)
            if entry is None:
                raise ValueError(f"push of buffer {chain.id}, which is not in flight")
            used_idx, used_wrap = queue.used_position_after(chain)
            tracker.record_batch((entry,), used_idx, used_wrap)
            queue.push(chain, written)
            tracker.commit_batch((entry,))
        else:
            queue.push(chain, written)

    def request_translation(self, iova: int, write: bool) -> None:
        """Ask the front-end for the IOTLB entry of ``iova`` (thread-safe).

        Sends one IOTLB MISS per outstanding address; the answer is an
        UPDATE, after which :meth:`VhostUserDevice.iotlb_updated` is called.
        """
        requester = self.translation_requester
        if requester is not None:
            requester(iova, write)

    def signal_call(self) -> None:
        """Interrupt the driver unconditionally.

        The call eventfd is written if the front-end gave one; otherwise, with
        in-band notifications negotiated, VRING_CALL is sent and this returns
        once the front-end has processed it.
        """
        with self._call_lock:
            fd = self.call_fd
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.eventfd_write(fd, 1)
                return
        # Outside the lock: SET_VRING_CALL must not wait for a front-end's reply.
        self._send_inband(BackendRequest.VRING_CALL)

    def _send_inband(self, request: BackendRequest) -> None:
        send = self.inband
        if send is None:
            return
        try:
            send(request, self.index)
        except PyvdpaError as exc:
            # A device thread must go on: a front-end that left is noticed
            # by the connection itself.
            log.warning(
                "%s: vring %d: %s not delivered: %s", self.label, self.index, request.name, exc
            )

    def dup_call_fd(self) -> int | None:
        """A duplicate of the call eventfd, for a data plane that signals it itself.

        Taken under the lock that guards the fd's replacement, so it never
        duplicates an fd that SET_VRING_CALL is closing.
        """
        with self._call_lock:
            return None if self.call_fd is None else os.dup(self.call_fd)

    def notify(self) -> None:
        """Interrupt the driver if the ring's notification suppression allows it."""
        queue = self.queue
        if queue is not None and queue.should_notify():
            self.signal_call()

    def fail(self, error: RingError) -> None:
        """Mark the ring broken after a hostile ring was found; tell the front-end."""
        if not self.broken:
            log.error("%s: vring %d broken: %s", self.label, self.index, error)
        self.broken = True
        fd = self.err_fd
        if fd is None:
            self._send_inband(BackendRequest.VRING_ERR)
            return
        with contextlib.suppress(OSError):
            os.eventfd_write(fd, 1)

    def close_fds(self) -> None:
        """Close every fd the ring holds."""
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)


class VhostUserDevice(abc.ABC):
    """A device served over vhost-user.

    Subclasses give their capabilities (:attr:`features`,
    :attr:`protocol_features`, :attr:`num_queues`) and process rings between
    :meth:`start_queue` and :meth:`stop_queue`.  Optional requests raise
    :class:`UnsupportedRequestError` by default.
    """

    #: virtio feature bits the device offers (device-specific and generic).
    features: int = 0
    #: protocol features the device wants offered (masked by what the back-end implements).
    protocol_features: ProtocolFeature = ProtocolFeature(0)
    #: number of virtqueues.
    num_queues: int = 1
    #: largest ring size accepted.
    max_queue_size: int = 32768
    #: whether the device can work behind an IOMMU: ring and buffer addresses
    #: as IOVAs through :attr:`Vring.space`, :class:`IotlbMissError` handled
    #: by requesting the translation and retrying.  Offers ACCESS_PLATFORM.
    access_platform: bool = False

    def set_features(self, features: int) -> None:  # noqa: B027 - optional hook
        """The front-end acknowledged ``features`` (a subset of :attr:`features`)."""

    def vring_state_changed(self, vring: Vring, enabled: bool) -> None:  # noqa: B027
        """``vring`` was enabled or disabled (every change, started or not)."""

    @abc.abstractmethod
    def start_queue(self, vring: Vring) -> None:
        """Begin processing ``vring`` (its ``queue`` is set)."""

    @abc.abstractmethod
    def stop_queue(self, vring: Vring) -> None:
        """Stop processing ``vring``; when this returns the ring is not touched."""

    def kick(self, vring: Vring) -> None:  # noqa: B027 - optional hook
        """An in-band kick (VRING_KICK) arrived for a running ring."""

    def iotlb_updated(self) -> None:  # noqa: B027 - optional hook
        """IOTLB entries were added (an UPDATE): retry work that missed a translation.

        Called on the connection's thread after the entries are in place and
        rings that were waiting for them have started.
        """

    def iotlb_invalidate(self, iova: int, size: int, invalidate: Callable[[], None]) -> bool:
        """Apply an IOTLB INVALIDATE of ``[iova, iova + size)`` without restarting rings.

        A device whose data path can drop translations in place calls
        ``invalidate`` once none of its queues can be using them, rebuilds
        what it holds, and returns True.  The default returns False: the
        back-end then stops the running rings, invalidates and restarts them.
        """
        return False

    def get_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of the device config space at ``offset``."""
        raise UnsupportedRequestError("device has no config space")

    def set_config(self, offset: int, data: bytes) -> None:
        """Write the device config space."""
        raise UnsupportedRequestError("device config space is read-only")

    def send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` after migration (SEND_RARP)."""
        raise UnsupportedRequestError("device does not send RARP")

    def set_mtu(self, mtu: int) -> None:
        """The front-end set the MTU (NET_SET_MTU)."""
        raise UnsupportedRequestError("device has no MTU")

    def reset(self) -> None:  # noqa: B027 - optional hook
        """All queues are stopped and the device returns to its initial state."""


class ThreadedDevice(VhostUserDevice):
    """A device whose queues are served by Python threads (the slow path).

    One thread per running queue waits on the kick eventfd (or polls when
    the front-end gave none) and calls :meth:`process` with the ring; an
    in-band kick (VRING_KICK) wakes it.  A :class:`RingError` raised from
    :meth:`process` breaks only that ring.  An :class:`IotlbMissError`
    requests the translation; the worker then sleeps until the next IOTLB
    update (or a stop) and calls :meth:`process` again.  ``process`` must
    leave its work resumable at a miss: a chain that missed is not consumed,
    and anything already taken is completed.
    """

    #: seconds between polls of a ring without a kick fd.
    poll_interval: float = 0.001

    def __init__(self) -> None:
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()

    @abc.abstractmethod
    def process(self, vring: Vring) -> None:
        """Drain available buffers of ``vring`` (called on its worker thread)."""

    def start_queue(self, vring: Vring) -> None:
        """Start a worker thread for ``vring``."""
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        thread = threading.Thread(
            target=self._run, args=(vring, stop_r, wake), name=f"vring-{vring.index}", daemon=True
        )
        with self._lock:
            self._workers[vring.index] = _Worker(thread, stop_r, stop_w, wake)
        thread.start()

    def stop_queue(self, vring: Vring) -> None:
        """Stop the worker of ``vring`` and wait for it."""
        with self._lock:
            worker = self._workers.pop(vring.index, None)
        if worker is None:
            return
        os.write(worker.stop_w, b"x")
        if worker.thread is not threading.current_thread():
            worker.thread.join()
        for fd in (worker.stop_r, worker.stop_w, worker.wake):
            os.close(fd)

    def kick(self, vring: Vring) -> None:
        """Wake the ring's worker: only it may process the ring."""
        with self._lock:
            worker = self._workers.get(vring.index)
            if worker is not None:
                os.eventfd_write(worker.wake, 1)

    def iotlb_updated(self) -> None:
        """Wake every worker: one waiting for a translation may find it now."""
        with self._lock:
            for worker in self._workers.values():
                os.eventfd_write(worker.wake, 1)

    def _drain(self, vring: Vring) -> bool:
        """Process the ring; return True when it stopped at a missing translation."""
        if vring.broken or vring.queue is None:
            return False
        try:
            self.process(vring)
        except IotlbMissError as miss:
            vring.request_translation(miss.iova, miss.write)
            return True
        except RingError as exc:
            vring.fail(exc)
        return False

    def _run(self, vring: Vring, stop_r: int, wake: int) -> None:
        poller = select.poll()
        poller.register(stop_r, select.POLLIN)
        poller.register(wake, select.POLLIN)
        kick = vring.kick_fd
        if kick is not None:
            poller.register(kick, select.POLLIN)
        # While a translation is missing only a wake-up (an IOTLB update, an
        # in-band kick) or a stop helps: kicks would just miss again.
        waiter = select.poll()
        waiter.register(stop_r, select.POLLIN)
        waiter.register(wake, select.POLLIN)
        timeout_ms = None if kick is not None else max(1, int(self.poll_interval * 1000))
        missed = self._drain(vring)
        while True:
            events = waiter.poll() if missed else poller.poll(timeout_ms)
            if any(fd == stop_r for fd, _ in events):
                return
            for fd, _ in events:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(fd, 8)
            missed = self._drain(vring)


@dataclass(frozen=True, slots=True)
class _Worker:
    """A queue's worker thread, its stop pipe and its wake-up eventfd (kicks, IOTLB updates)."""

    thread: threading.Thread
    stop_r: int
    stop_w: int
    wake: int
