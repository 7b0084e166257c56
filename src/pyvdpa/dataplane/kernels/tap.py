"""The ``tap`` program: a virtio-net queue pair wired to one queue of a TAP interface.

Theory of operation
-------------------
The unit's fd (``U_FD``) is its TAP queue.  A transmitted frame goes to the
TAP with one ``writev`` straight from the guest's buffers, the virtio-net
header skipped; a TAP that refuses it (full, or detached) drops it, as a wire
would, and the chain is completed either way.

A received frame is read with one ``readv`` straight into the next receive
chain, past the header, with the unit's bounce buffer as the last iovec: a
frame that fits the chain never leaves guest memory, and the device writes
the header (``num_buffers`` 1).  A longer frame is collected in the bounce
buffer and delivered by the general rules of section 5.1.6.3
(:func:`~pyvdpa.dataplane.kernels.net.rx_deliver`: several chains with
``MRG_RXBUF``, dropped without), and waits there (``U_PENDING``) while too
few chains are available.  Reading stops when no receive chain waits, so the
TAP's kernel queue holds the frames meanwhile, or when the TAP has none
left.  The receive queue's ``Q_ARM`` tells the worker what to wait for
before it sleeps: new receive buffers (a kick) when frames may wait, the TAP
(its fd in the worker's epoll set, edge-triggered) when it ran dry.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import kernel
from pyvdpa.dataplane.kernels.intrinsics import Table, readv, writev
from pyvdpa.dataplane.kernels.layout import (
    EMPTY,
    ERROR,
    Unit,
    Worker,
    chains_at,
    held_at,
    iovecs_at,
    queue_at,
    segments_at,
    stats_at,
    unit_at,
    worker_at,
)
from pyvdpa.dataplane.kernels.net import (
    BROKEN,
    NO_BUFFER,
    frame_length,
    give_back,
    rx_deliver,
    take_burst,
    write_header,
)
from pyvdpa.dataplane.kernels.ring import complete, count_error, push, ring_pop, unpop
from pyvdpa.dataplane.kernels.segments import gather, log_segments

__all__ = ["tap_program", "tap_receive", "tap_send", "tap_transmit"]


@kernel
def tap_send(fd: int, segs: Table, first: int, end: int, offset: int, w: Worker) -> int:
    """Write segments [first, end), from stream ``offset`` on, to ``fd`` as one frame.

    One ``writev`` straight from guest memory, through the worker's iovecs;
    returns its result, -1 when the frame has more pieces than one call takes.
    """
    iov = iovecs_at(w.iov, w.iov_len)
    n = 0
    for i in range(first, end):
        length = segs[i].length
        if offset >= length:
            offset -= length
            continue
        if n == iov.shape[0]:
            return -1
        iov[n].base = segs[i].host + offset
        iov[n].length = length - offset
        offset = 0
        n += 1
    return writev(fd, w.iov, n)


@kernel
def tap_transmit(u: Unit, w: Worker) -> int:
    """Send a burst of transmitted frames to the unit's TAP."""
    txa = u.txq
    if txa == 0:
        return 0
    txq = queue_at(txa)
    if txq.error:
        return 0
    segs = segments_at(w.segs_t, w.segs_t_len)
    chains = chains_at(w.chains, w.chains_len)
    count = take_burst(u, txq, segs, chains)
    if count == 0:
        return 0
    stats = stats_at(txq.stats)
    hdr = u.hdr
    for c in range(count):
        chain = chains[c]
        # A full TAP (EAGAIN) or one that refuses the frame drops it, as a wire would.
        first = chain.first
        if (
            frame_length(stats, chain, hdr) >= 0
            and tap_send(u.fd, segs, first, first + chain.nread, hdr, w) <= 0
        ):
            stats.dropped += 1
        give_back(txq, stats, chain)
    complete(txq)
    return count


@kernel
def tap_receive(u: Unit, w: Worker) -> int:
    """Move a burst of frames from the unit's TAP into receive chains.

    Each frame is read with one ``readv``: straight into the next chain,
    past its header, and into the bounce buffer beyond the chain's end.  A
    frame that spilled over waits in the bounce buffer until the general
    delivery (section 5.1.6.3) finds chains for it.
    """
    rxa = u.rxq
    if rxa == 0:
        return 0
    rxq = queue_at(rxa)
    if rxq.error:
        return 0
    segs = segments_at(w.segs_r, w.segs_r_len)
    held = held_at(w.held, w.held_len)
    iov = iovecs_at(w.iov, w.iov_len)
    stats = stats_at(rxq.stats)
    fd = u.fd
    hdr = u.hdr
    bounce = u.bounce
    bounce_len = u.bounce_len
    limit = u.burst
    done = 0
    while done < limit:
        pending = u.pending
        if pending:
            result = rx_deliver(rxq, u, segs, held, w.zeros, segs, 0, 0, 0, bounce, pending)
            if result == NO_BUFFER:
                rxq.arm = 1
                break
            if result == BROKEN:
                break
            u.pending = 0
            done += 1
            continue
        status, ident, nseg, nread, _, wlen, dc = ring_pop(rxq, segs, 0)
        if status == EMPTY:
            # Frames may be waiting in the TAP: new buffers are work now.
            rxq.arm = 1
            break
        if status == ERROR:
            count_error(rxq)
            break
        # Straight into the chain when its first buffer holds the header and
        # one call takes its buffers; otherwise through the bounce buffer.
        room = wlen - hdr
        direct = room >= 0 and segs[nread].length >= hdr and nseg - nread < iov.shape[0]
        count = 0
        if direct:
            offset = hdr
            for i in range(nread, nseg):
                length = segs[i].length
                if length > offset:
                    iov[count].base = segs[i].host + offset
                    iov[count].length = length - offset
                    count += 1
                offset = max(offset - length, 0)
        else:
            room = 0
        if room < bounce_len:
            iov[count].base = bounce + room
            iov[count].length = bounce_len - room
            count += 1
        got = readv(fd, w.iov, count)
        if got <= 0:
            unpop(rxq, 1, dc)
            # The TAP ran dry (or is detached): its next frame wakes the worker.
            rxq.arm = 0
            break
        done += 1
        if got > max(room, bounce_len):
            # The kernel cut the frame to the buffers it was given.
            unpop(rxq, 1, dc)
            stats.dropped += 1
            continue
        if direct and got <= room:
            write_header(segs[nread].host, hdr, 1)
            log_segments(rxq, segs, nread, nseg, hdr + got)
            push(rxq, ident, hdr + got, dc, wlen)
            stats.received_desc += 1
            stats.completed_desc += 1
            stats.packets += 1
            stats.bytes += got
            continue
        if direct:
            # Join the frame's head, which the chain holds, to its tail in the bounce buffer.
            gather(bounce, segs, nread, nseg, hdr, room)
        unpop(rxq, 1, dc)
        u.pending = got
    complete(rxq)
    return done


@kernel
def tap_program(unit: int, worker: int) -> int:
    """The ``tap`` program: one pass over the unit at ``unit``; the work done."""
    u = unit_at(unit)
    w = worker_at(worker)
    return tap_receive(u, w) + tap_transmit(u, w)
