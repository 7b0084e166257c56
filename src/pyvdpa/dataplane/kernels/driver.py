"""The driver side of a virtqueue, compiled: the loops of ``pyvdpa drive net``.

Theory of operation
-------------------
Here the kernels play the driver's part of virtio 1.2 (a guest's virtio-net
driver), on rings a :class:`pyvdpa.drive.session.DriverSession` allocated in
its own shared memory and described to the device.  A driver queue is one
``int64`` row (:data:`DRIVER`): the host addresses of the ring's three
areas, the buffers it sends from, its kick eventfd, the run's deadlines,
and the driver's position in the ring; the kernels see it as a record.

Every descriptor ``i`` is bound to buffer slot ``i`` (``buffers_dev + i *
slot``), which holds the virtio-net header and the frame, written once by
Python: adding a chain writes its descriptor and its available entry,
never the frame.  Two tables of ``size`` words follow the chains:
``free``, a stack of the descriptors not in flight, and ``busy``, the
length of the chain each descriptor heads while it is in flight (0 when it
is not).

:func:`run_queue` loops until the deadline (or ``stop``, or ``limit``
frames): it reclaims the used chains, adds a burst of chains, publishes
them with one release store, and kicks the device when its event
suppression asks for it (section 2.7.10 for split rings, 2.8.10 for
packed).  On a transmit queue (``receive`` 0) the chains are frames; on a
receive queue they are empty buffers the device writes, and each one
returned is counted and checked (:mod:`~pyvdpa.dataplane.kernels.driver_net`)
before it goes back on the ring.  :func:`run_pair` forwards (io mode): a
receive queue whose ``peer`` is a transmit queue copies every frame it takes
into the buffer of one of its peer's free chains, which then goes out.  Interrupts are
suppressed: a polling driver never waits for a call.  Once sending stops
it keeps reclaiming until every chain is back or ``drain_ns`` has passed,
so that the frames counted as sent are the frames the device took.

The device is not trusted: a used entry naming a chain that is not in
flight, a used length beyond the chain's buffer or a used index that moved
past the chains in flight ends the run with the rule broken recorded in
``error`` (a ``DE_*`` code, with two numbers for the message).  Nothing is
read or written outside the ring areas and the tables the row points at.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels import driver_packed, driver_split
from pyvdpa.dataplane.kernels.cache import inlined, kernel
from pyvdpa.dataplane.kernels.driver_row import DriverQueue, driver_of
from pyvdpa.dataplane.kernels.intrinsics import (
    cpu_relax,
    eventfd_signal,
    fence,
    load_relaxed,
    monotonic_ns,
    store_relaxed,
)
from pyvdpa.dataplane.kernels.layout import Int64Row

__all__ = ["run_pair", "run_queue"]


@inlined
def _reclaim(q: DriverQueue) -> int:
    """The used chains taken back (checked, and forwarded by a forwarding queue); -1: broken."""
    return driver_packed.reclaim(q) if q.packed else driver_split.reclaim(q)


@inlined
def _add(q: DriverQueue, count: int) -> None:
    """Add ``count`` chains and kick the device if it asks for it."""
    kick = driver_packed.add(q, count) if q.packed else driver_split.add(q, count)
    if kick and q.kick_fd >= 0:
        eventfd_signal(q.kick_fd)
        q.kicks += 1


@inlined
def _finish(q: DriverQueue) -> None:
    if q.end_ns == 0:
        store_relaxed(q, "end_ns", monotonic_ns())


@kernel
def run_queue(row: Int64Row) -> int:
    """Drive the queue ``row`` until its deadline; return its error code.

    A transmit queue sends frames; a receive queue keeps its ring full of
    buffers and checks the frames that arrive in them.  Python reads the
    counters while this runs; it sets ``stop`` to end the run at once.
    ``end_ns`` is set when sending stops.
    """
    q = driver_of(row)
    q.start_ns = monotonic_ns()
    sending = True
    drain_until = 0
    while True:
        now = monotonic_ns()
        if load_relaxed(q, "stop"):
            break
        if sending and (now >= q.deadline or (q.limit > 0 and q.packets >= q.limit)):
            sending = False
            store_relaxed(q, "end_ns", now)
            drain_until = now + q.drain_ns
        if not sending and (q.inflight == 0 or now >= drain_until):
            break
        got = _reclaim(q)
        if got < 0:
            break
        count = 0
        if sending:
            count = min(q.burst, q.free_top)
            if q.limit > 0:
                count = min(count, q.limit - q.packets)
            if count > 0:
                _add(q, count)
                if not q.receive:
                    q.packets += count
                    q.bytes += count * q.frame_len
        if got == 0 and count <= 0:
            cpu_relax()
    _finish(q)
    # Everything above is visible to the thread that joins this one.
    fence()
    return q.error


@kernel
def run_pair(rx_row: Int64Row, tx_row: Int64Row) -> int:
    """io forwarding on a queue pair until the deadline; return the first error code.

    A first burst of frames goes out (testpmd's ``start tx_first``); then
    every frame received is sent back out, as many per pass as the transmit
    ring has free chains (the rest wait in the receive ring).  The receive
    row's ``peer`` must be the transmit row's address.  Once the deadline
    passes, the transmit ring drains as in :func:`run_queue`.
    """
    rx = driver_of(rx_row)
    tx = driver_of(tx_row)
    rx.start_ns = tx.start_ns = monotonic_ns()
    _add(rx, rx.free_top)
    first = min(tx.burst, tx.free_top)
    _add(tx, first)
    tx.packets += first
    tx.bytes += first * tx.frame_len
    drain_until = 0
    while rx.error == 0 and tx.error == 0 and not load_relaxed(tx, "stop"):
        now = monotonic_ns()
        if drain_until == 0 and now >= tx.deadline:
            store_relaxed(rx, "end_ns", now)
            store_relaxed(tx, "end_ns", now)
            drain_until = now + tx.drain_ns
        if drain_until and (tx.inflight == 0 or now >= drain_until):
            break
        sent = _reclaim(tx)
        if sent < 0 or drain_until:
            continue
        rx.budget = tx.free_top
        got = _reclaim(rx)
        if got < 0:
            break
        if got:
            _add(rx, got)
        staged = tx.staged
        if staged:
            tx.staged = 0
            _add(tx, staged)
            tx.packets += staged
        if sent == 0 and got == 0:
            cpu_relax()
    _finish(rx)
    _finish(tx)
    fence()
    return rx.error or tx.error
