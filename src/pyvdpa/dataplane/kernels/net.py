"""The virtio-net programs: ``loopback``, ``drop`` and ``gen``, and receive delivery.

Theory of operation
-------------------
A net *unit* (the ``U_*`` row) is one virtio-net queue pair run by one
worker.  Each program is one pass over a unit, a bounded burst per queue:

* ``loopback`` copies each transmitted frame straight from the TX buffers
  into RX buffers when Linux ``vdpa_sim_net``'s filter accepts it
  (broadcast, multicast or the device's MAC), and drops it otherwise or when
  no receive buffer waits;
* ``drop`` reads each frame into the worker's sink (the DMA a NIC would do)
  and counts it;
* ``gen`` fills every receive buffer with one of the unit's template frames
  (and sinks what the driver transmits, like ``drop``).

The sink and the templates are pools of :data:`POOL_SLOT`-byte slots, and
the *n*-th frame of a burst uses slot *n* (modulo the pool): the memory a
burst touches is then what DPDK's vhost back-end touches, which copies each
frame into or out of its own mbuf (2 KiB of data room) and, as its mempool
cache hands back the mbufs freed last, uses the same burst of mbufs again
and again.  One fixed buffer would stay in the first-level cache and flatter
the device.

A transmit burst is taken in two phases: every chain is popped and validated
first, starting the load of each frame's first bytes, and the frames are
read afterwards; the driver wrote them on another core and by then most are
on their way.  Received frames are published every :data:`PUBLISH_EVERY`
within a burst, as DPDK flushes its shadow used ring, so that the driver may
start on the first ones while the rest are copied.

Receive follows section 5.1.6.3 of virtio 1.2 (:func:`rx_deliver`): the
device writes the ``virtio_net_hdr`` (all zero but ``num_buffers``), then
the frame; with ``MRG_RXBUF`` a frame may span several chains and
``num_buffers`` counts them, without it a frame longer than its chain is
dropped.  When too few chains are available the ones taken go back, unused,
as Linux vhost-net and DPDK do, and the frame waits (or, for loopback, is
dropped).  A receive queue stalled on a missing IOTLB translation is not a
full ring: the loopback frame and the rest of its burst go back to the
transmit ring, unread, for later.
"""

from __future__ import annotations

from pyvdpa.dataplane.kernels.cache import inlined, kernel
from pyvdpa.dataplane.kernels.intrinsics import (
    Table,
    ld_u8,
    ld_u16,
    ld_u32,
    prefetch,
    st_u8,
    st_u16,
    st_u64,
)
from pyvdpa.dataplane.kernels.layout import (
    EMPTY,
    ERROR,
    Queue,
    Record,
    Stats,
    Unit,
    Worker,
    chains_at,
    held_at,
    queue_at,
    segments_at,
    stats_at,
    unit_at,
    worker_at,
)
from pyvdpa.dataplane.kernels.ring import (
    complete,
    count_error,
    prefetch_avail,
    publish,
    push,
    ring_pop,
    unpop,
)
from pyvdpa.dataplane.kernels.segments import copy, gather, sg_addr, sg_copy, sg_write
from pyvdpa.dataplane.kernels.spec import ETH_HLEN, NET_HDR_MRG
from pyvdpa.dataplane.kernels.translate import log_write

__all__ = [
    "BROKEN",
    "DELIVERED",
    "DROPPED",
    "NO_BUFFER",
    "POOL_SLOT",
    "POOL_SLOTS",
    "PUBLISH_EVERY",
    "accepts",
    "drop_program",
    "frame_length",
    "gen_program",
    "generate",
    "give_back",
    "loopback",
    "loopback_program",
    "rx_deliver",
    "sink",
    "slot_stride",
    "take_burst",
    "write_header",
]

POOL_SLOT = 2048
"""Bytes of one sink or template slot: DPDK's default mbuf data room."""
POOL_SLOTS = 64
"""Template frames of a ``gen`` unit: one per chain of the largest burst DPDK's testpmd uses."""
PUBLISH_EVERY = 8
"""Received frames are published every so many within a burst."""

# Results of rx_deliver.
DELIVERED = 1
NO_BUFFER = 0
DROPPED = 2
BROKEN = -1

# virtio_net_hdr: flags, gso_type (u8 each), hdr_len, gso_size, csum_start, csum_offset,
# then num_buffers (u16 each).
_HDR_CSUM_OFFSET = 8
_HDR_NUM_BUFFERS = 10
_MAC_BYTES = 6
_MAC_LOW = 4
_BYTE_BITS = 8
_BYTE = 0xFF


@kernel
def accepts(segs: Table, first: int, end: int, offset: int, frame_len: int, mac: int) -> bool:
    """vdpa_sim_net's receive filter: broadcast, multicast or the device's own MAC."""
    if frame_len < ETH_HLEN:
        return False
    if segs[first].length >= offset + _MAC_BYTES:
        host = segs[first].host + offset
        dst = ld_u32(host) | (ld_u16(host + _MAC_LOW) << (_BYTE_BITS * _MAC_LOW))
    else:
        dst = 0
        for k in range(_MAC_BYTES):
            dst |= ld_u8(sg_addr(segs, first, end, offset + k)) << (_BYTE_BITS * k)
    return (dst & 1) == 1 or dst == mac


@inlined
def write_header(host: int, hdr: int, num_buffers: int) -> None:
    """Write a receive header at host address ``host``: all zero but ``num_buffers``."""
    st_u64(host, 0)
    st_u16(host + _HDR_CSUM_OFFSET, 0)
    if hdr == NET_HDR_MRG:
        st_u16(host + _HDR_NUM_BUFFERS, num_buffers)


@inlined
def rx_deliver(
    rxq: Queue,
    u: Unit,
    segs: Table,
    held: Table,
    zeros: int,
    src: Table,
    s_first: int,
    s_end: int,
    s_offset: int,
    src_addr: int,
    frame_len: int,
) -> int:
    """Write one frame into receive chains (section 5.1.6.3).

    The frame comes from segments ``src[s_first:s_end]`` starting at
    ``s_offset``, or from host address ``src_addr`` when it is not 0.
    ``segs`` receives the chains' segments, ``held`` the chains a frame
    spans, ``zeros`` is the host address of a zeroed header.  Returns
    DELIVERED, NO_BUFFER (no chain consumed, but for ones too small to use),
    DROPPED (chains returned empty) or BROKEN.
    """
    stats = stats_at(rxq.stats)
    hdr = u.hdr
    mrg = u.mrg
    remaining = hdr + frame_len
    pos = 0
    nheld = 0
    nb_lo = 0
    nb_hi = 0
    rewindable = True
    while remaining > 0:
        status, ident, nseg, nread, _, wlen, dc = ring_pop(rxq, segs, 0)
        if status == EMPTY:
            if nheld == 0:
                return NO_BUFFER
            if rewindable:
                # Too few buffers yet: put the chains back and wait for more, as
                # Linux vhost-net and DPDK do.
                slots = 0
                for k in range(nheld):
                    slots += held[k].desc_count
                unpop(rxq, nheld, slots)
                stats.received_desc -= nheld
                return NO_BUFFER
            # A skipped chain lies among them: the frame is lost, the chains go back empty.
            for k in range(nheld):
                push(rxq, held[k].id, 0, held[k].desc_count, held[k].wlen)
            stats.dropped += 1
            return DROPPED
        if status == ERROR:
            count_error(rxq)
            return BROKEN
        stats.received_desc += 1
        if wlen < (hdr if nheld == 0 else 1):
            stats.invalid_buffer += 1
            if nheld and rxq.in_order:
                # In order, the chains held go back first: the frame is lost.
                for k in range(nheld):
                    push(rxq, held[k].id, 0, held[k].desc_count, held[k].wlen)
                push(rxq, ident, 0, dc, wlen)
                stats.completion_errors += 1
                stats.dropped += 1
                return DROPPED
            push(rxq, ident, 0, dc, wlen)
            stats.completion_errors += 1
            if nheld:
                rewindable = False
            continue
        if nheld == 0 and segs[nread].length >= remaining:
            # The common case: header and frame fit the chain's first buffer.
            host = segs[nread].host
            write_header(host, hdr, 1)
            if src_addr:
                copy(host + hdr, src_addr, frame_len)
            else:
                gather(host + hdr, src, s_first, s_end, s_offset, frame_len)
            if rxq.log:
                log_write(rxq, segs[nread].gpa, remaining)
            push(rxq, ident, remaining, dc, wlen)
            stats.completed_desc += 1
            stats.packets += 1
            stats.bytes += frame_len
            return DELIVERED
        take = min(wlen, remaining)
        if mrg == 0 and take < remaining:
            stats.invalid_buffer += 1
            push(rxq, ident, 0, dc, wlen)
            stats.dropped += 1
            return DROPPED
        offset = 0
        if nheld == 0:
            if segs[nread].length >= hdr:
                write_header(segs[nread].host, hdr, 0)
                if rxq.log:
                    log_write(rxq, segs[nread].gpa, hdr)
            else:
                sg_write(rxq, segs, nread, nseg, 0, zeros, hdr)
            if hdr == NET_HDR_MRG:
                nb_lo = sg_addr(segs, nread, nseg, _HDR_NUM_BUFFERS)
                nb_hi = sg_addr(segs, nread, nseg, _HDR_NUM_BUFFERS + 1)
            offset = hdr
        count = take - offset
        frame_pos = pos + offset - hdr
        if count > 0:
            if src_addr:
                sg_write(rxq, segs, nread, nseg, offset, src_addr + frame_pos, count)
            else:
                sg_copy(
                    rxq, segs, nread, nseg, offset, src, s_first, s_end, s_offset + frame_pos, count
                )
        chain = held[nheld]
        chain.id = ident
        chain.desc_count = dc
        chain.length = take
        chain.wlen = wlen
        nheld += 1
        pos += take
        remaining -= take
    if hdr == NET_HDR_MRG:
        st_u8(nb_lo, nheld & _BYTE)
        st_u8(nb_hi, nheld >> _BYTE_BITS)
    for k in range(nheld):
        push(rxq, held[k].id, held[k].length, held[k].desc_count, held[k].wlen)
        stats.completed_desc += 1
    stats.packets += 1
    stats.bytes += frame_len
    return DELIVERED


@inlined
def slot_stride(frame_len: int) -> int:
    """Bytes between two pool slots holding frames of ``frame_len``: whole 2 KiB slots."""
    return max(1, (frame_len + POOL_SLOT - 1) // POOL_SLOT) * POOL_SLOT


@kernel
def take_burst(u: Unit, txq: Queue, segs: Table, chains: Table) -> int:
    """Pop and validate up to a burst of transmitted chains; return how many.

    Each chain's segments follow the previous one's in ``segs``; the load of
    each frame's first bytes starts meanwhile.
    """
    hdr = u.hdr
    size = txq.size
    limit = min(u.burst, chains.shape[0])
    count = 0
    base = 0
    while count < limit and base + size <= segs.shape[0]:
        status, ident, nseg, nread, rlen, wlen, dc = ring_pop(txq, segs, base)
        if status == EMPTY:
            break
        if status == ERROR:
            count_error(txq)
            break
        if nread:
            prefetch(segs[base].host + hdr)
        chain = chains[count]
        chain.id = ident
        chain.desc_count = dc
        chain.first = base
        chain.nread = nread
        chain.rlen = rlen
        chain.wlen = wlen
        base += nseg
        count += 1
    return count


@inlined
def frame_length(stats: Stats, chain: Record, hdr: int) -> int:
    """Count a transmitted chain; the length of its frame, -1 when it has no room for a header."""
    stats.received_desc += 1
    if chain.rlen < hdr:
        stats.invalid_buffer += 1
        return -1
    frame_len = chain.rlen - hdr
    stats.packets += 1
    stats.bytes += frame_len
    return frame_len


@inlined
def give_back(txq: Queue, stats: Stats, chain: Record) -> None:
    """Return a transmitted chain (nothing written) and count it."""
    push(txq, chain.id, 0, chain.desc_count, chain.wlen)
    stats.completed_desc += 1


@kernel
def sink(u: Unit, segs_t: Table, chains: Table, sink_addr: int, sink_len: int) -> int:
    """Consume a burst of transmitted frames, reading each into the sink (``drop``, ``gen``)."""
    txa = u.txq
    if txa == 0:
        return 0
    txq = queue_at(txa)
    if txq.error:
        return 0
    count = take_burst(u, txq, segs_t, chains)
    if count == 0:
        return 0
    stats = stats_at(txq.stats)
    hdr = u.hdr
    for c in range(count):
        chain = chains[c]
        frame_len = frame_length(stats, chain, hdr)
        if frame_len >= 0:
            # What a NIC's DMA would read, into the burst's next slot, up to the sink's size.
            stride = slot_stride(frame_len)
            offset = (c % (sink_len // stride)) * stride if stride <= sink_len else 0
            first = chain.first
            gather(
                sink_addr + offset,
                segs_t,
                first,
                first + chain.nread,
                hdr,
                min(frame_len, sink_len - offset),
            )
        give_back(txq, stats, chain)
    complete(txq)
    return count


@kernel
def loopback(u: Unit, segs_t: Table, segs_r: Table, held: Table, chains: Table, zeros: int) -> int:
    """Consume a burst of transmitted frames, each delivered to the receive queue or dropped."""
    txa = u.txq
    if txa == 0:
        return 0
    txq = queue_at(txa)
    if txq.error:
        return 0
    count = take_burst(u, txq, segs_t, chains)
    if count == 0:
        return 0
    rxa = u.rxq
    rxq = queue_at(rxa if rxa != 0 else txa)
    rx_ok = rxa != 0 and rxq.error == 0
    if rx_ok:
        prefetch_avail(rxq, count)
    stats = stats_at(txq.stats)
    hdr = u.hdr
    mac = u.mac
    for c in range(count):
        chain = chains[c]
        first = chain.first
        end = first + chain.nread
        frame_len = frame_length(stats, chain, hdr)
        if frame_len >= 0:
            if rx_ok and accepts(segs_t, first, end, hdr, frame_len, mac):
                result = rx_deliver(
                    rxq, u, segs_r, held, zeros, segs_t, first, end, hdr, 0, frame_len
                )
                if result == NO_BUFFER and rxq.stalled:
                    # Receive buffers wait for their IOTLB translation, which
                    # is not a full ring: this frame and the rest of the burst
                    # go back to the transmit ring for later, unread.
                    stats.received_desc -= 1
                    stats.packets -= 1
                    stats.bytes -= frame_len
                    slots = 0
                    for r in range(c, count):
                        slots += chains[r].desc_count
                    unpop(txq, count - c, slots)
                    count = c
                    break
                if result == NO_BUFFER:
                    stats_at(rxq.stats).dropped += 1
                elif result == BROKEN:
                    rx_ok = False
            else:
                stats.dropped += 1
        give_back(txq, stats, chain)
        if rx_ok and c % PUBLISH_EVERY == PUBLISH_EVERY - 1:
            # The driver may start on the first frames while the rest are copied.
            publish(rxq)
    # Received frames first: the driver waits for them, not for its buffers back.
    if rxa != 0:
        complete(rxq)
    complete(txq)
    return count


@kernel
def generate(u: Unit, segs_r: Table, held: Table, zeros: int) -> int:
    """Fill a burst of receive buffers, each from the burst's next template frame.

    The unit's frame holds :data:`POOL_SLOTS` copies of the frame, one every
    :func:`slot_stride` bytes.
    """
    rxa = u.rxq
    if rxa == 0:
        return 0
    rxq = queue_at(rxa)
    if rxq.error:
        return 0
    burst = u.burst
    frame = u.frame
    frame_len = u.frame_len
    stride = slot_stride(frame_len)
    prefetch_avail(rxq, burst)
    done = 0
    while done < burst:
        src = frame + (done % POOL_SLOTS) * stride
        result = rx_deliver(rxq, u, segs_r, held, zeros, segs_r, 0, 0, 0, src, frame_len)
        if result in (NO_BUFFER, BROKEN):
            break
        done += 1
    if done:
        complete(rxq)
    return done


@inlined
def _transmitted(w: Worker) -> Table:
    return segments_at(w.segs_t, w.segs_t_len)


@inlined
def _received(w: Worker) -> Table:
    return segments_at(w.segs_r, w.segs_r_len)


@kernel
def loopback_program(unit: int, worker: int) -> int:
    """The ``loopback`` program: one pass over the unit at ``unit``; the work done."""
    u = unit_at(unit)
    w = worker_at(worker)
    held = held_at(w.held, w.held_len)
    chains = chains_at(w.chains, w.chains_len)
    return loopback(u, _transmitted(w), _received(w), held, chains, w.zeros)


@kernel
def drop_program(unit: int, worker: int) -> int:
    """The ``drop`` program: one pass over the unit at ``unit``; the work done."""
    u = unit_at(unit)
    w = worker_at(worker)
    chains = chains_at(w.chains, w.chains_len)
    return sink(u, _transmitted(w), chains, w.sink, w.sink_len)


@kernel
def gen_program(unit: int, worker: int) -> int:
    """The ``gen`` program: one pass over the unit at ``unit``; the work done."""
    u = unit_at(unit)
    w = worker_at(worker)
    work = generate(u, _received(w), held_at(w.held, w.held_len), w.zeros)
    chains = chains_at(w.chains, w.chains_len)
    return work + sink(u, _transmitted(w), chains, w.sink, w.sink_len)
