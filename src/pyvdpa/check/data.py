"""Data-path cases: split and packed rings, indirect tables, event idx, MRG_RXBUF, IN_ORDER, wrap.

Each function is one case's run function; the table is
:data:`pyvdpa.check.cases.CASES`.  Buffers go through
:class:`~pyvdpa.check.target.Traffic`: net frames on TX (compared when the
back-end sends them back), blk sectors written and read back.
"""

from __future__ import annotations

from pyvdpa.check.model import CaseFailedError
from pyvdpa.check.target import Target, Traffic, require_loopback
from pyvdpa.virtio.constants import NetFeature, VirtioFeature

__all__ = [
    "data_call",
    "data_event_idx",
    "data_in_order",
    "data_indirect",
    "data_indirect_packed",
    "data_mrg_rxbuf",
    "data_packed",
    "data_split",
    "data_wrap",
]

#: Buffers each data-path case moves: several laps of a 32-descriptor ring.
COUNT = 100


def _run(
    t: Target, extra: int = 0, *, ring_size: int = 32, indirect: bool = False, count: int = COUNT
) -> Traffic:
    with t.session() as session:
        t.negotiate(session, extra)
        traffic = Traffic(t, session, ring_size=ring_size, indirect=indirect)
        traffic.start()
        traffic.move(count)
        if session.packed:
            ring = traffic.tx
            base = session.frontend.get_vring_base(ring.index)
            slots = traffic.slots[ring.index]
            expected = (slots % ring_size) | (0x8000 if (slots // ring_size) % 2 == 0 else 0)
            if base & 0xFFFF != expected:
                raise CaseFailedError(
                    f"packed GET_VRING_BASE of vring {ring.index}: {base & 0xFFFF:#x}, "
                    f"{expected:#x} expected (index | avail wrap counter << 15)"
                )
        return traffic


def data_split(t: Target) -> str:
    """Split ring: buffers move, several laps of the ring."""
    _run(t)
    return f"{COUNT} buffers on a 32-descriptor split ring"


def data_packed(t: Target) -> str:
    """Packed ring: buffers move across wrap-counter flips; GET_VRING_BASE has the wrap bit."""
    _run(t, VirtioFeature.RING_PACKED)
    return f"{COUNT} buffers on a 32-descriptor packed ring, base and wrap counter right"


def data_indirect(t: Target) -> str:
    """Indirect descriptor tables (split ring)."""
    _run(t, VirtioFeature.RING_INDIRECT_DESC, indirect=True, count=40)
    return "40 chains, each in an indirect table"


def data_indirect_packed(t: Target) -> str:
    """Indirect descriptor tables (packed ring)."""
    _run(t, VirtioFeature.RING_INDIRECT_DESC | VirtioFeature.RING_PACKED, indirect=True, count=40)
    return "40 chains, each in an indirect table, packed ring"


def data_event_idx(t: Target) -> str:
    """EVENT_IDX: the driver kicks only when avail_event asks, and buffers still move."""
    _run(t, VirtioFeature.RING_EVENT_IDX)
    return f"{COUNT} buffers, kicks suppressed as the back-end's avail_event said"


def data_mrg_rxbuf(t: Target) -> str:
    """MRG_RXBUF: a frame that fits one buffer is received with num_buffers 1."""
    require_loopback(t)
    traffic = _run(t, NetFeature.MRG_RXBUF, count=16)
    wrong = [n for n in traffic.num_buffers if n != 1]
    if not traffic.num_buffers or wrong:
        raise CaseFailedError(f"num_buffers {wrong[:4]} for frames that fit one buffer")
    return f"{len(traffic.num_buffers)} frames, num_buffers 1"


def data_in_order(t: Target) -> str:
    """IN_ORDER: buffers are used in the order they were made available."""
    traffic = _run(t, VirtioFeature.IN_ORDER, count=64)
    if traffic.out_of_order:
        raise CaseFailedError(f"{traffic.out_of_order} chains used out of order")
    return "64 chains used in order"


def data_call(t: Target) -> str:
    """Used buffers are notified on the call eventfd (no EVENT_IDX, no NO_INTERRUPT)."""
    with t.session() as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.start()
        traffic.move(8)
        ring = traffic.tx
        # The last notification may still be on its way, or unread.
        traffic.wait_call(ring, 1.0)
        made = traffic.made[ring.index]
        if not traffic.calls.get(ring.index):
            raise CaseFailedError(f"vring {ring.index}: {made} chains used, no call eventfd signal")
        return f"vring {ring.index}: {traffic.calls[ring.index]} notification(s) for {made} chains"


def data_wrap(t: Target) -> str:
    """A small ring (8 descriptors) wraps many times."""
    _run(t, ring_size=8, count=60)
    return "60 buffers on an 8-descriptor ring"
