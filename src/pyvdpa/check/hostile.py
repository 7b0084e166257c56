"""Hostile cases: malformed frames, bad fds, bad memory regions, broken rings.

Each function is one case's run function; the table is
:data:`pyvdpa.check.cases.CASES`, where every one of these is marked
hostile: after it the runner checks that the back-end still serves (a
fresh connection negotiates and moves a buffer).  Frames the front-end
would refuse to send are built here from the codec's header and payload
layouts (:class:`~pyvdpa.check.target.RawPeer`).

What a request that breaks a rule must get: a non-zero REPLY_ACK or a
closed connection (a back-end may close on "exceptional circumstances",
vhost-user spec, "Communication").  A REPLY_ACK of 0 to such a request is
a failure where the rule is the spec's (``must_refuse``); elsewhere what
the back-end did is reported and only its survival is judged.  A back-end
that neither answers nor closes within the timeout fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import Callable

from pyvdpa.check.model import CaseFailedError
from pyvdpa.check.target import RawPeer, Target, Traffic
from pyvdpa.drive.session import GPA_BASE
from pyvdpa.errors import PyvdpaError
from pyvdpa.memory import MemoryRegion
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.protocol import MAX_MEM_REGIONS, HeaderFlags, Request
from pyvdpa.virtio.constants import DeviceId, VirtioFeature

__all__ = [
    "avail_idx_jump",
    "bad_version",
    "desc_loop",
    "desc_outside_memory",
    "fd_on_fdless_request",
    "garbage",
    "huge_size",
    "indirect_bad_length",
    "kick_not_eventfd",
    "kick_without_fd",
    "region_beyond_file",
    "region_count_over_fds",
    "region_overlap",
    "region_too_many",
    "region_unmappable",
    "region_zero_size",
    "ring_outside_memory",
    "short_payload",
    "too_many_fds",
    "truncated_header",
    "unknown_request",
    "vring_index_out_of_range",
]

_DESC = struct.Struct("<QIHH")
_FAR = 0x7FFF_0000_0000
_MEMFD_SIZE = 1 << 20


def _judge(t: Target, send: Callable[[RawPeer], None], *, must_refuse: bool) -> str:
    peer = RawPeer(t)
    with contextlib.closing(peer):
        peer.handshake()
        send(peer)
        answer = peer.answer()
    if answer == "hung":
        raise CaseFailedError(f"neither answered nor closed within {t.timeout:g} s")
    if answer == "garbled":
        raise CaseFailedError("answered with a malformed reply")
    if must_refuse and answer == "accepted":
        raise CaseFailedError("accepted (REPLY_ACK 0)")
    return {
        "refused": "refused (non-zero REPLY_ACK)",
        "closed": "refused (connection closed)",
        "accepted": "accepted (REPLY_ACK 0)",
        "silent": "no REPLY_ACK negotiated; the connection goes on",
    }[answer]


def _stream(t: Target, data: bytes) -> str:
    peer = RawPeer(t)
    with contextlib.closing(peer):
        peer.handshake()
        peer.send_bytes(data)
    return f"{len(data)} bytes sent, connection closed"


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _memfd(size: int = _MEMFD_SIZE) -> int:
    fd = os.memfd_create("pyvdpa-check", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


# ---------------------------------------------------------------------- malformed frames


def bad_version(t: Target) -> str:
    """A header whose version bits are not 1."""
    return _judge(
        t,
        lambda p: p.send(Request.SET_OWNER, flags=0x2 | HeaderFlags.NEED_REPLY),
        must_refuse=True,
    )


def unknown_request(t: Target) -> str:
    """A request code no version of the protocol defines."""
    return _judge(t, lambda p: p.send(999), must_refuse=True)


def short_payload(t: Target) -> str:
    """SET_FEATURES with a 4-byte payload (a u64 is 8)."""
    return _judge(t, lambda p: p.send(Request.SET_FEATURES, b"\0" * 4), must_refuse=True)


def huge_size(t: Target) -> str:
    """A header announcing a 64 KiB payload that never comes; then the connection closes."""
    return _stream(t, codec.HEADER.pack(Request.SET_FEATURES, HeaderFlags.VERSION, 0x10000))


def truncated_header(t: Target) -> str:
    """Half a header, then the connection closes."""
    return _stream(t, codec.HEADER.pack(Request.GET_FEATURES, HeaderFlags.VERSION, 0)[:6])


def garbage(t: Target) -> str:
    """4 KiB of random bytes (fixed seed), then the connection closes."""
    return _stream(t, random.Random(0xC0FFEE).randbytes(4096))


# ---------------------------------------------------------------------- bad fds


def kick_without_fd(t: Target) -> str:
    """SET_VRING_KICK without an fd and without the NOFD bit."""
    return _judge(
        t, lambda p: p.send(Request.SET_VRING_KICK, codec.U64(0).encode()), must_refuse=True
    )


def too_many_fds(t: Target) -> str:
    """SET_VRING_CALL carrying 8 eventfds (one is allowed)."""
    fds = [_eventfd() for _ in range(8)]
    try:
        return _judge(
            t,
            lambda p: p.send(Request.SET_VRING_CALL, codec.U64(0).encode(), fds),
            must_refuse=True,
        )
    finally:
        for fd in fds:
            os.close(fd)


def fd_on_fdless_request(t: Target) -> str:
    """SET_FEATURES carrying an fd it has no use for."""
    fd = _eventfd()
    features = t.offer.features & (VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
    try:
        return _judge(
            t,
            lambda p: p.send(Request.SET_FEATURES, codec.U64(features).encode(), [fd]),
            must_refuse=False,
        )
    finally:
        os.close(fd)


def kick_not_eventfd(t: Target) -> str:
    """SET_VRING_KICK with a memfd instead of an eventfd."""
    fd = _memfd(4096)
    try:
        return _judge(
            t,
            lambda p: p.send(Request.SET_VRING_KICK, codec.U64(0).encode(), [fd]),
            must_refuse=False,
        )
    finally:
        os.close(fd)


def vring_index_out_of_range(t: Target) -> str:
    """SET_VRING_NUM for vring 1024, beyond any queue a back-end has (vhost allows 256)."""
    return _judge(
        t,
        lambda p: p.send(Request.SET_VRING_NUM, codec.VringState(1024, 64).encode()),
        must_refuse=True,
    )


# ---------------------------------------------------------------------- bad regions


def _table(regions: list[MemoryRegion], count: int | None = None) -> bytes:
    """A memory table laid out as the codec lays it, whatever it holds."""
    layout = codec.MemTable
    head = layout.HEAD.pack(len(regions) if count is None else count)
    return head + b"".join(
        layout.REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        for r in regions
    )


def _mem_table(
    t: Target,
    regions: list[MemoryRegion],
    fds: list[int],
    *,
    must_refuse: bool,
    count: int | None = None,
) -> str:
    return _judge(
        t,
        lambda p: p.send(Request.SET_MEM_TABLE, _table(regions, count), fds),
        must_refuse=must_refuse,
    )


def region_zero_size(t: Target) -> str:
    """A memory region of size 0."""
    fd = _memfd()
    try:
        return _mem_table(t, [MemoryRegion(GPA_BASE, 0, _FAR, 0)], [fd], must_refuse=False)
    finally:
        os.close(fd)


def region_overlap(t: Target) -> str:
    """Two regions over the same guest-physical range."""
    fd = _memfd()
    half = _MEMFD_SIZE // 2
    regions = [
        MemoryRegion(GPA_BASE, _MEMFD_SIZE, _FAR, 0),
        MemoryRegion(GPA_BASE + half, half, _FAR + _MEMFD_SIZE, half),
    ]
    try:
        return _mem_table(t, regions, [fd, fd], must_refuse=False)
    finally:
        os.close(fd)


def region_unmappable(t: Target) -> str:
    """A region whose fd is a pipe (cannot be mapped)."""
    read_end, write_end = os.pipe()
    try:
        return _mem_table(
            t, [MemoryRegion(GPA_BASE, _MEMFD_SIZE, _FAR, 0)], [read_end], must_refuse=True
        )
    finally:
        os.close(read_end)
        os.close(write_end)


def region_beyond_file(t: Target) -> str:
    """A 1 GiB region on a 1 MiB memfd."""
    fd = _memfd()
    try:
        return _mem_table(t, [MemoryRegion(GPA_BASE, 1 << 30, _FAR, 0)], [fd], must_refuse=False)
    finally:
        os.close(fd)


def region_count_over_fds(t: Target) -> str:
    """Two regions and one fd."""
    fd = _memfd()
    regions = [
        MemoryRegion(GPA_BASE, 4096, _FAR, 0),
        MemoryRegion(GPA_BASE + 4096, 4096, _FAR + 4096, 4096),
    ]
    try:
        return _mem_table(t, regions, [fd], must_refuse=True)
    finally:
        os.close(fd)


def region_too_many(t: Target) -> str:
    """A table of 9 regions (SET_MEM_TABLE holds at most 8)."""
    fds = [_memfd(4096) for _ in range(MAX_MEM_REGIONS)]
    regions = [
        MemoryRegion(GPA_BASE + i * 4096, 4096, _FAR + i * 4096, 0)
        for i in range(MAX_MEM_REGIONS + 1)
    ]
    try:
        return _mem_table(t, regions, fds, must_refuse=True)
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------- broken rings


def _broken_ring(t: Target, poison: Callable[[Traffic, int, int, int], str], extra: int = 0) -> str:
    """Run traffic on a split ring, then make one chain available that ``poison`` breaks."""
    with t.session() as session:
        t.negotiate(session, extra)
        traffic = Traffic(t, session, indirect=bool(extra & VirtioFeature.RING_INDIRECT_DESC))
        traffic.start()
        traffic.move(2)
        ring = traffic.tx
        desc, avail, _ = session.areas[ring.index]
        buffer = session.alloc(4096, 64)
        session.memory.write(buffer, bytes(64))
        if t.device == DeviceId.NET:
            head = ring.queue.add([(buffer, 64)], [], indirect=traffic.indirect)
        else:
            head = ring.queue.add([(buffer, 16)], [(buffer + 512, 1)], indirect=traffic.indirect)
        what = poison(traffic, head, desc, avail)
        if ring.kick_fd is not None:
            os.eventfd_write(ring.kick_fd, 1)
        used = not traffic.quiet(ring, 0.5)
    return f"{what}; {'a chain was used' if used else 'nothing used'}"


def desc_outside_memory(t: Target) -> str:
    """A descriptor whose buffer lies outside every memory region."""

    def poison(traffic: Traffic, head: int, desc: int, avail: int) -> str:
        mem = traffic.session.memory
        _, length, flags, nxt = _DESC.unpack(mem.read(desc + 16 * head, 16))
        mem.write(desc + 16 * head, _DESC.pack(_FAR, length, flags, nxt))
        return f"buffer at {_FAR:#x}"

    return _broken_ring(t, poison)


def desc_loop(t: Target) -> str:
    """A descriptor chain whose last descriptor links back to its head."""

    def poison(traffic: Traffic, head: int, desc: int, avail: int) -> str:
        mem = traffic.session.memory
        addr, length, flags, _ = _DESC.unpack(mem.read(desc + 16 * head, 16))
        mem.write(desc + 16 * head, _DESC.pack(addr, length, flags | 1, head))
        return f"descriptor {head} links to itself"

    return _broken_ring(t, poison)


def avail_idx_jump(t: Target) -> str:
    """The avail index moved 1000 entries past the last one the driver made available."""

    def poison(traffic: Traffic, head: int, desc: int, avail: int) -> str:
        mem = traffic.session.memory
        (idx,) = struct.unpack("<H", mem.read(avail + 2, 2))
        mem.write(avail + 2, struct.pack("<H", (idx + 1000) & 0xFFFF))
        return f"avail idx {idx} -> {(idx + 1000) & 0xFFFF}"

    return _broken_ring(t, poison)


def indirect_bad_length(t: Target) -> str:
    """An indirect table whose length is not a multiple of 16."""

    def poison(traffic: Traffic, head: int, desc: int, avail: int) -> str:
        mem = traffic.session.memory
        addr, _, flags, nxt = _DESC.unpack(mem.read(desc + 16 * head, 16))
        mem.write(desc + 16 * head, _DESC.pack(addr, 17, flags, nxt))
        return "indirect table of 17 bytes"

    return _broken_ring(t, poison, VirtioFeature.RING_INDIRECT_DESC)


def ring_outside_memory(t: Target) -> str:
    """SET_VRING_ADDR with areas outside every region, then a kick."""
    with t.session() as session:
        t.negotiate(session)
        fe = session.frontend
        kick = _eventfd()
        try:
            outcome = "accepted"
            try:
                fe.set_vring_num(0, 64)
                fe.set_vring_base(0, 0)
                fe.set_vring_addr(
                    codec.VringAddr(
                        0, codec.VringAddrFlags(0), _FAR, _FAR + 0x2000, _FAR + 0x1000, 0
                    )
                )
                fe.set_vring_kick(0, kick)
                if session.features & VirtioFeature.PROTOCOL_FEATURES:
                    fe.set_vring_enable(0, True)
                os.eventfd_write(kick, 1)
                fe.get_features()
            except PyvdpaError as exc:
                outcome = f"refused ({exc})"
        finally:
            os.close(kick)
    return f"rings at {_FAR:#x}: {outcome}"
