"""Control-plane cases: negotiation, memory tables, ring lifecycle, reset, log, IOTLB, config.

Each function is one case's run function (see :mod:`pyvdpa.check.model`);
the table that names them, with their spec sections, is
:data:`pyvdpa.check.cases.CASES`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from pyvdpa.check.model import CaseFailedError, NotApplicableError
from pyvdpa.check.target import BASE_PROTOCOL, RawPeer, RingOrder, Target, Traffic, require_loopback
from pyvdpa.drive.info import CONFIG_BYTES, decode_config
from pyvdpa.drive.session import GPA_BASE
from pyvdpa.memory import MemoryRegion
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import BackendRefusedError, Frontend
from pyvdpa.vhost_user.protocol import ProtocolFeature, Request
from pyvdpa.virtio.constants import DeviceId, DeviceStatus, VirtioFeature
from pyvdpa.virtio.net import net_header_size
from pyvdpa.virtio.ring import MAX_QUEUE_SIZE

__all__ = [
    "config_read",
    "features_stable",
    "features_unoffered",
    "iotlb_miss",
    "log_dirty",
    "mem_add_rem",
    "mem_max_slots",
    "mem_replace_running",
    "mem_two_regions",
    "owner_again",
    "protocol_subset",
    "queue_num",
    "reply_ack_failure",
    "reply_ack_success",
    "reset_device",
    "reset_reconnect",
    "ring_disabled_rx",
    "ring_disabled_tx",
    "ring_enable_cycle",
    "ring_kick_after",
    "ring_kick_before",
    "ring_no_protocol_features",
    "ring_order_dpdk",
    "ring_order_qemu",
    "ring_stop",
    "ring_vring_base",
    "status_cycle",
]

#: A log page (vhost-user spec, "Migration": VHOST_LOG_PAGE).
LOG_PAGE = 0x1000


# ---------------------------------------------------------------------- negotiation


def features_stable(t: Target) -> str:
    """GET_FEATURES is answered before SET_OWNER, the same on every connection."""
    first = t.offer.features
    with contextlib.closing(t.connect()) as frontend:
        again = frontend.get_features()
    if again != first:
        raise CaseFailedError(f"GET_FEATURES said {first:#x}, then {again:#x}")
    return f"features {first:#x} on two connections"


def protocol_subset(t: Target) -> str:
    """GET_PROTOCOL_FEATURES answered; a subset set with SET_PROTOCOL_FEATURES is used."""
    with contextlib.closing(t.connect()) as frontend:
        offered = frontend.get_protocol_features()
        if offered != t.offer.protocol_features:
            raise CaseFailedError(
                f"protocol features {offered!r}, earlier {t.offer.protocol_features!r}"
            )
        subset = ProtocolFeature(offered & ProtocolFeature.REPLY_ACK)
        frontend.set_protocol_features(subset)
        frontend.set_owner()
        frontend.get_features()
    return f"offered {offered.value:#x}, used {subset.value:#x}"


def features_unoffered(t: Target) -> str:
    """SET_FEATURES with a bit the back-end did not offer is refused."""
    unoffered = next(
        (1 << bit for bit in range(63, 23, -1) if not t.offer.features & (1 << bit)), None
    )
    if unoffered is None:
        raise NotApplicableError("every feature bit is offered")
    peer = RawPeer(t)
    with contextlib.closing(peer):
        peer.handshake()
        features = (t.offer.features & VirtioFeature.VERSION_1) | unoffered
        peer.send(Request.SET_FEATURES, codec.U64(features).encode())
        answer = peer.answer()
    if answer in ("refused", "closed"):
        return f"bit {unoffered.bit_length() - 1}: {answer}"
    raise CaseFailedError(
        f"SET_FEATURES with bit {unoffered.bit_length() - 1} not offered: {answer}"
    )


def reply_ack_success(t: Target) -> str:
    """With REPLY_ACK every request with NEED_REPLY is acknowledged, 0 on success."""
    with t.session() as session:
        t.negotiate(session)
        if not session.protocol_features & ProtocolFeature.REPLY_ACK:
            raise CaseFailedError("REPLY_ACK offered but not taken")
        traffic = Traffic(t, session)
        traffic.start()
        traffic.move(1)
    return "SET_OWNER, SET_FEATURES, SET_MEM_TABLE and every SET_VRING_* acknowledged with 0"


def reply_ack_failure(t: Target) -> str:
    """A request that fails (a ring larger than virtio allows) gets a non-zero REPLY_ACK."""
    peer = RawPeer(t)
    with contextlib.closing(peer):
        peer.handshake()
        peer.send(Request.SET_VRING_NUM, codec.VringState(0, 2 * MAX_QUEUE_SIZE).encode())
        answer = peer.answer()
    if answer == "refused":
        return f"SET_VRING_NUM {2 * MAX_QUEUE_SIZE}: non-zero REPLY_ACK"
    if answer == "closed":
        return f"SET_VRING_NUM {2 * MAX_QUEUE_SIZE}: connection closed instead of a REPLY_ACK"
    raise CaseFailedError(f"SET_VRING_NUM {2 * MAX_QUEUE_SIZE} with NEED_REPLY: {answer}")


def owner_again(t: Target) -> str:
    """SET_OWNER is accepted on every new connection after the previous owner left."""
    for _ in range(2):
        with contextlib.closing(t.connect()) as frontend:
            if t.offer.protocol_features & ProtocolFeature.REPLY_ACK:
                frontend.set_protocol_features(ProtocolFeature.REPLY_ACK)
            frontend.set_owner()
            frontend.get_features()
    return "two owners one after the other"


def _count(t: Target, feature: ProtocolFeature, ask: Callable[[Frontend], int], name: str) -> int:
    """A count the back-end answers with ``feature`` negotiated; below one fails the case."""
    with contextlib.closing(t.connect()) as frontend:
        frontend.set_protocol_features(feature)
        count = ask(frontend)
    if count < 1:
        raise CaseFailedError(f"{name} answered {count}")
    return count


def queue_num(t: Target) -> str:
    """GET_QUEUE_NUM answers the queues the back-end can serve (at least one)."""
    count = _count(t, ProtocolFeature.MQ, Frontend.get_queue_num, "GET_QUEUE_NUM")
    return f"{count} queue(s)"


def status_cycle(t: Target) -> str:
    """SET_STATUS is read back by GET_STATUS; rings run once DRIVER_OK is set."""
    with t.session() as session:
        t.negotiate(session, protocol=BASE_PROTOCOL | ProtocolFeature.STATUS)
        fe = session.frontend
        status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        fe.set_status(status)
        got = fe.get_status()
        if got != status:
            raise CaseFailedError(f"GET_STATUS {got:#x} after SET_STATUS {status.value:#x}")
        traffic = Traffic(t, session)
        traffic.setup()
        session.enable_rings()
        fe.set_status(status | DeviceStatus.DRIVER_OK)
        traffic.post_rx()
        moved = traffic.move(4)
        got = fe.get_status()
        if not got & DeviceStatus.DRIVER_OK:
            raise CaseFailedError(f"GET_STATUS {got:#x} lost DRIVER_OK")
    return f"status {status.value:#x} read back; {moved} after DRIVER_OK"


# ---------------------------------------------------------------------- memory


def _two_regions(session_size: int, address: int) -> list[MemoryRegion]:
    half = session_size // 2
    return [
        MemoryRegion(GPA_BASE, half, address, 0),
        MemoryRegion(GPA_BASE + half, half, address + half, half),
    ]


def mem_two_regions(t: Target) -> str:
    """SET_MEM_TABLE replacing the table with two regions (one at an mmap_offset) is used."""
    with t.session() as session:
        t.negotiate(session)
        regions = _two_regions(session.memory_size, session.shared.address)
        session.frontend.set_mem_table([(region, session.shared.fd) for region in regions])
        traffic = Traffic(t, session)
        traffic.start()
        return traffic.move(40)


def mem_replace_running(t: Target) -> str:
    """SET_MEM_TABLE again while the rings run: traffic goes on."""
    with t.session() as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.start()
        traffic.move(4)
        session.frontend.set_mem_table([(session.region, session.shared.fd)])
        return traffic.move(4)


def mem_max_slots(t: Target) -> str:
    """GET_MAX_MEM_SLOTS answers how many regions the back-end takes (at least one)."""
    slots = _count(
        t, ProtocolFeature.CONFIGURE_MEM_SLOTS, Frontend.get_max_mem_slots, "GET_MAX_MEM_SLOTS"
    )
    return f"{slots} slots"


def mem_add_rem(t: Target) -> str:
    """REM_MEM_REG and ADD_MEM_REG replace the table region by region; the rings use them."""
    with t.session() as session:
        t.negotiate(session)
        fe = session.frontend
        fe.rem_mem_reg(session.region)
        first, second = _two_regions(session.memory_size, session.shared.address)
        fe.add_mem_reg(first, session.shared.fd)
        fe.add_mem_reg(second, session.shared.fd)
        traffic = Traffic(t, session)
        traffic.start()
        moved = traffic.move(40)
        session.stop()
        fe.rem_mem_reg(second)
        return f"{moved}; the second region removed again"


# ---------------------------------------------------------------------- ring lifecycle


def _moves(t: Target, order: RingOrder) -> str:
    with t.session(order=order) as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.start()
        return traffic.move(8)


def ring_order_dpdk(t: Target) -> str:
    """Rings set up in DPDK virtio-user's order (CALL, NUM, BASE, ADDR, KICK) work."""
    return _moves(t, RingOrder.DPDK)


def ring_order_qemu(t: Target) -> str:
    """Rings set up in QEMU's order (NUM, BASE, ADDR, KICK, CALL) work."""
    return _moves(t, RingOrder.QEMU)


def ring_vring_base(t: Target) -> str:
    """GET_VRING_BASE answers the next available index the ring would have processed."""
    with t.session() as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.start()
        traffic.move(13)
        ring = traffic.tx
        expected = traffic.made[ring.index]
        base = session.frontend.get_vring_base(ring.index)
    if base != expected:
        raise CaseFailedError(f"GET_VRING_BASE of vring {ring.index}: {base}, {expected} expected")
    return f"vring {ring.index}: {base} after {expected} chains"


def ring_stop(t: Target) -> str:
    """After GET_VRING_BASE the ring is stopped: a chain made available then is not used."""
    with t.session() as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.start()
        traffic.move(2)
        ring = traffic.tx
        base = session.frontend.get_vring_base(ring.index)
        addr = session.alloc(4096, 64)
        session.memory.write(addr, bytes(64))
        if t.device == DeviceId.NET:
            ring.queue.add([(addr, 64)], [])
        else:
            ring.queue.add([(addr, 16)], [(addr + 512, 1)])
        if ring.kick_fd is not None:
            os.eventfd_write(ring.kick_fd, 1)
        if not traffic.quiet(ring, 1.0):
            raise CaseFailedError(
                f"vring {ring.index} used a chain after GET_VRING_BASE answered {base}"
            )
    return f"vring {ring.index} stopped at {base}; a chain made available after it stayed unused"


def ring_no_protocol_features(t: Target) -> str:
    """Without VHOST_USER_F_PROTOCOL_FEATURES negotiated, rings start enabled."""
    with t.session() as session:
        session.negotiate(VirtioFeature.VERSION_1, 0, protocol=BASE_PROTOCOL)
        traffic = Traffic(t, session)
        traffic.start()
        return traffic.move(4) + " with no SET_VRING_ENABLE"


def ring_kick_before(t: Target) -> str:
    """Chains made available and kicked before SET_VRING_KICK are used once it arrives."""
    with t.session(hold_kick=True) as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.setup()
        session.enable_rings()
        traffic.post_rx()
        ring = traffic.tx
        addr = session.alloc(4096, 64)
        if t.device == DeviceId.NET:
            hdr = net_header_size(session.features)
            session.memory.write(addr, bytes(hdr + 60))
            head = ring.queue.add([(addr, hdr + 60)], [])
        else:
            session.memory.write(addr, bytes(16))  # IN of sector 0
            head = ring.queue.add([(addr, 16)], [(addr + 512, 512), (addr + 1024, 1)])
        for each in traffic.rings:
            if each.kick_fd is not None:
                os.eventfd_write(each.kick_fd, 1)
        for each in traffic.rings:
            session.send_kick(each)
        traffic.wait_used(ring, [head], "chain kicked before SET_VRING_KICK")
        return traffic.move(2) + " after it"


def ring_kick_after(t: Target) -> str:
    """A ring whose kick fd arrived before any chain uses chains kicked afterwards."""
    with t.session(hold_kick=True) as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.setup()
        for ring in traffic.rings:
            session.send_kick(ring)
        session.enable_rings()
        traffic.post_rx()
        return traffic.move(4)


def ring_disabled_rx(t: Target) -> str:
    """A disabled RX ring supplies no frames; enabled again, it does."""
    require_loopback(t)
    with t.session() as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.setup()
        fe = session.frontend
        fe.set_vring_enable(1, True)
        traffic.post_rx()
        heads, _ = traffic.post_frames(4)
        if not traffic.quiet(traffic.rings[0], 1.0):
            raise CaseFailedError("RX ring 0 received a frame while disabled")
        fe.set_vring_enable(0, True)
        # The frames sent meanwhile may have been dropped or held: either way TX completes.
        traffic.wait_used(traffic.tx, heads, "TX chains sent while RX was disabled")
        return traffic.move(4) + " once RX was enabled; none while disabled"


def ring_disabled_tx(t: Target) -> str:
    """A started but disabled TX ring is processed and its frames discarded."""
    require_loopback(t)
    with t.session() as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.setup()
        session.frontend.set_vring_enable(0, True)
        traffic.post_rx()
        traffic.send_frames(4)
        if not traffic.quiet(traffic.rings[0], 0.5):
            raise CaseFailedError("a frame sent on a disabled TX ring was received")
    return "4 TX chains used, no frame delivered"


def ring_enable_cycle(t: Target) -> str:
    """SET_VRING_ENABLE 0 then 1 on running rings: traffic goes on."""
    with t.session() as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.start()
        traffic.move(2)
        for ring in traffic.rings:
            session.frontend.set_vring_enable(ring.index, False)
        for ring in traffic.rings:
            session.frontend.set_vring_enable(ring.index, True)
        traffic.post_rx()
        return traffic.move(4) + " after disable and enable"


# ---------------------------------------------------------------------- reset and reconnect


def reset_reconnect(t: Target) -> str:
    """A front-end that vanishes with rings running (no GET_VRING_BASE) is replaced by the next."""
    with t.session() as first:
        t.negotiate(first)
        traffic = Traffic(t, first)
        traffic.start()
        traffic.move(4)
        traffic.tx.queue.add([(first.alloc(64, 64), 64)], [])
    with t.session() as second:
        t.negotiate(second)
        traffic = Traffic(t, second)
        traffic.start()
        return traffic.move(4) + " on the next connection"


def reset_device(t: Target) -> str:
    """RESET_DEVICE, then features, memory and rings again on the same connection."""
    with t.session() as session:
        t.negotiate(session, protocol=BASE_PROTOCOL | ProtocolFeature.RESET_DEVICE)
        traffic = Traffic(t, session)
        traffic.start()
        traffic.move(2)
        session.stop()
        session.frontend.reset_device()
        session.frontend.set_features(session.features)
        session.frontend.set_mem_table([(session.region, session.shared.fd)])
        again = Traffic(t, session)
        again.start()
        return again.move(4) + " after RESET_DEVICE"


# ---------------------------------------------------------------------- dirty log


def log_dirty(t: Target) -> str:
    """Logging started while rings run marks every page the back-end writes afterwards.

    As QEMU starts a migration: SET_FEATURES with LOG_ALL added, SET_LOG_BASE,
    then SET_VRING_ADDR again with the LOG flag and the used ring's guest
    address.
    """
    require_loopback(t)
    with t.session() as session:
        t.negotiate(session, protocol=BASE_PROTOCOL | ProtocolFeature.LOG_SHMFD)
        traffic = Traffic(t, session)
        traffic.start()
        traffic.move(2)
        fe = session.frontend
        size = ((GPA_BASE + session.memory_size) // LOG_PAGE + 7) // 8
        fd = os.memfd_create("pyvdpa-check-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            fe.set_features(session.features | VirtioFeature.LOG_ALL)
            fe.set_log_base(fd, size)
            for ring in traffic.rings:
                desc, avail, used = session.areas[ring.index]
                fe.set_vring_addr(session.vring_addr(ring.index, desc, avail, used, log=used))
            before = len(traffic.written)
            traffic.move(4)
            log = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        pages = {addr // LOG_PAGE for addr in traffic.written[before:]}
        _, _, used = session.areas[traffic.rings[0].index]
        pages.add(used // LOG_PAGE)
        missing = sorted(page for page in pages if not log[page // 8] >> (page % 8) & 1)
    if missing:
        raise CaseFailedError(
            f"{len(missing)} of {len(pages)} written pages not logged "
            f"(first {missing[0] * LOG_PAGE:#x})"
        )
    return f"{len(pages)} pages written after logging started (buffers, used ring): all logged"


# ---------------------------------------------------------------------- IOTLB


def iotlb_miss(t: Target) -> str:
    """Behind an IOMMU the back-end asks for translations and honours INVALIDATE.

    A net device may drop a frame whose receive buffer it could not
    translate yet (DPDK does): for net only the transmitted chains are
    required to be used.
    """

    def move(traffic: Traffic) -> None:
        if t.device == DeviceId.NET:
            traffic.send_frames(4)
        else:
            traffic.move(4)

    with t.session(iommu=True) as session:
        t.negotiate(session)
        traffic = Traffic(t, session)
        traffic.start()
        move(traffic)
        misses = session.iotlb_misses
        if not misses:
            raise CaseFailedError("buffers moved without a single IOTLB miss")
        session.invalidate(session.dma_base, session.memory_size)
        move(traffic)
        if session.iotlb_misses == misses:
            raise CaseFailedError("no IOTLB miss after INVALIDATE of the whole memory")
    return (
        f"{session.iotlb_misses} misses answered, {session.iotlb_misses - misses} after INVALIDATE"
    )


# ---------------------------------------------------------------------- config space


def config_read(t: Target) -> str:
    """GET_CONFIG answers the size asked with the device's config space."""
    size = CONFIG_BYTES.get(t.device, 8)
    with contextlib.closing(t.connect()) as frontend:
        frontend.set_protocol_features(ProtocolFeature.CONFIG)
        try:
            data = frontend.get_config(0, size)
        except BackendRefusedError as exc:
            raise CaseFailedError(str(exc)) from exc
    fields = decode_config(t.device, data) or {}
    if t.device == DeviceId.BLOCK and not fields.get("capacity"):
        raise CaseFailedError("blk config space says capacity 0")
    shown = ", ".join(f"{k}={v}" for k, v in fields.items() if not isinstance(v, (list, dict)))
    return f"{size} bytes: {shown}"
