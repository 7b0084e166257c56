"""The table of cases ``pyvdpa check`` runs, in order, each with the spec section it checks.

Sections name the QEMU vhost-user specification (``docs/interop/vhost-user.rst``)
and the OASIS virtio 1.2 specification by their headings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyvdpa.check import control, data, hostile
from pyvdpa.check.model import Group, Offer
from pyvdpa.check.target import Target
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId, NetFeature, VirtioFeature

__all__ = ["CASES", "Case", "case_ids"]

#: Why a case does not apply to an offer, or None when it does.
Applies = Callable[[Offer], str | None]
RunCase = Callable[[Target], str]


def always(offer: Offer) -> str | None:
    """Every back-end."""
    return None


@dataclass(frozen=True, slots=True)
class Case:
    """One check: ``run`` returns a detail line or raises (see the module)."""

    id: str
    group: Group
    title: str
    section: str
    run: RunCase
    applies: Applies = always
    #: A hostile case: the back-end must still serve afterwards.
    hostile: bool = False


VU = "vhost-user"
V12 = "virtio 1.2"


PF = ProtocolFeature


def _protocol(*features: ProtocolFeature) -> Applies:
    return lambda offer: offer.lacks_protocol(*features)


def _feature(*features: int) -> Applies:
    return lambda offer: offer.lacks_feature(*features)


def _net(offer: Offer) -> str | None:
    return None if offer.device == DeviceId.NET else "net devices only"


def _protocol_features(offer: Offer) -> str | None:
    return None if offer.protocol_offered else "PROTOCOL_FEATURES not offered"


def _all(*predicates: Applies) -> Applies:
    def applies(offer: Offer) -> str | None:
        for predicate in predicates:
            reason = predicate(offer)
            if reason is not None:
                return reason
        return None

    return applies


N, M, R, D = Group.NEGOTIATION, Group.MEMORY, Group.RINGS, Group.DATA
H = Group.HOSTILE

CASES: tuple[Case, ...] = (
    # negotiation
    Case("neg.features", N, "GET_FEATURES answered before SET_OWNER, stable across connections",
         f"{VU}: VHOST_USER_GET_FEATURES", control.features_stable),
    Case("neg.protocol", N, "GET/SET_PROTOCOL_FEATURES: a subset of the offer is taken",
         f"{VU}: Communication (protocol feature negotiation)", control.protocol_subset,
         _protocol_features),
    Case("neg.unoffered", N, "SET_FEATURES with a bit not offered is refused",
         f"{V12} 3.1.1 Driver Requirements: Device Initialization", control.features_unoffered,
         hostile=True),
    Case("neg.owner", N, "SET_OWNER accepted on each new connection",
         f"{VU}: VHOST_USER_SET_OWNER", control.owner_again),
    Case("neg.reply-ack", N, "REPLY_ACK: every request asking for it is acknowledged with 0",
         f"{VU}: REPLY_ACK", control.reply_ack_success, _protocol(PF.REPLY_ACK)),
    Case("neg.reply-ack-fail", N, "REPLY_ACK: SET_VRING_NUM 65536 gets a non-zero ack",
         f"{VU}: REPLY_ACK; {V12} 2.7 Split Virtqueues (Queue Size)", control.reply_ack_failure,
         _protocol(PF.REPLY_ACK), hostile=True),
    Case("neg.queue-num", N, "GET_QUEUE_NUM answers at least one queue",
         f"{VU}: Multiple queue support", control.queue_num, _protocol(PF.MQ)),
    Case("neg.status", N, "SET_STATUS read back by GET_STATUS, rings run after DRIVER_OK",
         f"{VU}: VHOST_USER_SET_STATUS, VHOST_USER_GET_STATUS", control.status_cycle,
         _protocol(PF.STATUS)),
    # memory
    Case("mem.two-regions", M, "SET_MEM_TABLE replaced by two regions, one at an mmap_offset",
         f"{VU}: VHOST_USER_SET_MEM_TABLE", control.mem_two_regions),
    Case("mem.replace-running", M, "SET_MEM_TABLE again while rings run",
         f"{VU}: Ring states (configuration changed on the fly)", control.mem_replace_running),
    Case("mem.max-slots", M, "GET_MAX_MEM_SLOTS answers at least one slot",
         f"{VU}: VHOST_USER_GET_MAX_MEM_SLOTS", control.mem_max_slots,
         _protocol(PF.CONFIGURE_MEM_SLOTS)),
    Case("mem.add-rem", M, "REM_MEM_REG and ADD_MEM_REG region by region, rings use them",
         f"{VU}: VHOST_USER_ADD_MEM_REG, VHOST_USER_REM_MEM_REG", control.mem_add_rem,
         _protocol(PF.CONFIGURE_MEM_SLOTS)),
    # ring lifecycle
    Case("ring.order-dpdk", R, "SET_VRING_* in DPDK's order (CALL, NUM, BASE, ADDR, KICK)",
         f"{VU}: Ring states", control.ring_order_dpdk),
    Case("ring.order-qemu", R, "SET_VRING_* in QEMU's order (NUM, BASE, ADDR, KICK, CALL)",
         f"{VU}: Ring states", control.ring_order_qemu),
    Case("ring.base", R, "GET_VRING_BASE answers the next avail index",
         f"{VU}: VHOST_USER_GET_VRING_BASE", control.ring_vring_base),
    Case("ring.stop", R, "GET_VRING_BASE stops the ring",
         f"{VU}: Ring states (stopped)", control.ring_stop),
    Case("ring.no-protocol", R, "without PROTOCOL_FEATURES negotiated rings start enabled",
         f"{VU}: Ring states", control.ring_no_protocol_features),
    Case("ring.kick-before", R, "chains kicked before SET_VRING_KICK are used once it arrives",
         f"{VU}: Ring states (started by a kick)", control.ring_kick_before),
    Case("ring.kick-after", R, "kick fd first, chains and kicks afterwards",
         f"{VU}: Ring states (started by a kick)", control.ring_kick_after),
    Case("ring.enable-cycle", R, "SET_VRING_ENABLE 0 then 1 on running rings",
         f"{VU}: VHOST_USER_SET_VRING_ENABLE", control.ring_enable_cycle, _protocol_features),
    Case("ring.disabled-rx", R, "a disabled RX ring supplies no frames",
         f"{VU}: Ring states (started but disabled)", control.ring_disabled_rx,
         _all(_net, _protocol_features)),
    Case("ring.disabled-tx", R, "a started but disabled TX ring is processed and discarded",
         f"{VU}: Ring states (started but disabled)", control.ring_disabled_tx,
         _all(_net, _protocol_features)),
    # data path
    Case("data.split", D, "split ring, 100 buffers over a 32-entry ring",
         f"{V12} 2.7 Split Virtqueues", data.data_split),
    Case("data.packed", D, "packed ring, wrap counter flips, GET_VRING_BASE wrap bit",
         f"{V12} 2.8 Packed Virtqueues", data.data_packed, _feature(VirtioFeature.RING_PACKED)),
    Case("data.indirect", D, "indirect descriptor tables, split ring",
         f"{V12} 2.7.5.3 Indirect Descriptors", data.data_indirect,
         _feature(VirtioFeature.RING_INDIRECT_DESC)),
    Case("data.indirect-packed", D, "indirect descriptor tables, packed ring",
         f"{V12} 2.8.7 Indirect Flag: Scatter-Gather Support", data.data_indirect_packed,
         _feature(VirtioFeature.RING_INDIRECT_DESC, VirtioFeature.RING_PACKED)),
    Case("data.event-idx", D, "EVENT_IDX: kicks as avail_event asks",
         f"{V12} 2.7.10 Available Buffer Notification Suppression", data.data_event_idx,
         _feature(VirtioFeature.RING_EVENT_IDX)),
    Case("data.mrg-rxbuf", D, "MRG_RXBUF: num_buffers 1 for a frame in one buffer",
         f"{V12} 5.1.6.4 Processing of Incoming Packets", data.data_mrg_rxbuf,
         _all(_net, _feature(NetFeature.MRG_RXBUF))),
    Case("data.in-order", D, "IN_ORDER: buffers used in the order made available",
         f"{V12} 2.7.9 In-order use of descriptors", data.data_in_order,
         _feature(VirtioFeature.IN_ORDER)),
    Case("data.call", D, "used buffers notified on the call eventfd",
         f"{V12} 2.7.7 Used Buffer Notification Suppression", data.data_call),
    Case("data.wrap", D, "an 8-entry ring wrapped many times",
         f"{V12} 2.7.13 Supplying Buffers to The Device", data.data_wrap),
    # reset and reconnect
    Case("reset.reconnect", Group.RESET, "a front-end vanishing with rings running is replaced",
         f"{VU}: Communication (reconnection)", control.reset_reconnect),
    Case("reset.device", Group.RESET, "RESET_DEVICE, then set up again on the same connection",
         f"{VU}: VHOST_USER_RESET_DEVICE", control.reset_device, _protocol(PF.RESET_DEVICE)),
    # dirty log, IOTLB, config space
    Case("log.dirty", Group.LOG, "logging started mid-run marks written pages and used ring",
         f"{VU}: Migration", control.log_dirty,
         _all(_protocol(PF.LOG_SHMFD), _feature(VirtioFeature.LOG_ALL))),
    Case("iotlb.miss", Group.IOTLB, "IOTLB MISS answered with UPDATE, INVALIDATE honoured",
         f"{VU}: IOMMU support", control.iotlb_miss,
         _all(_feature(VirtioFeature.ACCESS_PLATFORM), _protocol(PF.BACKEND_REQ, PF.REPLY_ACK))),
    Case("config.read", Group.CONFIG, "GET_CONFIG answers the device's config space",
         f"{VU}: VHOST_USER_GET_CONFIG", control.config_read, _protocol(PF.CONFIG)),
    # hostile
    Case("bad.version", H, "header with version bits 2", f"{VU}: Header",
         hostile.bad_version, hostile=True),
    Case("bad.unknown", H, "unknown request code 999", f"{VU}: Front-end message types",
         hostile.unknown_request, hostile=True),
    Case("bad.short", H, "SET_FEATURES with a 4-byte payload", f"{VU}: Payload",
         hostile.short_payload, hostile=True),
    Case("bad.huge-size", H, "header announcing 64 KiB that never come, then close",
         f"{VU}: Header", hostile.huge_size, hostile=True),
    Case("bad.truncated", H, "half a header, then close", f"{VU}: Header",
         hostile.truncated_header, hostile=True),
    Case("bad.garbage", H, "4 KiB of random bytes, then close", f"{VU}: Message Specification",
         hostile.garbage, hostile=True),
    Case("fd.kick-none", H, "SET_VRING_KICK with no fd and no NOFD bit",
         f"{VU}: VHOST_USER_SET_VRING_KICK", hostile.kick_without_fd, hostile=True),
    Case("fd.too-many", H, "SET_VRING_CALL with 8 fds", f"{VU}: Communication (fds)",
         hostile.too_many_fds, hostile=True),
    Case("fd.unexpected", H, "SET_FEATURES carrying an fd", f"{VU}: Communication (fds)",
         hostile.fd_on_fdless_request, hostile=True),
    Case("fd.kick-memfd", H, "SET_VRING_KICK with a memfd, not an eventfd",
         f"{VU}: VHOST_USER_SET_VRING_KICK", hostile.kick_not_eventfd, hostile=True),
    Case("region.zero", H, "a region of size 0", f"{VU}: Memory regions description",
         hostile.region_zero_size, hostile=True),
    Case("region.overlap", H, "two regions over the same guest range",
         f"{VU}: Memory regions description", hostile.region_overlap, hostile=True),
    Case("region.pipe", H, "a region whose fd is a pipe", f"{VU}: VHOST_USER_SET_MEM_TABLE",
         hostile.region_unmappable, hostile=True),
    Case("region.beyond-file", H, "a 1 GiB region on a 1 MiB memfd",
         f"{VU}: VHOST_USER_SET_MEM_TABLE", hostile.region_beyond_file, hostile=True),
    Case("region.fd-count", H, "two regions, one fd", f"{VU}: VHOST_USER_SET_MEM_TABLE",
         hostile.region_count_over_fds, hostile=True),
    Case("region.nine", H, "nine regions (at most 8)", f"{VU}: Memory regions description",
         hostile.region_too_many, hostile=True),
    Case("ringbad.addr", H, "ring areas outside every region, then a kick",
         f"{VU}: VHOST_USER_SET_VRING_ADDR", hostile.ring_outside_memory, hostile=True),
    Case("ringbad.desc", H, "a descriptor outside memory",
         f"{V12} 2.7.5 The Virtqueue Descriptor Table",
         hostile.desc_outside_memory, hostile=True),
    Case("ringbad.loop", H, "a descriptor chain looping on itself",
         f"{V12} 2.7.5 The Virtqueue Descriptor Table", hostile.desc_loop, hostile=True),
    Case("ringbad.avail-jump", H, "avail idx 1000 ahead",
         f"{V12} 2.7.6 The Virtqueue Available Ring",
         hostile.avail_idx_jump, hostile=True),
    Case("ringbad.indirect-len", H, "indirect table of 17 bytes",
         f"{V12} 2.7.5.3 Indirect Descriptors", hostile.indirect_bad_length,
         _feature(VirtioFeature.RING_INDIRECT_DESC), hostile=True),
    Case("bad.vring-index", H, "SET_VRING_NUM for vring 1024", f"{VU}: Multiple queue support",
         hostile.vring_index_out_of_range, hostile=True),
)  # fmt: skip


def case_ids() -> list[str]:
    """Every case id, in run order."""
    return [case.id for case in CASES]
