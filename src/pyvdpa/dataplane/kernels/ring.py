"""A virtqueue's device side, whatever its layout: the steps the programs and Python call.

Theory of operation
-------------------
A queue row says whether the ring is split (section 2.7) or packed (section
2.8); each step here checks and hands over to
:mod:`~pyvdpa.dataplane.kernels.split` or
:mod:`~pyvdpa.dataplane.kernels.packed`, whose per-layout code is inlined.

* :func:`ring_pop` takes the next available chain, validated, unless the
  queue is broken (``Q_ERROR``) or stalled on a missing IOTLB translation
  (``Q_STALLED``, read atomically: the control plane clears it).
* :func:`push` returns a chain; nothing is visible to the driver before
  :func:`publish`, which the programs call once per burst.
* :func:`should_notify` decides whether the driver wants an interrupt for
  what was published since the last decision; :func:`complete` publishes
  and signals the call eventfd accordingly.
* :func:`disable_notification` / :func:`enable_notification` are the
  device's side of event suppression, for a worker going to sleep and coming
  back: re-enabling is followed by a fence and a re-check, so that a buffer
  the driver added before it could see the request is not missed.

Python drives the same steps one by one through
:class:`pyvdpa.dataplane.queues.CompiledQueue`: the entry points take a queue
as its record or as the ``int64`` row Python holds, and a segment table as
records or as an ``int64[n, 4]`` array.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels import packed, split
from pyvdpa.dataplane.kernels.cache import inlined, kernel
from pyvdpa.dataplane.kernels.intrinsics import (
    Table,
    eventfd_signal,
    fence,
    load_relaxed,
)
from pyvdpa.dataplane.kernels.layout import (
    E_BUFFER,
    E_TOO_BIG,
    E_TOO_MANY,
    EMPTY,
    ERROR,
    Int64Row,
    Int64Table,
    Popped,
    Queue,
    queue_of,
    segments_of,
    stats_at,
)

__all__ = [
    "complete",
    "count_error",
    "disable_notification",
    "enable_notification",
    "prefetch_avail",
    "publish",
    "push",
    "ring_pop",
    "should_notify",
    "unpop",
]


@inlined
def ring_pop(queue: Queue | Int64Row, segments: Table | Int64Table, base: int) -> Popped:
    """Pop and validate the next available chain.

    Returns ``(status, id, segments, readable segments, readable bytes,
    writable bytes, desc_count)``: status POPPED, EMPTY, or ERROR when the
    queue is (or just became) broken; nothing is consumed then.  A queue
    stalled on a missing translation is EMPTY until the control plane clears
    ``Q_STALLED``; the chain that missed is walked again from the start.  The
    segments go to ``segments`` rows from ``base`` on, readable ones first.
    """
    q = queue_of(queue)
    segs = segments_of(segments)
    if q.error:
        return (ERROR, 0, 0, 0, 0, 0, 0)
    if load_relaxed(q, "stalled"):
        return (EMPTY, 0, 0, 0, 0, 0, 0)
    if q.packed:
        return packed.pop(q, segs, base)
    return split.pop(q, segs, base)


@kernel
def unpop(q: Queue, count: int, slots: int) -> None:
    """Give back the last ``count`` chains popped (``slots`` ring slots), unused and unpushed."""
    if q.packed:
        packed.unpop(q, slots)
    else:
        split.unpop(q, count, slots)
    q.inflight -= count


@inlined
def push(queue: Queue | Int64Row, ident: int, written: int, desc_count: int, writable: int) -> None:
    """Return a chain: write its used element (split) or record its used descriptor (packed).

    Nothing is visible to the driver before :func:`publish`, once per burst.
    ``writable`` is the chain's writable bytes: with VIRTIO_F_IN_ORDER, a
    chain whose every writable byte was written (none for a read-only chain)
    may share the used entry of the next chain pushed
    (:func:`pyvdpa.virtio.ring.used_completely`).
    """
    q = queue_of(queue)
    whole = written == writable
    if q.packed:
        packed.push(q, ident, written, desc_count, whole)
    else:
        split.push(q, ident, written, whole)
    q.inflight -= 1


@kernel
def publish(queue: Queue | Int64Row) -> None:
    """Make the chains pushed since the last call visible to the driver.

    Split: one release store of ``used.idx``.  Packed: the recorded used
    descriptors are written, the first one's flags last, so the driver
    takes the whole batch at once.
    """
    q = queue_of(queue)
    n = q.unpublished
    if n == 0:
        return
    q.unpublished = 0
    q.batch_open = 0
    if q.packed:
        packed.publish(q, n)
    else:
        split.publish(q)


@kernel
def should_notify(queue: Queue | Int64Row) -> bool:
    """Whether the driver wants a used-buffer notification for the pushes since the last call.

    Those pushes count as signalled whatever the answer, as in
    :meth:`pyvdpa.virtio.split.SplitDeviceQueue.should_notify`.
    """
    q = queue_of(queue)
    pushed = q.unsignalled
    if pushed == 0:
        return False
    q.unsignalled = 0
    # The driver may have changed its suppression after our publish.
    fence()
    if q.packed:
        return packed.wants_interrupt(q, pushed)
    return split.wants_interrupt(q, pushed)


@kernel
def disable_notification(queue: Queue | Int64Row) -> None:
    """Ask the driver not to kick (NO_NOTIFY, a held-back ``avail_event``, or DISABLE)."""
    q = queue_of(queue)
    q.notify = 0
    if q.packed:
        packed.disable(q)
    else:
        split.disable(q)


@kernel
def enable_notification(queue: Queue | Int64Row) -> bool:
    """Ask the driver to kick for new buffers; return True if some arrived already."""
    q = queue_of(queue)
    q.notify = 1
    if q.packed:
        packed.enable(q)
    else:
        split.enable(q)
    # The driver may have added a buffer before it could see the request.
    fence()
    if q.packed:
        return packed.head_available(q)
    return split.head_available(q)


@kernel
def prefetch_avail(q: Queue, count: int) -> None:
    """Start loading the first buffer line of the next ``count`` available chains, for writing.

    A hint only: nothing is consumed and nothing validated; an address
    outside guest memory is skipped.
    """
    if q.packed:
        packed.prefetch(q, count)
    else:
        split.prefetch(q, count)


@kernel
def complete(q: Queue) -> None:
    """Publish a burst's used entries and interrupt the driver if it asked."""
    publish(q)
    if q.error == 0 and should_notify(q):
        fd = load_relaxed(q, "call_fd")
        if fd >= 0:
            eventfd_signal(fd)
            stats_at(q.stats).calls += 1


@kernel
def count_error(q: Queue) -> None:
    """Count a ring error under the DPDK counter that names it."""
    stats = stats_at(q.stats)
    code = q.error
    if code in (E_TOO_MANY, E_TOO_BIG):
        stats.exceed_max_chain += 1
    elif code == E_BUFFER:
        stats.invalid_buffer += 1
    else:
        stats.bad_desc_errors += 1
