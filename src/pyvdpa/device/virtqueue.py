"""Python queues on a ring description, and the threaded slow-path device.

Theory of operation: a Python device builds a :class:`Virtqueue` from the
:class:`~pyvdpa.device.ring.RingSpec` its ``start_queue`` receives.  The
virtqueue owns the device side of the ring (a
:class:`~pyvdpa.virtio.split.SplitDeviceQueue` or
:class:`~pyvdpa.virtio.packed.PackedDeviceQueue` over the spec's mapped
areas) and is what device code calls: :meth:`Virtqueue.pop`,
:meth:`Virtqueue.push`, :meth:`Virtqueue.notify`, :meth:`Virtqueue.fail`.

Inflight I/O tracking (vhost-user spec, "Inflight I/O tracking"): with an
inflight record in the spec, every chain taken and completed is recorded
in the shared region in the spec's batch order — split rings by head,
packed rings as copies of their ring descriptors, keyed by buffer id — and
what a previous device took but never completed is served first.

:class:`ThreadedDevice` runs each queue on a Python thread woken by the
kick eventfd (or polling without one) or by :meth:`ThreadedDevice.kick`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import select
import threading
from dataclasses import dataclass

from pyvdpa.device.inflight import (
    InflightChain,
    InflightDescriptor,
    PackedInflightQueue,
    SplitInflightQueue,
)
from pyvdpa.device.interface import Device, QueueNotRunningError
from pyvdpa.device.ring import RingPosition, RingSetupError, RingSpec
from pyvdpa.errors import GuestMemoryError, IotlbMissError, RemoteProtocolError, RingError
from pyvdpa.virtio.packed import PackedDeviceQueue
from pyvdpa.virtio.ring import DescriptorChain, DescriptorIndexError
from pyvdpa.virtio.split import SplitDeviceQueue

__all__ = ["ThreadedDevice", "Virtqueue"]

log = logging.getLogger(__name__)


class Virtqueue:
    """The device side of a running ring, with inflight tracking, built from a spec.

    Raises :class:`~pyvdpa.device.ring.RingSetupError` when the inflight
    record cannot describe a consistent restart.
    """

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.notifiers = spec.notifiers
        self.label = spec.notifiers.label
        queue_type = PackedDeviceQueue if spec.packed else SplitDeviceQueue
        self.queue: SplitDeviceQueue | PackedDeviceQueue = queue_type.on_areas(
            spec.space, spec.areas, spec.size,
            event_idx=spec.event_idx, indirect=spec.indirect, base=spec.base,
            log=spec.logger, log_addr=spec.log_addr, in_order=spec.in_order,
        )  # fmt: skip
        self.inflight: SplitInflightQueue | PackedInflightQueue | None = None
        self.resubmit: list[int | InflightChain] = []
        # Packed rings: the inflight entry of each buffer id in flight.
        self._entries: dict[int, int] = {}
        try:
            self._recover(spec.inflight)
        except (RemoteProtocolError, GuestMemoryError) as exc:
            raise RingSetupError(str(exc)) from exc

    def _recover(self, tracker: SplitInflightQueue | PackedInflightQueue | None) -> None:
        queue = self.queue
        pending: list[int] | list[InflightChain]
        if isinstance(tracker, SplitInflightQueue) and isinstance(queue, SplitDeviceQueue):
            pending = tracker.recover(queue.used_idx)
        elif isinstance(tracker, PackedInflightQueue) and isinstance(queue, PackedDeviceQueue):
            pending = tracker.recover(queue.slot_used)
            ids = [chain.descriptors[-1].id for chain in pending]
            if len(set(ids)) != len(ids):
                raise RingSetupError("inflight buffer: two chains in flight share a buffer id")
            if pending:
                slots = sum(len(chain.descriptors) for chain in pending)
                queue.resume_inflight(
                    tracker.used_idx, tracker.used_wrap_counter, len(pending), slots
                )
            else:
                tracker.restart_at(*queue.used_position)
        else:
            return
        self.inflight = tracker
        self.resubmit = list(pending)
        if pending:
            log.info(
                "%s: vring %d resubmits %d in-flight requests",
                self.label, self.index, len(pending),
            )  # fmt: skip

    @property
    def kick_fd(self) -> int | None:
        """The kick eventfd the ring's worker waits on, if any."""
        return self.notifiers.kick_fd

    @property
    def broken(self) -> bool:
        """Whether the ring was found broken."""
        return self.notifiers.broken or self.queue.broken

    def position(self) -> RingPosition:
        """Where the ring stands (chains in flight count as consumed)."""
        return RingPosition.decode(self.queue.base, packed=self.spec.packed)

    def pop(self) -> DescriptorChain | None:
        """The next chain to serve: resubmitted ones first, then the available ring.

        With inflight tracking, the chain is recorded as in flight in the
        shared region before the device touches it.
        """
        queue = self.queue
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

    def notify(self) -> None:
        """Interrupt the driver if the ring's notification suppression allows it."""
        if self.queue.should_notify():
            self.notifiers.signal_call()

    def signal_call(self) -> None:
        """Interrupt the driver unconditionally."""
        self.notifiers.signal_call()

    def fail(self, error: RingError) -> None:
        """Mark the ring broken after a hostile ring was found; tell the driver."""
        self.notifiers.fail(error)

    def request_translation(self, iova: int, write: bool) -> None:
        """Ask for the IOTLB translation of ``iova``; the device retries after an update."""
        self.notifiers.request_translation(iova, write)


class ThreadedDevice(Device):
    """A device whose queues are served by Python threads (the slow path).

    One thread per running queue waits on the kick eventfd (or polls when
    the driver gave none) and calls :meth:`process` with the ring; a kick
    through the control plane (:meth:`kick`) wakes it.  A :class:`RingError`
    raised from :meth:`process` breaks only that ring.  An
    :class:`IotlbMissError` requests the translation; the worker then sleeps
    until the next IOTLB update (or a stop) and calls :meth:`process` again.
    ``process`` must leave its work resumable at a miss: a chain that missed
    is not consumed, and anything already taken is completed.
    """

    #: seconds between polls of a ring without a kick fd.
    poll_interval: float = 0.001

    def __init__(self) -> None:
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()

    @abc.abstractmethod
    def process(self, ring: Virtqueue) -> None:
        """Drain available buffers of ``ring`` (called on its worker thread)."""

    def start_queue(self, spec: RingSpec) -> None:
        """Build the ring's queue and start a worker thread for it."""
        ring = Virtqueue(spec)
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        thread = threading.Thread(
            target=self._run, args=(ring, stop_r, wake), name=f"vring-{spec.index}", daemon=True
        )
        with self._lock:
            self._workers[spec.index] = _Worker(thread, ring, stop_r, stop_w, wake)
        self.ring_starting(ring)
        thread.start()

    def ring_starting(self, ring: Virtqueue) -> None:
        """``ring`` is built and its worker about to start (device bookkeeping)."""

    def stop_queue(self, index: int) -> RingPosition:
        """Stop the worker of ring ``index``, wait for it, and say where the ring stands."""
        with self._lock:
            worker = self._workers.pop(index, None)
        if worker is None:
            raise QueueNotRunningError(f"ring {index} is not running")
        os.write(worker.stop_w, b"x")
        if worker.thread is not threading.current_thread():
            worker.thread.join()
        for fd in (worker.stop_r, worker.stop_w, worker.wake):
            os.close(fd)
        return worker.ring.position()

    def ring(self, index: int) -> Virtqueue | None:
        """The running ring ``index``, if any."""
        with self._lock:
            worker = self._workers.get(index)
        return None if worker is None else worker.ring

    def kick(self, index: int) -> None:
        """Wake the ring's worker: only it may process the ring."""
        with self._lock:
            worker = self._workers.get(index)
            if worker is not None:
                os.eventfd_write(worker.wake, 1)

    def iotlb_updated(self) -> None:
        """Wake every worker: one waiting for a translation may find it now."""
        with self._lock:
            for worker in self._workers.values():
                os.eventfd_write(worker.wake, 1)

    def _drain(self, ring: Virtqueue) -> bool:
        """Process the ring; return True when it stopped at a missing translation."""
        if ring.broken:
            return False
        try:
            self.process(ring)
        except IotlbMissError as miss:
            ring.request_translation(miss.iova, miss.write)
            return True
        except RingError as exc:
            ring.fail(exc)
        return False

    def _run(self, ring: Virtqueue, stop_r: int, wake: int) -> None:
        poller = select.poll()
        poller.register(stop_r, select.POLLIN)
        poller.register(wake, select.POLLIN)
        kick = ring.kick_fd
        if kick is not None:
            poller.register(kick, select.POLLIN)
        # While a translation is missing only a wake-up (an IOTLB update, a
        # kick through the control plane) or a stop helps: kicks would just
        # miss again.
        waiter = select.poll()
        waiter.register(stop_r, select.POLLIN)
        waiter.register(wake, select.POLLIN)
        timeout_ms = None if kick is not None else max(1, int(self.poll_interval * 1000))
        missed = self._drain(ring)
        while True:
            events = waiter.poll() if missed else poller.poll(timeout_ms)
            if any(fd == stop_r for fd, _ in events):
                return
            for fd, _ in events:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(fd, 8)
            missed = self._drain(ring)


@dataclass(frozen=True, slots=True)
class _Worker:
    """A queue's worker thread, its ring, stop pipe and wake-up eventfd."""

    thread: threading.Thread
    ring: Virtqueue
    stop_r: int
    stop_w: int
    wake: int
