"""The compiled data path: ring kernels, net programs and the worker loop.

Theory of operation
-------------------
Everything here is compiled by numba with ``nogil=True`` and cached on
disk.  All of it lives in this one module on purpose: numba invalidates a
cached function only when *its own* source file changes, so a kernel that
inlined a helper from another file could silently keep stale machine code.

**Guest memory.**  Kernels never see Python objects.  A virtqueue is a row
of 64-bit integers (the ``Q_*`` columns) holding its parameters (size,
layout, host addresses of its three ring areas, the address of its region
table, of its dirty bitmap and of its counters) and its state (the
positions and wrap counters of sections 2.7 and 2.8, notification state,
the first error met).  Guest-physical addresses are translated through the
queue's region table (guest-physical start, size, host address), and a
buffer is touched only when ``[addr, addr + len)`` lies inside one region,
exactly as :meth:`pyvdpa.memory.GuestMemory.view` decides.  The ring areas
themselves were translated whole when the queue was built.

**Validation.**  :func:`walk` applies the rules of
:func:`pyvdpa.virtio.ring.walk_chain`, in the same order, with the same
outcome for every chain: the first rule broken becomes an ``E_*`` code in the
row, and the queue refuses further work, as section 2.1.2 lets a device do.
Tests feed the same hostile rings to both and compare the outcomes.

**Memory ordering** (virtio 1.2, section 2.7.13, for both layouts): the device
loads ``avail.idx`` (split) or a head descriptor's flags (packed) with
acquire semantics before reading what they publish; it writes buffers and
used elements first and publishes ``used.idx`` or a used descriptor's flags
with a release store; a sequentially consistent fence separates publishing
from reading the driver's event suppression, and re-enabling notifications
from re-checking for new buffers.  The loads, stores and fences are LLVM
atomics emitted by the intrinsics below; plain guest reads never move
before the acquire load that guards them.

**Net programs.**  A *unit* (the ``U_*`` row) is one virtio-net queue pair
run by one worker: ``loopback`` copies each transmitted frame straight from
the TX buffers into RX buffers when Linux ``vdpa_sim_net``'s filter accepts
it (broadcast, multicast or the device's MAC) and drops it otherwise or when
no receive buffer waits; ``drop`` reads each frame into a sink (the DMA a
NIC would do) and counts it; ``gen`` fills every receive buffer with a
template frame; ``tap`` wires the pair to one queue of a TAP interface (its
fd is the unit's).  Receive follows section 5.1.6.3: the header's
``num_buffers`` counts the chains of a frame when ``MRG_RXBUF`` lets it span
several.

**Blk program** (virtio 1.2, section 5.2.6).  A ``blk`` unit serves one
virtqueue of a virtio-blk device (in the unit's ``U_TXQ`` column: requests
flow from the driver, like transmitted frames).  Each chain holds a 16-byte
header (type, reserved, sector) in its device-readable part, then data, and
its last device-writable byte is the status.  ``IN`` is one ``preadv`` from
the backing file straight into the guest's writable buffers, ``OUT`` one
``pwritev`` straight from its readable buffers (no copy, in batches of
``IOV_MAX`` buffers); ``FLUSH`` is ``fdatasync``; ``GET_ID`` copies the
serial; ``DISCARD`` and ``WRITE_ZEROES`` validate their segments and
``fallocate`` (punching a hole, or zeroing a range with a fallback to
writing zeros where the file system cannot).  The checks, their order, the
status byte and the used length are those of the reference device,
:class:`pyvdpa.devices.blk.BlkDevice`, which the tests hold the kernel to.
The I/O is synchronous, as in DPDK's vhost blk examples: a request is
finished, and its used element written, before the next one is popped, so
the worker never leaves a burst with a request in flight.

**TAP.**  A transmitted frame goes to the TAP with one ``writev`` straight
from the guest's buffers (the virtio-net header skipped); a TAP that refuses
it drops it, and the chain is completed either way.  A received frame is
read with one ``readv`` straight into the next receive chain, past the
header, with the unit's bounce buffer as the last iovec: a frame that fits
the chain never leaves guest memory, and the device writes the header
(``num_buffers`` 1).  A longer frame is collected in the bounce buffer and
delivered by the general rules (several chains with ``MRG_RXBUF``, dropped
without), and waits there while too few chains are available.  Reading stops
when no receive chain waits, so the TAP's kernel queue holds the frames
meanwhile, or when the TAP has none left.  The receive queue's ``Q_ARM``
says which of the two the worker waits for before it sleeps: new receive
buffers (a kick) when frames may wait, the TAP (its fd in the epoll set,
edge-triggered) when it ran dry.

**The worker loop** (:func:`run_worker`) visits its units in turn, each for
a bounded burst, publishes used entries once per burst and signals the call
eventfd only when the driver's event suppression asks for it.  In poll mode
it never sleeps; in event mode it re-enables notifications when a pass
found no work, re-checks the rings, and sleeps in ``epoll_wait`` on the kick
eventfds and the units' own fds (the TAPs); adaptive mode polls for a while
first.  It returns to Python only when the control word asks it to (a queue
is added or removed), so the control plane can read an exact ring position
from a quiescent row.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic

__all__ = [
    "ACCESS_ADJOINS",
    "ACCESS_CONTINUES",
    "ACCESS_PERM_SHIFT",
    "ACCESS_READ",
    "ACCESS_WRITE",
    "CCOLS",
    "C_EPOCH",
    "C_REQUEST",
    "C_SLEEPING",
    "EMPTY",
    "EPOLL_EVENT_SIZE",
    "ERROR",
    "E_AVAIL_JUMP",
    "E_AVAIL_SLOTS",
    "E_BUFFER",
    "E_HEAD_INDEX",
    "E_ID_INDEX",
    "E_INDIRECT_CHAINED",
    "E_INDIRECT_FEATURE",
    "E_INDIRECT_LENGTH",
    "E_INDIRECT_NESTED",
    "E_INDIRECT_NEXT",
    "E_LAYOUT",
    "E_LOOP",
    "E_NEXT_INDEX",
    "E_TOO_BIG",
    "E_TOO_MANY",
    "HELD_CAP",
    "IOV_MAX",
    "KERNEL_STAT_NAMES",
    "MAX_BURST",
    "MAX_EVENTS",
    "MODE_ADAPTIVE",
    "MODE_EVENT",
    "MODE_POLL",
    "NSTATS",
    "POPPED",
    "P_BLK",
    "P_DROP",
    "P_GEN",
    "P_LOOPBACK",
    "P_TAP",
    "QCOLS",
    "Q_ARM",
    "Q_ATTN_FD",
    "Q_AVAIL_SEEN",
    "Q_AVAIL_WRAP",
    "Q_CALL_FD",
    "Q_DESC",
    "Q_DEVICE",
    "Q_DRIVER",
    "Q_ERROR",
    "Q_ERROR_A",
    "Q_ERROR_B",
    "Q_EVENT_IDX",
    "Q_INDIRECT",
    "Q_INFLIGHT",
    "Q_INFLIGHT_SLOTS",
    "Q_IOTLB",
    "Q_LAST_AVAIL",
    "Q_LOG",
    "Q_LOG_MISSED",
    "Q_LOG_RING",
    "Q_LOG_SIZE",
    "Q_MISS_ACCESS",
    "Q_MISS_ADDR",
    "Q_NOTIFY",
    "Q_NREGS",
    "Q_PACKED",
    "Q_REGS",
    "Q_SHADOW",
    "Q_SIZE",
    "Q_STALLED",
    "Q_STATS",
    "Q_UNPUBLISHED",
    "Q_UNSIGNALLED",
    "Q_USED_IDX",
    "Q_USED_WRAP",
    "SEG_CAP",
    "SINK_SIZE",
    "S_BAD_DESC_ERRORS",
    "S_BYTES",
    "S_CALLS",
    "S_COMPLETED_DESC",
    "S_COMPLETION_ERRORS",
    "S_DROPPED",
    "S_EXCEED_MAX_CHAIN",
    "S_INVALID_BUFFER",
    "S_PACKETS",
    "S_RECEIVED_DESC",
    "UCOLS",
    "U_BLK_FD",
    "U_BOUNCE",
    "U_BOUNCE_LEN",
    "U_BURST",
    "U_CAPACITY",
    "U_FD",
    "U_FRAME",
    "U_FRAME_LEN",
    "U_HDR",
    "U_MAC",
    "U_MAX_SECTORS",
    "U_MAX_SEG",
    "U_MRG",
    "U_PENDING",
    "U_PROGRAM",
    "U_READONLY",
    "U_RXQ",
    "U_SERIAL",
    "U_TXQ",
    "U_ZEROS",
    "U_ZEROS_LEN",
    "disable_notification",
    "enable_notification",
    "log_write",
    "publish",
    "push",
    "ring_pop",
    "run_worker",
    "should_notify",
]

_F = TypeVar("_F", bound=Callable[..., Any])


_OPTIONS: dict[str, Any] = {
    "nogil": True,
    "cache": True,
    "error_model": "numpy",
    # Nothing here allocates: arrays are borrowed from callers that keep them alive.
    "_nrt": False,
}


def _kernel(fn: _F) -> _F:
    """Compile ``fn`` without the GIL, its machine code cached on disk."""
    return cast(_F, numba.njit(**_OPTIONS)(fn))


def _inlined(fn: _F) -> _F:
    """Like :func:`_kernel`, and inlined into its callers at numba's IR level.

    For the per-chain steps of the hot loop: a call between separately
    compiled functions passes every array field on the stack and returns
    through memory, which costs more than these steps themselves.
    """
    return cast(_F, numba.njit(inline="always", **_OPTIONS)(fn))


_intrinsic = cast(Callable[[Callable[..., Any]], Callable[..., Any]], intrinsic)
# numba's code generation helpers carry no annotations.
cgutils: Any = _cgutils

# --------------------------------------------------------------------------- layouts

# Queue row: parameters, set when the queue is built.
Q_SIZE = 0
Q_PACKED = 1
Q_EVENT_IDX = 2
Q_INDIRECT = 3
Q_DESC = 4
"""Host address of the descriptor table (split) or ring (packed)."""
Q_DRIVER = 5
"""Host address of the available ring (split) or driver event area (packed)."""
Q_DEVICE = 6
"""Host address of the used ring (split) or device event area (packed)."""
Q_REGS = 7
"""Host address of the translation table: ``uint64[n, 5]`` rows (device address, size,
host address, access, guest-physical address), sorted by device address, disjoint.

``access`` has bit ``ACCESS_READ`` when the device may read the range,
``ACCESS_WRITE`` when it may write it (guest memory allows both, an IOTLB
entry what its permission says, a range no region holds neither) and
``ACCESS_CONTINUES`` when the range goes on, contiguous in this process, from
the end of the previous row.  IOTLB rows also carry the entry's permission
shifted by ``ACCESS_PERM_SHIFT``, with or without memory behind it, and
``ACCESS_ADJOINS`` when the entry goes on from the previous row in front-end
memory (set with ``ACCESS_CONTINUES``, and alone across a region boundary or
outside memory): a miss after such rows is still a miss, as for
:meth:`pyvdpa.memory.Iotlb.translate`.
"""
Q_NREGS = 8
Q_LOG = 9
"""Host address of the dirty bitmap, 0 without logging."""
Q_LOG_SIZE = 10
Q_LOG_RING = 11
"""Guest-physical address at which used-ring writes are logged."""
Q_STATS = 12
"""Host address of the queue's counters (``int64[NSTATS]``)."""
Q_CALL_FD = 13
"""Call eventfd, -1 for none; the control plane may replace it while the queue runs."""
Q_ARM = 14
"""1 when the worker waits for this queue's kicks before sleeping.

The ``tap`` program sets it on its receive queue only while frames may wait
for buffers, and clears it when the TAP has nothing to give.
"""
# Queue row: state.
Q_LAST_AVAIL = 15
"""Split: next avail index (16 bits, free-running).  Packed: next slot."""
Q_AVAIL_WRAP = 16
Q_AVAIL_SEEN = 17
"""Split: the avail index last read; chains up to it need no new acquire load."""
Q_USED_IDX = 18
Q_USED_WRAP = 19
Q_INFLIGHT = 20
Q_INFLIGHT_SLOTS = 21
Q_UNSIGNALLED = 22
Q_UNPUBLISHED = 23
"""Used entries written (split) or recorded in the shadow (packed), not yet published."""
Q_NOTIFY = 24
"""1 while the device asks for available-buffer notifications."""
Q_ERROR = 25
"""The first ``E_*`` code met; non-zero means the queue is broken."""
Q_ERROR_A = 26
Q_ERROR_B = 27
Q_LOG_MISSED = 28
"""Dirty pages beyond the end of the bitmap, not logged."""
Q_SHADOW = 29
"""Packed: host address of ``int64[size, 2]`` holding used descriptors not yet published."""
Q_IOTLB = 30
"""1 when device addresses are IOVAs: a range the table lacks is a miss, not an error."""
Q_STALLED = 31
"""1 from a miss until the control plane has new translations (the ring is not popped)."""
Q_MISS_ADDR = 32
"""The first IOVA a stalled queue could not translate."""
Q_MISS_ACCESS = 33
"""The access (``ACCESS_READ`` or ``ACCESS_WRITE``) the missing translation must allow."""
Q_ATTN_FD = 34
"""Eventfd signalled when the queue stalls on a miss, -1 for none."""
QCOLS = 40

# Counters, in the order of pyvdpa.devices.stats.STAT_NAMES, then extras.
S_RECEIVED_DESC = 0
S_COMPLETED_DESC = 1
S_BAD_DESC_ERRORS = 2
S_EXCEED_MAX_CHAIN = 3
S_INVALID_BUFFER = 4
S_COMPLETION_ERRORS = 5
S_PACKETS = 6
S_BYTES = 7
S_DROPPED = 8
S_CALLS = 9
NSTATS = 10
KERNEL_STAT_NAMES = (
    "received_desc",
    "completed_desc",
    "bad_desc_errors",
    "exceed_max_chain",
    "invalid_buffer",
    "completion_errors",
    "packets",
    "bytes",
    "dropped",
    "calls",
)

# Unit row: one net queue pair (or one blk queue) and the program that runs it.
U_PROGRAM = 0
U_RXQ = 1
"""Host address of the receive queue's row, 0 while it is not running."""
U_TXQ = 2
U_HDR = 3
U_MRG = 4
U_MAC = 5
"""The device's MAC, its first byte in the low bits."""
U_FRAME = 6
"""Host address of the generated frame (``gen``)."""
U_FRAME_LEN = 7
U_BURST = 8
U_FD = 9
"""The unit's own fd (``tap``: its TAP queue), -1 for none.

The worker sleeps on it edge-triggered and never reads it as an eventfd.
"""
# Unit row of a blk unit.
U_CAPACITY = 10
"""Capacity in 512-byte sectors."""
U_READONLY = 11
U_SERIAL = 12
"""Host address of the 20-byte serial, zero padded."""
U_ZEROS = 13
"""Host address of a zero-filled buffer (reads past the end of the file, zeroing fallback)."""
U_ZEROS_LEN = 14
U_MAX_SEG = 15
"""Segments a DISCARD or WRITE_ZEROES request may carry."""
U_MAX_SECTORS = 16
"""Sectors one DISCARD or WRITE_ZEROES segment may cover."""
U_BLK_FD = 17
"""The backing file's descriptor (never watched: files are always ready)."""
# Unit row of a tap unit.
U_BOUNCE = 18
"""Host address of the unit's bounce buffer (``tap``: received frames longer than a chain)."""
U_BOUNCE_LEN = 19
U_PENDING = 20
"""Length of the frame waiting in the bounce buffer for receive chains, 0 for none."""
UCOLS = 24

P_LOOPBACK = 0
P_DROP = 1
P_GEN = 2
P_BLK = 3
P_TAP = 4

# Worker control words.
C_REQUEST = 0
"""Set by the control plane: return to Python at the next pass."""
C_EPOCH = 1
"""Bumped by the worker after every pass and every wake-up."""
C_SLEEPING = 2
"""1 while the worker waits in epoll_wait."""
CCOLS = 8

MODE_POLL = 0
MODE_EVENT = 1
MODE_ADAPTIVE = 2

# Access bits of a translation table row (the first two are VHOST_ACCESS_RO and _WO).
ACCESS_READ = 1
ACCESS_WRITE = 2
ACCESS_CONTINUES = 4
ACCESS_ADJOINS = 8
ACCESS_PERM_SHIFT = 4

# Results of ring_pop.
POPPED = 1
EMPTY = 0
ERROR = -1
_MISS = 2
"""walk only: a translation is missing; ring_pop reports EMPTY and the queue stalls."""

# Error codes (Q_ERROR); pyvdpa.dataplane.queues maps them onto RingError classes.
E_AVAIL_JUMP = 1
E_AVAIL_SLOTS = 2
E_HEAD_INDEX = 3
E_NEXT_INDEX = 4
E_ID_INDEX = 5
E_LOOP = 6
E_INDIRECT_FEATURE = 7
E_INDIRECT_NESTED = 8
E_INDIRECT_CHAINED = 9
E_INDIRECT_NEXT = 10
E_INDIRECT_LENGTH = 11
E_TOO_MANY = 12
E_TOO_BIG = 13
E_LAYOUT = 14
E_BUFFER = 15

SEG_CAP = 32768
"""Segments a chain can have: at most the largest queue size."""
HELD_CAP = 32768
"""Receive chains one frame can hold: at most the largest queue size."""
MAX_BURST = 1024
"""Chains a queue hands the worker in one burst, at most."""
SINK_SIZE = 65536
"""Bytes of a transmitted frame the ``drop`` program reads."""
MAX_EVENTS = 64
IOV_MAX = 1024
"""Buffers one ``readv``, ``writev``, ``preadv`` or ``pwritev`` takes, at most (``UIO_MAXIOV``)."""

# Spec values (virtio 1.2, sections 2.7 and 2.8); kept literal so the cached
# machine code depends on nothing outside this file.
_NEXT = 1
_WRITE = 2
_INDIRECT = 4
_AVAIL = 1 << 7
_USED = 1 << 15
_NO_NOTIFY = 1
_NO_INTERRUPT = 1
_EV_ENABLE = 0
_EV_DISABLE = 1
_EV_DESC = 2
_MAX_CHAIN_BYTES = 1 << 32
_LOG_PAGE_SHIFT = 12
_NET_HDR_MRG = 12
_ETH_HLEN = 14
# virtio-blk (section 5.2.6), fallocate(2) modes and errno values.
_BLK_T_IN = 0
_BLK_T_OUT = 1
_BLK_T_FLUSH = 4
_BLK_T_GET_ID = 8
_BLK_T_DISCARD = 11
_BLK_T_WRITE_ZEROES = 13
_BLK_S_OK = 0
_BLK_S_IOERR = 1
_BLK_S_UNSUPP = 2
_BLK_HEADER = 16
_BLK_SEGMENT = 16
_BLK_ID_BYTES = 20
_BLK_UNMAP = 1
_SECTOR_SHIFT = 9
_SECTOR_MASK = 511
_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_FALLOC_ZERO_RANGE = 0x10
_EINTR = 4

# Received frames are published every so many, within a burst, as DPDK
# flushes its shadow used ring every few descriptors.
_PUBLISH_EVERY = 8

# Results of rx_deliver.
_DELIVERED = 1
_NO_BUFFER = 0
_DROPPED = 2
_BROKEN = -1

# --------------------------------------------------------------------------- intrinsics

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_X86 = platform.machine() in ("x86_64", "AMD64", "i686")
# struct epoll_event is packed on x86-64 (u32 events, then the u64 data at
# offset 4) and naturally aligned elsewhere.
EPOLL_EVENT_SIZE = 12 if _X86 else 16
_EPOLL_DATA_OFFSET = 4 if _X86 else 8


def _ptr(builder: Any, addr: Any, width: Any) -> Any:
    return builder.inttoptr(addr, width.as_pointer())


def _load(width: Any, ordering: str | None) -> Callable[..., Any]:
    bits = width.width

    def typer(typingctx: Any, addr: Any) -> Any:
        sig = types.int64(types.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            ptr = _ptr(builder, args[0], width)
            if ordering is None:
                value = builder.load(ptr, align=bits // 8)
            else:
                value = builder.load_atomic(ptr, ordering, bits // 8)
            return value if bits == 64 else builder.zext(value, _I64)

        return sig, codegen

    typer.__name__ = typer.__qualname__ = f"_ld_u{bits}_{ordering or 'plain'}"
    return _intrinsic(typer)


def _store(width: Any, ordering: str | None) -> Callable[..., Any]:
    bits = width.width

    def typer(typingctx: Any, addr: Any, value: Any) -> Any:
        sig = types.void(types.int64, types.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            ptr = _ptr(builder, args[0], width)
            value = args[1] if bits == 64 else builder.trunc(args[1], width)
            if ordering is None:
                builder.store(value, ptr, align=bits // 8)
            else:
                builder.store_atomic(value, ptr, ordering, bits // 8)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = f"_st_u{bits}_{ordering or 'plain'}"
    return _intrinsic(typer)


_ld_u8 = _load(_I8, None)
_ld_u16 = _load(_I16, None)
_ld_u32 = _load(_I32, None)
_ld_u64 = _load(_I64, None)
_ld_acq_u16 = _load(_I16, "acquire")
_st_u8 = _store(_I8, None)
_st_u16 = _store(_I16, None)
_st_u32 = _store(_I32, None)
_st_u64 = _store(_I64, None)
_st_rel_u16 = _store(_I16, "release")


@_intrinsic
def _fence(typingctx: Any) -> Any:
    """A sequentially consistent fence (``mfence`` on x86)."""
    sig = types.void()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@_intrinsic
def _cpu_relax(typingctx: Any) -> Any:
    """Tell the core we are spinning (``pause`` on x86, nothing elsewhere)."""
    sig = types.void()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        if _X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            builder.call(
                cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause"), []
            )
        return context.get_dummy_value()

    return sig, codegen


def _prefetcher(write: int) -> Callable[..., Any]:
    """An intrinsic that starts loading a cache line (``prefetcht0``, or ``prefetchw``)."""

    def typer(typingctx: Any, addr: Any) -> Any:
        sig = types.void(types.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            rw, keep, data = (ir.Constant(_I32, v) for v in (write, 3, 1))
            builder.call(fn, [builder.inttoptr(args[0], _I8.as_pointer()), rw, keep, data])
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = "_prefetch_write" if write else "_prefetch"
    return _intrinsic(typer)


# Prefetches never fault, whatever the address.
_prefetch = _prefetcher(0)
_prefetch_write = _prefetcher(1)


@_intrinsic
def _atomic_or_u8(typingctx: Any, addr: Any, value: Any) -> Any:
    """OR a byte atomically: the front-end harvests the dirty log concurrently."""
    sig = types.void(types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.atomic_rmw(
            "or", _ptr(builder, args[0], _I8), builder.trunc(args[1], _I8), "monotonic"
        )
        return context.get_dummy_value()

    return sig, codegen


@_intrinsic
def _memcpy(typingctx: Any, dst: Any, src: Any, count: Any) -> Any:
    """``memcpy`` between host addresses (libc's, for long copies)."""
    sig = types.void(types.int64, types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        p8 = _I8.as_pointer()
        dst_ptr = builder.inttoptr(args[0], p8)
        src_ptr = builder.inttoptr(args[1], p8)
        cgutils.raw_memcpy(builder, dst_ptr, src_ptr, args[2], 1)
        return context.get_dummy_value()

    return sig, codegen


def _copy_fixed(count: int) -> Callable[..., Any]:
    """An intrinsic copying exactly ``count`` bytes: a few unaligned vector moves, no call."""

    def typer(typingctx: Any, dst: Any, src: Any) -> Any:
        sig = types.void(types.int64, types.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            p8 = _I8.as_pointer()
            dst_ptr = builder.inttoptr(args[0], p8)
            src_ptr = builder.inttoptr(args[1], p8)
            cgutils.raw_memcpy(builder, dst_ptr, src_ptr, ir.Constant(_I64, count), 1)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = f"_copy{count}"
    return _intrinsic(typer)


_copy64 = _copy_fixed(64)
_copy32 = _copy_fixed(32)
_copy16 = _copy_fixed(16)
_copy8 = _copy_fixed(8)
_copy4 = _copy_fixed(4)
_copy2 = _copy_fixed(2)
_copy1 = _copy_fixed(1)


def _view(dtype: Any, inner: int) -> Callable[..., Any]:
    """An intrinsic viewing host memory as a C-contiguous array (no owner, no refcount).

    ``inner`` 0 gives a 1-D array of ``rows`` items, otherwise ``rows`` rows
    of ``inner`` items.
    """
    ndim = 2 if inner else 1
    arrty = types.Array(dtype, ndim, "C")

    def typer(typingctx: Any, addr: Any, rows: Any) -> Any:
        sig = arrty(types.int64, types.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            itemsize = context.get_abi_sizeof(context.get_data_type(dtype))
            intp = context.get_value_type(types.intp)
            dims = [args[1], ir.Constant(intp, inner)][:ndim]
            steps = [ir.Constant(intp, itemsize * (inner or 1)), ir.Constant(intp, itemsize)]
            array = context.make_array(arrty)(context, builder)
            context.populate_array(
                array,
                data=builder.inttoptr(args[0], context.get_data_type(dtype).as_pointer()),
                shape=cgutils.pack_array(builder, dims),
                strides=cgutils.pack_array(builder, steps[:ndim]),
                itemsize=ir.Constant(intp, itemsize),
                meminfo=None,
            )
            return array._getvalue()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = f"_view_{dtype}_{inner}"
    return _intrinsic(typer)


# A row of int64 (a queue, a unit, counters); a translation table of uint64[n, 5];
# pairs of int64 (a packed queue's shadow of unpublished used descriptors, a
# blk unit's iovec array).
_row = _view(types.int64, 0)
_table = _view(types.uint64, 5)
_pairs = _view(types.int64, 2)


@_intrinsic
def _ld_shared(typingctx: Any, array: Any, index: Any) -> Any:
    """Load an int64 element another thread may write while the worker runs.

    Atomic (never torn) and never hoisted out of the worker's loop.
    """
    sig = types.int64(array, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        data = context.make_array(array)(context, builder, value=args[0]).data
        return builder.load_atomic(builder.gep(data, [args[1]]), "monotonic", 8)

    return sig, codegen


@_intrinsic
def _st_shared(typingctx: Any, array: Any, index: Any, value: Any) -> Any:
    """Store an int64 element another thread reads while the worker runs."""
    sig = types.void(array, types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        data = context.make_array(array)(context, builder, value=args[0]).data
        builder.store_atomic(args[2], builder.gep(data, [args[1]]), "monotonic", 8)
        return context.get_dummy_value()

    return sig, codegen


def _libc(name: str, params: tuple[Any, ...], result: Any) -> Callable[..., Any]:
    """An intrinsic calling libc's ``name``: int64 arguments narrowed to ``params``.

    The result is widened back to int64 (sign-extended: -1 stays -1).
    """

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fnty = ir.FunctionType(result, list(params))
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        narrow = [
            arg if param.width == 64 else builder.trunc(arg, param)
            for arg, param in zip(args, params, strict=True)
        ]
        value = builder.call(fn, narrow)
        return value if result.width == 64 else builder.sext(value, _I64)

    def typer1(typingctx: Any, a: Any) -> Any:
        return types.int64(types.int64), codegen

    def typer3(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        return types.int64(types.int64, types.int64, types.int64), codegen

    def typer4(typingctx: Any, a: Any, b: Any, c: Any, d: Any) -> Any:
        return types.int64(types.int64, types.int64, types.int64, types.int64), codegen

    typers: dict[int, Callable[..., Any]] = {1: typer1, 3: typer3, 4: typer4}
    typer = typers[len(params)]
    typer.__name__ = typer.__qualname__ = f"_libc_{name}"
    return _intrinsic(typer)


def _eventfd_io(name: str, value: int) -> Callable[..., Any]:
    """An intrinsic doing ``name(fd, &counter, 8)`` on an eventfd, ``counter`` set to ``value``.

    ``write`` with 1 signals the eventfd; ``read`` takes (and so resets) its count.
    """

    def typer(typingctx: Any, fd: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            slot = cgutils.alloca_once_value(builder, ir.Constant(_I64, value))
            buf = builder.ptrtoint(slot, _I64)
            fnty = ir.FunctionType(_I64, [_I32, _I64, _I64])
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            return builder.call(fn, [builder.trunc(args[0], _I32), buf, ir.Constant(_I64, 8)])

        return types.int64(types.int64), codegen

    typer.__name__ = typer.__qualname__ = f"_eventfd_{name}"
    return _intrinsic(typer)


_eventfd_signal = _eventfd_io("write", 1)
_eventfd_drain = _eventfd_io("read", 0)

# Pointers travel as int64.
# ``epoll_wait(epfd, events, maxevents, timeout_ms)`` blocks without the GIL.
_epoll_wait = _libc("epoll_wait", (_I32, _I64, _I32, _I32), _I32)
_preadv = _libc("preadv", (_I32, _I64, _I32, _I64), _I64)
_pwritev = _libc("pwritev", (_I32, _I64, _I32, _I64), _I64)
_pwrite = _libc("pwrite", (_I32, _I64, _I64, _I64), _I64)
_fallocate = _libc("fallocate", (_I32, _I32, _I64, _I64), _I32)
_fdatasync = _libc("fdatasync", (_I32,), _I32)
# The iovecs are int64 pairs (address, length): struct iovec on 64-bit Linux.
_readv = _libc("readv", (_I32, _I64, _I32), _I64)
_writev = _libc("writev", (_I32, _I64, _I32), _I64)


@_intrinsic
def _errno(typingctx: Any) -> Any:
    """The calling thread's ``errno``."""
    sig = types.int64()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fnty = ir.FunctionType(_I32.as_pointer(), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "__errno_location")
        return builder.sext(builder.load(builder.call(fn, [])), _I64)

    return sig, codegen


@_intrinsic
def _monotonic_ns(typingctx: Any) -> Any:
    """``CLOCK_MONOTONIC`` in nanoseconds (a vDSO call, no system call)."""
    sig = types.int64()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        timespec = cgutils.alloca_once(builder, ir.ArrayType(_I64, 2))
        base = builder.bitcast(timespec, _I64.as_pointer())
        fnty = ir.FunctionType(_I32, [_I32, _I64.as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [ir.Constant(_I32, 1), base])
        seconds = builder.load(base)
        nanos = builder.load(builder.gep(base, [ir.Constant(_I32, 1)]))
        return builder.add(builder.mul(seconds, ir.Constant(_I64, 1_000_000_000)), nanos)

    return sig, codegen


# --------------------------------------------------------------------------- guest memory


@_kernel
def _copy(dst: Any, src: Any, count: Any) -> None:
    """Copy ``count`` bytes between host addresses (ranges that do not overlap).

    Copies up to 4 KiB, frames among them, are inlined as overlapping
    fixed-size vector moves, as DPDK's ``rte_memcpy`` does: a libc call and
    the start-up cost of ``rep movsb`` would dominate them.  A hostile driver
    may make two buffers overlap; the bytes are then unspecified, but
    nothing outside the two checked ranges is touched.
    """
    if count >= 4096:
        _memcpy(dst, src, count)
    elif count >= 64:
        last = count - 64
        offset = 0
        while offset < last:
            _copy64(dst + offset, src + offset)
            offset += 64
        _copy64(dst + last, src + last)
    elif count >= 32:
        _copy32(dst, src)
        _copy32(dst + count - 32, src + count - 32)
    elif count >= 16:
        _copy16(dst, src)
        _copy16(dst + count - 16, src + count - 16)
    elif count >= 8:
        _copy8(dst, src)
        _copy8(dst + count - 8, src + count - 8)
    elif count >= 4:
        _copy4(dst, src)
        _copy4(dst + count - 4, src + count - 4)
    elif count >= 2:
        _copy2(dst, src)
        _copy2(dst + count - 2, src + count - 2)
    elif count == 1:
        _copy1(dst, src)


@_kernel
def _find(regs: Any, addr: Any) -> Any:
    """Index of the last table row starting at or below ``addr``, -1 if none (binary search)."""
    lo = 0
    hi = regs.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if regs[mid, 0] <= addr:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@_kernel
def _translate(q: Any, gpa: Any, length: Any, access: Any) -> Any:
    """Host address of device range ``[gpa, gpa + length)``, or -1 unless one row holds it.

    The row must also allow ``access``.  ``gpa`` is the descriptor's 64-bit
    address as an int64 bit pattern; comparisons are unsigned, so no address
    wraps around.
    """
    regs = _table(q[Q_REGS], q[Q_NREGS])
    addr = np.uint64(gpa)
    count = np.uint64(length)
    r = _find(regs, addr)
    if r >= 0:
        offset = addr - regs[r, 0]
        size = regs[r, 1]
        if offset < size and count <= size - offset and regs[r, 3] & access == access:
            return np.int64(regs[r, 2] + offset)
    return np.int64(-1)


@_kernel
def _resolve(q: Any, gpa: Any, length: Any, access: Any) -> Any:
    """What ``_translate`` could not: a host address, or -1 (ring broken) or -2 (a miss).

    Without an IOTLB a range outside one row breaks the ring.  With one, the
    rules of :meth:`pyvdpa.memory.Iotlb.translate` and then
    :meth:`pyvdpa.memory.GuestMemory.uva_view`: a range may run over entries
    that go on from one another in front-end memory (``ACCESS_ADJOINS``),
    each permitting ``access``; the first byte no row covers is a miss (the
    front-end has not mapped it yet: the queue stalls until the control plane
    brings new translations); an entry without the permission, or a neighbour
    that does not adjoin its row, breaks the ring.  A range translated whole
    must then be one view in this process (rows with memory that continue one
    another, ``ACCESS_CONTINUES``), or it breaks the ring as memory outside
    the table does.
    """
    if q[Q_IOTLB] == 0:
        _fail(q, E_BUFFER, gpa, length)
        return np.int64(-1)
    regs = _table(q[Q_REGS], q[Q_NREGS])
    addr = np.uint64(gpa)
    end = addr + np.uint64(max(length, 1))
    r = _find(regs, addr)
    miss = addr
    perm = access << ACCESS_PERM_SHIFT
    if r >= 0 and addr - regs[r, 0] < regs[r, 1]:
        host = np.int64(regs[r, 2] + (addr - regs[r, 0]))
        # Whether the rows so far are one range of this process's memory.
        here = regs[r, 3] & access == access
        while True:
            if regs[r, 3] & perm != perm:
                _fail(q, E_BUFFER, gpa, length)
                return np.int64(-1)
            stop = regs[r, 0] + regs[r, 1]
            if stop >= end:
                if not here:
                    _fail(q, E_BUFFER, gpa, length)
                    return np.int64(-1)
                return host
            r += 1
            if r == regs.shape[0] or regs[r, 0] != stop:
                miss = stop
                break
            if regs[r, 3] & ACCESS_ADJOINS == 0:
                _fail(q, E_BUFFER, gpa, length)
                return np.int64(-1)
            here = here and regs[r, 3] & ACCESS_CONTINUES != 0
    q[Q_MISS_ADDR] = np.int64(miss)
    q[Q_MISS_ACCESS] = access
    q[Q_STALLED] = 1
    fd = q[Q_ATTN_FD]
    if fd >= 0:
        _eventfd_signal(fd)
    return np.int64(-2)


@_kernel
def _log_pages(q: Any, gpa: Any, length: Any) -> None:
    """Mark the guest pages of guest-physical ``[gpa, gpa + length)`` dirty."""
    if gpa < 0:
        q[Q_LOG_MISSED] += 1
        return
    first = gpa >> _LOG_PAGE_SHIFT
    last = (gpa + length - 1) >> _LOG_PAGE_SHIFT
    limit = q[Q_LOG_SIZE] * 8
    if last >= limit:
        q[Q_LOG_MISSED] += last - max(first, limit) + 1
        last = limit - 1
    log = q[Q_LOG]
    for pfn in range(first, last + 1):
        _atomic_or_u8(log + (pfn >> 3), 1 << (pfn & 7))


@_kernel
def log_write(q: Any, addr: Any, length: Any) -> None:
    """Mark the guest pages of device range ``[addr, addr + length)`` dirty, if the queue logs.

    Device addresses are guest-physical, or IOVAs with an IOTLB: each part
    is then logged at the guest-physical address its table row gives, and a
    part no row translates is counted as missed (the front-end invalidated
    it under a running ring).
    """
    if q[Q_LOG] == 0 or length <= 0:
        return
    if q[Q_IOTLB] == 0:
        _log_pages(q, addr, length)
        return
    regs = _table(q[Q_REGS], q[Q_NREGS])
    at = np.uint64(addr)
    end = at + np.uint64(length)
    r = _find(regs, at)
    if r < 0:
        r = 0
    while at < end:
        if (
            r < regs.shape[0]
            and regs[r, 0] <= at < regs[r, 0] + regs[r, 1]
            and regs[r, 3] & (ACCESS_READ | ACCESS_WRITE) != 0
        ):
            stop = min(end, regs[r, 0] + regs[r, 1])
            _log_pages(q, np.int64(regs[r, 4] + (at - regs[r, 0])), np.int64(stop - at))
            at = stop
            r += 1
        elif r < regs.shape[0] and regs[r, 0] <= at:
            r += 1
        else:
            stop = end if r == regs.shape[0] else min(end, regs[r, 0])
            q[Q_LOG_MISSED] += 1
            at = stop


# --------------------------------------------------------------------------- chains


@_kernel
def _fail(q: Any, code: Any, a: Any, b: Any) -> Any:
    q[Q_ERROR] = code
    q[Q_ERROR_A] = a
    q[Q_ERROR_B] = b
    return (ERROR, 0, 0, 0, 0, 0, 0)


@_inlined
def walk(q: Any, segs: Any, base: Any, table: Any, entries: Any, first: Any, packed: Any) -> Any:
    """Walk and validate the chain at entry ``first`` of the table at host address ``table``.

    Mirrors :func:`pyvdpa.virtio.ring.walk_chain`.  Returns ``(status,
    segments, readable segments, readable bytes, writable bytes, entries used
    in the queue's own table, index of the last of them)``; ``segs`` rows
    from ``base`` on receive (gpa, host address, length, writable), readable
    ones first.  On a broken rule the status is ERROR and the row holds the
    error.
    """
    size = q[Q_SIZE]
    count = 0
    total = 0
    nseg = 0
    nread = 0
    nwrite = 0
    rlen = 0
    wlen = 0
    index = first
    steps = 0
    nested = False
    own_steps = 0
    own_last = first
    while True:
        d = table + 16 * index
        addr = _ld_u64(d)
        length = _ld_u32(d + 8)
        third = _ld_u16(d + 12)
        fourth = _ld_u16(d + 14)
        flags = fourth if packed else third
        steps += 1
        if flags & _INDIRECT:
            code = 0
            if q[Q_INDIRECT] == 0:
                code = E_INDIRECT_FEATURE
            elif nested:
                code = E_INDIRECT_NESTED
            elif packed and steps > 1:
                code = E_INDIRECT_CHAINED
            elif flags & _NEXT:
                code = E_INDIRECT_NEXT
            elif length == 0 or length % 16:
                code = E_INDIRECT_LENGTH
            if code:
                return _fail(q, code, length, 0)
            sub = _translate(q, addr, length, ACCESS_READ)
            if sub < 0:
                sub = _resolve(q, addr, length, ACCESS_READ)
                if sub < 0:
                    return (ERROR if sub == -1 else _MISS, 0, 0, 0, 0, 0, 0)
            own_steps = steps
            own_last = index
            nested = True
            table = sub
            entries = length // 16
            index = 0
            steps = 0
            continue
        count += 1
        if count > size:
            return _fail(q, E_TOO_MANY, size, 0)
        total += length
        if total >= _MAX_CHAIN_BYTES:
            return _fail(q, E_TOO_BIG, total, 0)
        writable = flags & _WRITE
        if not writable and nwrite:
            return _fail(q, E_LAYOUT, 0, 0)
        access = ACCESS_WRITE if writable else ACCESS_READ
        host = _translate(q, addr, length, access)
        if host < 0:
            host = _resolve(q, addr, length, access)
            if host < 0:
                return (ERROR if host == -1 else _MISS, 0, 0, 0, 0, 0, 0)
        row = base + nseg
        segs[row, 0] = addr
        segs[row, 1] = host
        segs[row, 2] = length
        segs[row, 3] = 1 if writable else 0
        nseg += 1
        if writable:
            nwrite += 1
            wlen += length
        else:
            nread += 1
            rlen += length
        if packed and nested:
            # A packed indirect table is used whole; its NEXT flags mean nothing.
            if steps == entries:
                break
            index += 1
        elif not flags & _NEXT:
            break
        elif packed:
            # Consecutive slots; wrapping onto the head is caught by the count rule.
            index += 1
            if index == entries:
                index = 0
        else:
            if steps == entries:
                return _fail(q, E_LOOP, entries, 0)
            if fourth >= entries:
                return _fail(q, E_NEXT_INDEX, fourth, entries)
            index = fourth
    if nested:
        return (POPPED, nseg, nread, rlen, wlen, own_steps, own_last)
    return (POPPED, nseg, nread, rlen, wlen, steps, index)


@_kernel
def _is_avail(flags: Any, wrap: Any) -> Any:
    both = flags & (_AVAIL | _USED)
    return both == (_AVAIL if wrap else _USED)


@_kernel
def _set_avail_event(q: Any, idx: Any) -> None:
    offset = 4 + 8 * q[Q_SIZE]
    _st_u16(q[Q_DEVICE] + offset, idx & 0xFFFF)
    if q[Q_LOG]:
        log_write(q, q[Q_LOG_RING] + offset, 2)


@_kernel
def _set_used_flags(q: Any, flags: Any) -> None:
    _st_u16(q[Q_DEVICE], flags)
    if q[Q_LOG]:
        log_write(q, q[Q_LOG_RING], 2)


@_kernel
def _prefetch_avail(q: Any, count: Any) -> None:
    """Start loading the first buffer line of the next ``count`` available chains, for writing.

    A hint only: nothing is consumed and nothing validated; an address
    outside guest memory is skipped.
    """
    size = q[Q_SIZE]
    desc = q[Q_DESC]
    if q[Q_PACKED]:
        idx = q[Q_LAST_AVAIL]
        wrap = q[Q_AVAIL_WRAP]
        for _ in range(min(count, size)):
            d = desc + 16 * idx
            if not _is_avail(_ld_acq_u16(d + 14), wrap):
                break
            host = _translate(q, _ld_u64(d), 1, 0)
            if host >= 0:
                _prefetch_write(host)
            idx += 1
            if idx == size:
                idx = 0
                wrap ^= 1
        return
    last = q[Q_LAST_AVAIL]
    avail = q[Q_DRIVER]
    pending = (_ld_acq_u16(avail + 2) - last) & 0xFFFF
    for i in range(min(count, pending, size)):
        head = _ld_u16(avail + 4 + 2 * ((last + i) & (size - 1)))
        if head >= size:
            break
        host = _translate(q, _ld_u64(desc + 16 * head), 1, 0)
        if host >= 0:
            _prefetch_write(host)


@_inlined
def ring_pop(q: Any, segs: Any, base: Any) -> Any:
    """Pop and validate the next available chain.

    Returns ``(status, id, segments, readable segments, readable bytes,
    writable bytes, desc_count)``: status POPPED, EMPTY, or ERROR when the
    queue is (or just became) broken; nothing is consumed then.  A queue
    stalled on a missing translation is EMPTY until the control plane clears
    ``Q_STALLED``; the chain that missed is walked again from the start.  The
    segments go to ``segs`` rows from ``base`` on.
    """
    if q[Q_ERROR]:
        return (ERROR, 0, 0, 0, 0, 0, 0)
    if _ld_shared(q, Q_STALLED):
        return (EMPTY, 0, 0, 0, 0, 0, 0)
    size = q[Q_SIZE]
    if q[Q_PACKED]:
        idx = q[Q_LAST_AVAIL]
        wrap = q[Q_AVAIL_WRAP]
        desc = q[Q_DESC]
        if not _is_avail(_ld_acq_u16(desc + 16 * idx + 14), wrap):
            return (EMPTY, 0, 0, 0, 0, 0, 0)
        status, nseg, nread, rlen, wlen, dc, last = walk(q, segs, base, desc, size, idx, True)
        if status != POPPED:
            return (EMPTY if status == _MISS else ERROR, 0, 0, 0, 0, 0, 0)
        ident = _ld_u16(desc + 16 * last + 12)
        if ident >= size:
            return _fail(q, E_ID_INDEX, ident, size)
        if q[Q_INFLIGHT_SLOTS] + dc > size:
            return _fail(q, E_AVAIL_SLOTS, dc, q[Q_INFLIGHT_SLOTS])
        idx += dc
        if idx >= size:
            idx -= size
            wrap ^= 1
        q[Q_LAST_AVAIL] = idx
        q[Q_AVAIL_WRAP] = wrap
        q[Q_INFLIGHT_SLOTS] += dc
        q[Q_INFLIGHT] += 1
        if q[Q_NOTIFY] and q[Q_EVENT_IDX]:
            # Keep asking for a kick at the next slot the driver fills.
            _st_u16(q[Q_DEVICE], idx | (wrap << 15))
        return (POPPED, ident, nseg, nread, rlen, wlen, dc)
    last = q[Q_LAST_AVAIL]
    avail = q[Q_DRIVER]
    if last == q[Q_AVAIL_SEEN]:
        idx = _ld_acq_u16(avail + 2)
        pending = (idx - last) & 0xFFFF
        if pending == 0:
            return (EMPTY, 0, 0, 0, 0, 0, 0)
        if pending > size:
            return _fail(q, E_AVAIL_JUMP, idx, last)
        q[Q_AVAIL_SEEN] = idx
    head = _ld_u16(avail + 4 + 2 * (last & (size - 1)))
    if head >= size:
        return _fail(q, E_HEAD_INDEX, head, size)
    status, nseg, nread, rlen, wlen, dc, _ = walk(q, segs, base, q[Q_DESC], size, head, False)
    if status != POPPED:
        return (EMPTY if status == _MISS else ERROR, 0, 0, 0, 0, 0, 0)
    last = (last + 1) & 0xFFFF
    q[Q_LAST_AVAIL] = last
    q[Q_INFLIGHT] += 1
    if q[Q_NOTIFY] and q[Q_EVENT_IDX]:
        # Keep asking for a kick at the next buffer the driver adds.
        _set_avail_event(q, last)
    return (POPPED, head, nseg, nread, rlen, wlen, dc)


@_kernel
def _unpop(q: Any, count: Any, slots: Any) -> None:
    """Give back the last ``count`` chains popped (``slots`` ring slots), unused and unpushed."""
    if q[Q_PACKED]:
        idx = q[Q_LAST_AVAIL] - slots
        if idx < 0:
            idx += q[Q_SIZE]
            q[Q_AVAIL_WRAP] ^= 1
        q[Q_LAST_AVAIL] = idx
        q[Q_INFLIGHT_SLOTS] -= slots
    else:
        q[Q_LAST_AVAIL] = (q[Q_LAST_AVAIL] - count) & 0xFFFF
    q[Q_INFLIGHT] -= count


@_inlined
def push(q: Any, ident: Any, written: Any, desc_count: Any) -> None:
    """Return a chain: write its used element (split) or record its used descriptor (packed).

    Nothing is visible to the driver before :func:`publish`, once per burst.
    """
    size = q[Q_SIZE]
    used = q[Q_USED_IDX]
    if q[Q_PACKED]:
        flags = (_AVAIL | _USED) if q[Q_USED_WRAP] else 0
        if written:
            flags |= _WRITE
        shadow = _pairs(q[Q_SHADOW], size)
        n = q[Q_UNPUBLISHED]
        shadow[n, 0] = used
        shadow[n, 1] = ident | (flags << 16) | (written << 32)
        q[Q_UNPUBLISHED] = n + 1
        used += desc_count
        if used >= size:
            used -= size
            q[Q_USED_WRAP] ^= 1
        q[Q_USED_IDX] = used
        q[Q_INFLIGHT_SLOTS] -= desc_count
        q[Q_UNSIGNALLED] += desc_count
    else:
        offset = 4 + 8 * (used & (size - 1))
        _st_u64(q[Q_DEVICE] + offset, ident | (written << 32))
        q[Q_USED_IDX] = (used + 1) & 0xFFFF
        q[Q_UNPUBLISHED] += 1
        q[Q_UNSIGNALLED] += 1
        if q[Q_LOG]:
            log_write(q, q[Q_LOG_RING] + offset, 8)
    q[Q_INFLIGHT] -= 1


@_kernel
def _write_used(q: Any, slot: Any, entry: Any) -> None:
    """Write one packed used descriptor; its flags, released last, hand it to the driver."""
    offset = 16 * slot
    d = q[Q_DESC] + offset
    _st_u32(d + 8, entry >> 32)
    _st_u16(d + 12, entry & 0xFFFF)
    _st_rel_u16(d + 14, (entry >> 16) & 0xFFFF)
    if q[Q_LOG]:
        log_write(q, q[Q_LOG_RING] + offset, 16)


@_kernel
def publish(q: Any) -> None:
    """Make the chains pushed since the last call visible to the driver.

    Split: one release store of ``used.idx``.  Packed: the recorded used
    descriptors are written, the first one's flags last, so the driver
    takes the whole batch at once and the ring's cache lines, which the
    driver writes too, change hands once per batch (as DPDK's shadow used
    ring does).
    """
    n = q[Q_UNPUBLISHED]
    if n == 0:
        return
    q[Q_UNPUBLISHED] = 0
    if q[Q_PACKED]:
        shadow = _pairs(q[Q_SHADOW], q[Q_SIZE])
        for i in range(1, n):
            _write_used(q, shadow[i, 0], shadow[i, 1])
        _write_used(q, shadow[0, 0], shadow[0, 1])
        return
    _st_rel_u16(q[Q_DEVICE] + 2, q[Q_USED_IDX])
    if q[Q_LOG]:
        log_write(q, q[Q_LOG_RING] + 2, 2)


@_kernel
def _need_event(event: Any, new: Any, old: Any) -> Any:
    """``vring_need_event`` (section 2.7.10), modulo 2**16."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@_kernel
def should_notify(q: Any) -> Any:
    """Whether the driver wants a used-buffer notification for the pushes since the last call.

    Those pushes count as signalled whatever the answer, as in
    :meth:`pyvdpa.virtio.split.SplitDeviceQueue.should_notify`.
    """
    pushed = q[Q_UNSIGNALLED]
    if pushed == 0:
        return False
    q[Q_UNSIGNALLED] = 0
    # The driver may have changed its suppression after our publish.
    _fence()
    new = q[Q_USED_IDX]
    if q[Q_PACKED]:
        area = q[Q_DRIVER]
        off_wrap = _ld_u16(area)
        mode = _ld_u16(area + 2) & 3
        if mode == _EV_DISABLE:
            return False
        if mode == _EV_DESC and q[Q_EVENT_IDX]:
            event = off_wrap & 0x7FFF
            if (off_wrap >> 15) != q[Q_USED_WRAP]:
                event -= q[Q_SIZE]
            return _need_event(event, new, new - min(pushed, 0xFFFF))
        return True
    if q[Q_EVENT_IDX]:
        used_event = _ld_u16(q[Q_DRIVER] + 4 + 2 * q[Q_SIZE])
        return _need_event(used_event, new, new - min(pushed, 0xFFFF))
    return not _ld_u16(q[Q_DRIVER]) & _NO_INTERRUPT


@_kernel
def disable_notification(q: Any) -> None:
    """Ask the driver not to kick (NO_NOTIFY, a held-back ``avail_event``, or DISABLE)."""
    q[Q_NOTIFY] = 0
    if q[Q_PACKED]:
        _st_u16(q[Q_DEVICE] + 2, _EV_DISABLE)
    elif q[Q_EVENT_IDX]:
        _set_avail_event(q, q[Q_LAST_AVAIL] - 1)
    else:
        _set_used_flags(q, _NO_NOTIFY)


@_kernel
def _head_available(q: Any) -> Any:
    if q[Q_PACKED]:
        flags = _ld_acq_u16(q[Q_DESC] + 16 * q[Q_LAST_AVAIL] + 14)
        return _is_avail(flags, q[Q_AVAIL_WRAP])
    return _ld_acq_u16(q[Q_DRIVER] + 2) != q[Q_LAST_AVAIL]


@_kernel
def enable_notification(q: Any) -> Any:
    """Ask the driver to kick for new buffers; return True if some arrived already."""
    q[Q_NOTIFY] = 1
    if q[Q_PACKED]:
        if q[Q_EVENT_IDX]:
            _st_u16(q[Q_DEVICE], q[Q_LAST_AVAIL] | (q[Q_AVAIL_WRAP] << 15))
            _st_u16(q[Q_DEVICE] + 2, _EV_DESC)
        else:
            _st_u16(q[Q_DEVICE] + 2, _EV_ENABLE)
    elif q[Q_EVENT_IDX]:
        _set_avail_event(q, q[Q_LAST_AVAIL])
    else:
        _set_used_flags(q, 0)
    # The driver may have added a buffer before it could see the request.
    _fence()
    return _head_available(q)


@_kernel
def _complete(q: Any) -> None:
    """Publish a burst's used entries and interrupt the driver if it asked."""
    publish(q)
    if q[Q_ERROR] == 0 and should_notify(q):
        fd = _ld_shared(q, Q_CALL_FD)
        if fd >= 0:
            _eventfd_signal(fd)
            _row(q[Q_STATS], NSTATS)[S_CALLS] += 1


@_kernel
def _count_error(q: Any) -> None:
    """Count a ring error under the DPDK counter that names it."""
    stats = _row(q[Q_STATS], NSTATS)
    code = q[Q_ERROR]
    if code in (E_TOO_MANY, E_TOO_BIG):
        stats[S_EXCEED_MAX_CHAIN] += 1
    elif code == E_BUFFER:
        stats[S_INVALID_BUFFER] += 1
    else:
        stats[S_BAD_DESC_ERRORS] += 1


# --------------------------------------------------------------------------- scatter-gather


@_kernel
def _sg_write(q: Any, segs: Any, first: Any, end: Any, offset: Any, src: Any, count: Any) -> None:
    """Copy ``count`` bytes from host address ``src`` into segments [first, end) at ``offset``."""
    i = first
    while count > 0 and i < end:
        length = segs[i, 2]
        if offset >= length:
            offset -= length
            i += 1
            continue
        n = min(length - offset, count)
        _copy(segs[i, 1] + offset, src, n)
        if q[Q_LOG]:
            log_write(q, segs[i, 0] + offset, n)
        src += n
        count -= n
        offset = 0
        i += 1


@_kernel
def _sg_copy(
    q: Any,
    dst: Any,
    d_first: Any,
    d_end: Any,
    d_offset: Any,
    src: Any,
    s_first: Any,
    s_end: Any,
    s_offset: Any,
    count: Any,
) -> None:
    """Copy ``count`` bytes between two segment lists, from and to the given stream offsets."""
    i = s_first
    while i < s_end and s_offset >= src[i, 2]:
        s_offset -= src[i, 2]
        i += 1
    j = d_first
    while j < d_end and d_offset >= dst[j, 2]:
        d_offset -= dst[j, 2]
        j += 1
    while count > 0 and i < s_end and j < d_end:
        n = min(src[i, 2] - s_offset, dst[j, 2] - d_offset, count)
        _copy(dst[j, 1] + d_offset, src[i, 1] + s_offset, n)
        if q[Q_LOG]:
            log_write(q, dst[j, 0] + d_offset, n)
        count -= n
        s_offset += n
        d_offset += n
        if s_offset == src[i, 2]:
            s_offset = 0
            i += 1
        if d_offset == dst[j, 2]:
            d_offset = 0
            j += 1


@_kernel
def _sg_addr(segs: Any, first: Any, end: Any, offset: Any) -> Any:
    """Host address of byte ``offset`` of segments [first, end), or 0 past their end."""
    for i in range(first, end):
        if offset < segs[i, 2]:
            return segs[i, 1] + offset
        offset -= segs[i, 2]
    return 0


@_kernel
def _accepts(segs: Any, first: Any, end: Any, offset: Any, frame_len: Any, mac: Any) -> Any:
    """vdpa_sim_net's receive filter: broadcast, multicast or the device's own MAC."""
    if frame_len < _ETH_HLEN:
        return False
    if segs[first, 2] >= offset + 6:
        host = segs[first, 1] + offset
        dst = _ld_u32(host) | (_ld_u16(host + 4) << 32)
    else:
        dst = 0
        for k in range(6):
            dst |= _ld_u8(_sg_addr(segs, first, end, offset + k)) << (8 * k)
    return (dst & 1) == 1 or dst == mac


# --------------------------------------------------------------------------- net programs


@_inlined
def _rx_deliver(
    rxq: Any,
    u: Any,
    segs: Any,
    held: Any,
    zeros: Any,
    src: Any,
    s_first: Any,
    s_end: Any,
    s_offset: Any,
    src_addr: Any,
    frame_len: Any,
) -> Any:
    """Write one frame into receive chains (section 5.1.6.3).

    The frame comes from segments ``src[s_first:s_end]`` starting at
    ``s_offset``, or from host address ``src_addr`` when it is not 0.
    Returns _DELIVERED, _NO_BUFFER (no chain consumed, but for ones too
    small to use), _DROPPED (chains returned empty) or _BROKEN.
    """
    stats = _row(rxq[Q_STATS], NSTATS)
    hdr = u[U_HDR]
    mrg = u[U_MRG]
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
                return _NO_BUFFER
            if rewindable:
                # Too few buffers yet: put the chains back and wait for more, as
                # Linux vhost-net and DPDK do.
                slots = 0
                for k in range(nheld):
                    slots += held[k, 1]
                _unpop(rxq, nheld, slots)
                stats[S_RECEIVED_DESC] -= nheld
                return _NO_BUFFER
            # A skipped chain lies among them: the frame is lost, the chains go back empty.
            for k in range(nheld):
                push(rxq, held[k, 0], 0, held[k, 1])
            stats[S_DROPPED] += 1
            return _DROPPED
        if status == ERROR:
            _count_error(rxq)
            return _BROKEN
        stats[S_RECEIVED_DESC] += 1
        if wlen < (hdr if nheld == 0 else 1):
            stats[S_INVALID_BUFFER] += 1
            push(rxq, ident, 0, dc)
            stats[S_COMPLETION_ERRORS] += 1
            if nheld:
                rewindable = False
            continue
        if nheld == 0 and segs[nread, 2] >= remaining:
            # The common case: header and frame fit the chain's first buffer.
            host = segs[nread, 1]
            _st_u64(host, 0)
            _st_u16(host + 8, 0)
            if hdr == _NET_HDR_MRG:
                _st_u16(host + 10, 1)
            if src_addr:
                _copy(host + hdr, src_addr, frame_len)
            else:
                _gather(host + hdr, src, s_first, s_end, s_offset, frame_len)
            if rxq[Q_LOG]:
                log_write(rxq, segs[nread, 0], remaining)
            push(rxq, ident, remaining, dc)
            stats[S_COMPLETED_DESC] += 1
            stats[S_PACKETS] += 1
            stats[S_BYTES] += frame_len
            return _DELIVERED
        take = min(wlen, remaining)
        if mrg == 0 and take < remaining:
            stats[S_INVALID_BUFFER] += 1
            push(rxq, ident, 0, dc)
            stats[S_DROPPED] += 1
            return _DROPPED
        offset = 0
        if nheld == 0:
            if segs[nread, 2] >= hdr:
                host = segs[nread, 1]
                _st_u64(host, 0)
                _st_u16(host + 8, 0)
                if hdr == _NET_HDR_MRG:
                    _st_u16(host + 10, 0)
                if rxq[Q_LOG]:
                    log_write(rxq, segs[nread, 0], hdr)
            else:
                _sg_write(rxq, segs, nread, nseg, 0, zeros, hdr)
            if hdr == _NET_HDR_MRG:
                nb_lo = _sg_addr(segs, nread, nseg, 10)
                nb_hi = _sg_addr(segs, nread, nseg, 11)
            offset = hdr
        count = take - offset
        frame_pos = pos + offset - hdr
        if count > 0:
            if src_addr:
                _sg_write(rxq, segs, nread, nseg, offset, src_addr + frame_pos, count)
            else:
                _sg_copy(
                    rxq, segs, nread, nseg, offset, src, s_first, s_end, s_offset + frame_pos, count
                )
        held[nheld, 0] = ident
        held[nheld, 1] = dc
        held[nheld, 2] = take
        nheld += 1
        pos += take
        remaining -= take
    if hdr == _NET_HDR_MRG:
        _st_u8(nb_lo, nheld & 0xFF)
        _st_u8(nb_hi, nheld >> 8)
    for k in range(nheld):
        push(rxq, held[k, 0], held[k, 2], held[k, 1])
        stats[S_COMPLETED_DESC] += 1
    stats[S_PACKETS] += 1
    stats[S_BYTES] += frame_len
    return _DELIVERED


@_kernel
def _gather(dst: Any, segs: Any, first: Any, end: Any, offset: Any, count: Any) -> None:
    """Copy ``count`` bytes of segments [first, end), from stream ``offset``, to host ``dst``."""
    for i in range(first, end):
        if count <= 0:
            break
        length = segs[i, 2]
        if offset >= length:
            offset -= length
            continue
        n = min(length - offset, count)
        _copy(dst, segs[i, 1] + offset, n)
        dst += n
        count -= n
        offset = 0


@_kernel
def _tap_send(fd: Any, segs: Any, first: Any, end: Any, offset: Any, iov: Any) -> Any:
    """Write segments [first, end), from stream ``offset`` on, to ``fd`` as one frame.

    One ``writev`` straight from guest memory; returns its result, -1 when
    the frame has more pieces than one call takes.
    """
    n = 0
    for i in range(first, end):
        length = segs[i, 2]
        if offset >= length:
            offset -= length
            continue
        if n == iov.shape[0]:
            return -1
        iov[n, 0] = segs[i, 1] + offset
        iov[n, 1] = length - offset
        offset = 0
        n += 1
    return _writev(fd, np.int64(iov.ctypes.data), n)


@_kernel
def _transmit(
    u: Any,
    segs_t: Any,
    segs_r: Any,
    held: Any,
    chains: Any,
    sink: Any,
    zeros: Any,
    iov: Any,
) -> Any:
    """Consume a burst of transmitted frames: loop them back, send them to the TAP, or sink them.

    Two phases: pop and validate the whole burst first, starting the load of
    each frame's first bytes, then read the frames.  The driver wrote them
    on another core; by the time they are read, most are on their way.
    """
    txa = u[U_TXQ]
    if txa == 0:
        return 0
    txq = _row(txa, QCOLS)
    if txq[Q_ERROR]:
        return 0
    hdr = u[U_HDR]
    size = txq[Q_SIZE]
    limit = min(u[U_BURST], chains.shape[0])
    count = 0
    base = 0
    while count < limit and base + size <= segs_t.shape[0]:
        status, ident, nseg, nread, rlen, _, dc = ring_pop(txq, segs_t, base)
        if status == EMPTY:
            break
        if status == ERROR:
            _count_error(txq)
            break
        if nread:
            _prefetch(segs_t[base, 1] + hdr)
        chains[count, 0] = ident
        chains[count, 1] = dc
        chains[count, 2] = base
        chains[count, 3] = nread
        chains[count, 4] = rlen
        base += nseg
        count += 1
    if count == 0:
        return 0
    rxa = u[U_RXQ]
    program = u[U_PROGRAM]
    loopback = program == P_LOOPBACK
    rxq = _row(rxa if rxa != 0 else txa, QCOLS)
    rx_ok = loopback and rxa != 0 and rxq[Q_ERROR] == 0
    if rx_ok:
        _prefetch_avail(rxq, count)
    stats = _row(txq[Q_STATS], NSTATS)
    mac = u[U_MAC]
    sink_addr = np.int64(sink.ctypes.data)
    for c in range(count):
        first = chains[c, 2]
        end = first + chains[c, 3]
        rlen = chains[c, 4]
        stats[S_RECEIVED_DESC] += 1
        if rlen < hdr:
            stats[S_INVALID_BUFFER] += 1
        else:
            frame_len = rlen - hdr
            stats[S_PACKETS] += 1
            stats[S_BYTES] += frame_len
            if program == P_TAP:
                # A full TAP (EAGAIN) or one that refuses the frame drops it, as a wire would.
                if _tap_send(u[U_FD], segs_t, first, end, hdr, iov) <= 0:
                    stats[S_DROPPED] += 1
            elif not loopback:
                # What a NIC's DMA would read, up to SINK_SIZE bytes.
                _gather(sink_addr, segs_t, first, end, hdr, min(frame_len, sink.shape[0]))
            elif rx_ok and _accepts(segs_t, first, end, hdr, frame_len, mac):
                result = _rx_deliver(
                    rxq, u, segs_r, held, zeros, segs_t, first, end, hdr, 0, frame_len
                )
                if result == _NO_BUFFER and rxq[Q_STALLED]:
                    # Receive buffers wait for their IOTLB translation, which
                    # is not a full ring: this frame and the rest of the burst
                    # go back to the transmit ring for later, unread.
                    stats[S_RECEIVED_DESC] -= 1
                    stats[S_PACKETS] -= 1
                    stats[S_BYTES] -= frame_len
                    slots = 0
                    for r in range(c, count):
                        slots += chains[r, 1]
                    _unpop(txq, count - c, slots)
                    count = c
                    break
                if result == _NO_BUFFER:
                    _row(rxq[Q_STATS], NSTATS)[S_DROPPED] += 1
                elif result == _BROKEN:
                    rx_ok = False
            else:
                stats[S_DROPPED] += 1
        push(txq, chains[c, 0], 0, chains[c, 1])
        stats[S_COMPLETED_DESC] += 1
        if loopback and rx_ok and c % _PUBLISH_EVERY == _PUBLISH_EVERY - 1:
            # The driver may start on the first frames while the rest are copied.
            publish(rxq)
    # Received frames first: the driver waits for them, not for its buffers back.
    if loopback and rxa != 0:
        _complete(rxq)
    _complete(txq)
    return count


@_kernel
def _generate(u: Any, segs_r: Any, held: Any, zeros: Any) -> Any:
    """Fill a burst of receive buffers with the template frame."""
    rxa = u[U_RXQ]
    if rxa == 0:
        return 0
    rxq = _row(rxa, QCOLS)
    if rxq[Q_ERROR]:
        return 0
    burst = u[U_BURST]
    frame = u[U_FRAME]
    frame_len = u[U_FRAME_LEN]
    _prefetch_avail(rxq, burst)
    done = 0
    while done < burst:
        result = _rx_deliver(rxq, u, segs_r, held, zeros, segs_r, 0, 0, 0, frame, frame_len)
        if result in (_NO_BUFFER, _BROKEN):
            break
        done += 1
    if done:
        _complete(rxq)
    return done


# --------------------------------------------------------------------------- blk program


@_kernel
def _sg_load(segs: Any, first: Any, end: Any, offset: Any, nbytes: Any) -> Any:
    """The little-endian ``nbytes``-byte (4 or 8) integer at ``offset`` of segments [first, end).

    The bytes may straddle segments; the caller checked that they exist.
    """
    if segs[first, 2] >= offset + nbytes:
        host = segs[first, 1] + offset
        return _ld_u64(host) if nbytes == 8 else _ld_u32(host)
    value = 0
    for b in range(nbytes):
        value |= _ld_u8(_sg_addr(segs, first, end, offset + b)) << (8 * b)
    return value


@_kernel
def _sg_store_u8(q: Any, segs: Any, first: Any, end: Any, offset: Any, value: Any) -> None:
    """Store one byte at ``offset`` of segments [first, end), and log it."""
    for i in range(first, end):
        if offset < segs[i, 2]:
            _st_u8(segs[i, 1] + offset, value)
            if q[Q_LOG]:
                log_write(q, segs[i, 0] + offset, 1)
            return
        offset -= segs[i, 2]


@_kernel
def _sg_zero(q: Any, u: Any, segs: Any, first: Any, end: Any, offset: Any, count: Any) -> None:
    """Zero ``count`` bytes of segments [first, end) from ``offset``."""
    chunk = u[U_ZEROS_LEN]
    while count > 0:
        n = min(count, chunk)
        _sg_write(q, segs, first, end, offset, u[U_ZEROS], n)
        offset += n
        count -= n


@_kernel
def _log_segments(q: Any, segs: Any, first: Any, end: Any, count: Any) -> None:
    """Log the first ``count`` bytes of segments [first, end) as written."""
    if q[Q_LOG] == 0:
        return
    for i in range(first, end):
        if count <= 0:
            break
        n = min(segs[i, 2], count)
        log_write(q, segs[i, 0], n)
        count -= n


@_kernel
def _sg_file_io(
    q: Any,
    u: Any,
    segs: Any,
    first: Any,
    end: Any,
    offset: Any,
    count: Any,
    pos: Any,
    out: Any,
    iov: Any,
) -> Any:
    """Move ``count`` bytes between file offset ``pos`` and segments [first, end) from ``offset``.

    ``out`` false: ``preadv`` into the segments (logged as written);
    ``out`` true: ``pwritev`` from them.  The guest's buffers are the I/O
    buffers: nothing is copied.  Returns True when every byte moved.  A
    read meeting the end of the file zeroes the rest, as QEMU's raw files
    do; a write making no progress fails, as does any error but EINTR.
    """
    fd = u[U_BLK_FD]
    iov_addr = np.int64(iov.ctypes.data)
    i = first
    while i < end and offset >= segs[i, 2]:
        offset -= segs[i, 2]
        i += 1
    while count > 0:
        n = 0
        batch = 0
        j = i
        skip = offset
        while n < iov.shape[0] and batch < count and j < end:
            length = min(segs[j, 2] - skip, count - batch)
            if length > 0:
                iov[n, 0] = segs[j, 1] + skip
                iov[n, 1] = length
                if not out and q[Q_LOG]:
                    log_write(q, segs[j, 0] + skip, length)
                n += 1
                batch += length
            skip = 0
            j += 1
        if n == 0:
            return False
        done = _pwritev(fd, iov_addr, n, pos) if out else _preadv(fd, iov_addr, n, pos)
        if done < 0:
            if _errno() == _EINTR:
                continue
            return False
        if done == 0:
            if out:
                return False
            _sg_zero(q, u, segs, i, end, offset, count)
            return True
        count -= done
        pos += done
        offset += done
        while i < end and offset >= segs[i, 2]:
            offset -= segs[i, 2]
            i += 1
    return True


@_kernel
def _blk_range(u: Any, sector: Any, length: Any) -> Any:
    """File offset of ``length`` bytes at ``sector``, or -1 unless whole sectors inside the disk.

    ``sector`` is the request's u64 as an int64 bit pattern: a negative one
    lies beyond any capacity, and the sum cannot overflow once it is below.
    """
    capacity = u[U_CAPACITY]
    if length & _SECTOR_MASK:
        return -1
    if sector < 0 or sector > capacity or sector + (length >> _SECTOR_SHIFT) > capacity:
        return -1
    return sector << _SECTOR_SHIFT


@_kernel
def _falloc(fd: Any, mode: Any, pos: Any, length: Any) -> Any:
    """``fallocate``, retried on EINTR; True on success."""
    while True:
        if _fallocate(fd, mode, pos, length) == 0:
            return True
        if _errno() != _EINTR:
            return False


@_kernel
def _zero_range(u: Any, pos: Any, length: Any) -> Any:
    """Zero file bytes [pos, pos + length): ZERO_RANGE, else by writing zeros."""
    fd = u[U_BLK_FD]
    if _falloc(fd, _FALLOC_ZERO_RANGE | _FALLOC_KEEP_SIZE, pos, length):
        return True
    # Not every file system zeroes ranges (tmpfs, behind a RAM disk, does not).
    while length > 0:
        done = _pwrite(fd, u[U_ZEROS], min(length, u[U_ZEROS_LEN]), pos)
        if done < 0 and _errno() == _EINTR:
            continue
        if done <= 0:
            return False
        pos += done
        length -= done
    return True


@_kernel
def _blk_discard_or_zero(u: Any, segs: Any, nread: Any, kind: Any, data_out: Any) -> Any:
    """Apply the segments of a DISCARD or WRITE_ZEROES request; return the status.

    Like the reference device, each segment is checked and applied before
    the next one is looked at.
    """
    if data_out == 0 or data_out % _BLK_SEGMENT or data_out // _BLK_SEGMENT > u[U_MAX_SEG]:
        return _BLK_S_UNSUPP
    for s in range(data_out // _BLK_SEGMENT):
        at = _BLK_HEADER + _BLK_SEGMENT * s
        sector = _sg_load(segs, 0, nread, at, 8)
        num_sectors = _sg_load(segs, 0, nread, at + 8, 4)
        flags = _sg_load(segs, 0, nread, at + 12, 4)
        if flags & ~_BLK_UNMAP or (kind == _BLK_T_DISCARD and flags):
            return _BLK_S_UNSUPP
        if num_sectors > u[U_MAX_SECTORS]:
            return _BLK_S_IOERR
        length = num_sectors << _SECTOR_SHIFT
        pos = _blk_range(u, sector, length)
        if pos < 0:
            return _BLK_S_IOERR
        if kind == _BLK_T_DISCARD:
            done = _falloc(u[U_BLK_FD], _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, pos, length)
        else:
            done = _zero_range(u, pos, length)
        if not done:
            return _BLK_S_IOERR
    return _BLK_S_OK


@_kernel
def _blk_execute(
    q: Any, u: Any, segs: Any, nseg: Any, nread: Any, rlen: Any, wlen: Any, iov: Any
) -> Any:
    """Execute one well-formed request; return (status, bytes written before the status)."""
    kind = _sg_load(segs, 0, nread, 0, 4)
    sector = _sg_load(segs, 0, nread, 8, 8)
    data_in = wlen - 1
    data_out = rlen - _BLK_HEADER
    readonly = u[U_READONLY]
    if kind == _BLK_T_IN:
        pos = _blk_range(u, sector, data_in)
        if pos < 0 or not _sg_file_io(q, u, segs, nread, nseg, 0, data_in, pos, False, iov):
            return (_BLK_S_IOERR, 0)
        return (_BLK_S_OK, data_in)
    if kind == _BLK_T_OUT:
        if readonly:
            return (_BLK_S_IOERR, 0)
        pos = _blk_range(u, sector, data_out)
        if pos < 0 or not _sg_file_io(q, u, segs, 0, nread, _BLK_HEADER, data_out, pos, True, iov):
            return (_BLK_S_IOERR, 0)
        return (_BLK_S_OK, 0)
    if kind == _BLK_T_FLUSH:
        if not readonly:
            while _fdatasync(u[U_BLK_FD]) != 0:
                if _errno() != _EINTR:
                    return (_BLK_S_IOERR, 0)
        return (_BLK_S_OK, 0)
    if kind == _BLK_T_GET_ID:
        count = min(_BLK_ID_BYTES, data_in)
        _sg_write(q, segs, nread, nseg, 0, u[U_SERIAL], count)
        return (_BLK_S_OK, count)
    if kind in (_BLK_T_DISCARD, _BLK_T_WRITE_ZEROES):
        if readonly:
            return (_BLK_S_IOERR, 0)
        return (_blk_discard_or_zero(u, segs, nread, kind, data_out), 0)
    return (_BLK_S_UNSUPP, 0)


@_kernel
def _blk_requests(u: Any, segs: Any, iov: Any) -> Any:
    """Serve a burst of requests of a blk unit's queue; return how many.

    ``iov`` is the worker's ``int64[IOV_MAX, 2]`` iovec scratch.
    """
    qa = u[U_TXQ]
    if qa == 0:
        return 0
    q = _row(qa, QCOLS)
    if q[Q_ERROR]:
        return 0
    stats = _row(q[Q_STATS], NSTATS)
    limit = u[U_BURST]
    count = 0
    while count < limit:
        status, ident, nseg, nread, rlen, wlen, dc = ring_pop(q, segs, 0)
        if status == EMPTY:
            break
        if status == ERROR:
            _count_error(q)
            break
        stats[S_RECEIVED_DESC] += 1
        written = 0
        if wlen < 1 or rlen < _BLK_HEADER:
            # No room for a status, or no header to act on: returned untouched.
            stats[S_INVALID_BUFFER] += 1
        else:
            result, reply = _blk_execute(q, u, segs, nseg, nread, rlen, wlen, iov)
            if result != _BLK_S_OK:
                stats[S_COMPLETION_ERRORS] += 1
            _sg_store_u8(q, segs, nread, nseg, wlen - 1, result)
            stats[S_PACKETS] += 1
            stats[S_BYTES] += reply + rlen - _BLK_HEADER
            written = reply + 1
        push(q, ident, written, dc)
        stats[S_COMPLETED_DESC] += 1
        count += 1
    if count:
        _complete(q)
    return count


@_kernel
def _tap_receive(u: Any, segs: Any, held: Any, zeros: Any, iov: Any) -> Any:
    """Move a burst of frames from the unit's TAP into receive chains.

    Each frame is read with one ``readv``: straight into the next chain,
    past its header, and into the bounce buffer beyond the chain's end.  A
    frame that spilled over waits in the bounce buffer until the general
    delivery (section 5.1.6.3) finds chains for it.
    """
    rxa = u[U_RXQ]
    if rxa == 0:
        return 0
    rxq = _row(rxa, QCOLS)
    if rxq[Q_ERROR]:
        return 0
    stats = _row(rxq[Q_STATS], NSTATS)
    fd = u[U_FD]
    hdr = u[U_HDR]
    bounce = u[U_BOUNCE]
    bounce_len = u[U_BOUNCE_LEN]
    iov_addr = np.int64(iov.ctypes.data)
    limit = u[U_BURST]
    done = 0
    while done < limit:
        pending = u[U_PENDING]
        if pending:
            result = _rx_deliver(rxq, u, segs, held, zeros, segs, 0, 0, 0, bounce, pending)
            if result == _NO_BUFFER:
                rxq[Q_ARM] = 1
                break
            if result == _BROKEN:
                break
            u[U_PENDING] = 0
            done += 1
            continue
        status, ident, nseg, nread, _, wlen, dc = ring_pop(rxq, segs, 0)
        if status == EMPTY:
            # Frames may be waiting in the TAP: new buffers are work now.
            rxq[Q_ARM] = 1
            break
        if status == ERROR:
            _count_error(rxq)
            break
        # Straight into the chain when its first buffer holds the header and
        # one call takes its buffers; otherwise through the bounce buffer.
        room = wlen - hdr
        direct = room >= 0 and segs[nread, 2] >= hdr and nseg - nread < iov.shape[0]
        count = 0
        if direct:
            offset = hdr
            for i in range(nread, nseg):
                length = segs[i, 2]
                if length > offset:
                    iov[count, 0] = segs[i, 1] + offset
                    iov[count, 1] = length - offset
                    count += 1
                offset = max(offset - length, 0)
        else:
            room = 0
        if room < bounce_len:
            iov[count, 0] = bounce + room
            iov[count, 1] = bounce_len - room
            count += 1
        got = _readv(fd, iov_addr, count)
        if got <= 0:
            _unpop(rxq, 1, dc)
            # The TAP ran dry (or is detached): its next frame wakes the worker.
            rxq[Q_ARM] = 0
            break
        done += 1
        if got > max(room, bounce_len):
            # The kernel cut the frame to the buffers it was given.
            _unpop(rxq, 1, dc)
            stats[S_DROPPED] += 1
            continue
        if direct and got <= room:
            host = segs[nread, 1]
            _st_u64(host, 0)
            _st_u16(host + 8, 0)
            if hdr == _NET_HDR_MRG:
                _st_u16(host + 10, 1)
            _log_segments(rxq, segs, nread, nseg, hdr + got)
            push(rxq, ident, hdr + got, dc)
            stats[S_RECEIVED_DESC] += 1
            stats[S_COMPLETED_DESC] += 1
            stats[S_PACKETS] += 1
            stats[S_BYTES] += got
            continue
        if direct:
            # Join the frame's head, which the chain holds, to its tail in the bounce buffer.
            _gather(bounce, segs, nread, nseg, hdr, room)
        _unpop(rxq, 1, dc)
        u[U_PENDING] = got
    _complete(rxq)
    return done


# --------------------------------------------------------------------------- worker loop


@_kernel
def _unit_queue(units: Any, i: Any, column: Any) -> Any:
    """Host address of the queue row in ``column`` (U_RXQ, U_TXQ) of unit ``i``."""
    return _row(units[i], UCOLS)[column]


@_kernel
def _quiet(units: Any, nunits: Any, armed_only: Any) -> None:
    for i in range(nunits):
        for addr in (_unit_queue(units, i, U_RXQ), _unit_queue(units, i, U_TXQ)):
            if addr != 0:
                q = _row(addr, QCOLS)
                if q[Q_ERROR] == 0 and (q[Q_ARM] or not armed_only):
                    disable_notification(q)


@_kernel
def _is_unit_fd(units: Any, nunits: Any, fd: Any) -> Any:
    """Whether ``fd`` is a unit's own fd (watched edge-triggered, never drained)."""
    i = 0
    while i < nunits and _row(units[i], UCOLS)[U_FD] != fd:
        i += 1
    return i < nunits


@_kernel
def _arm(units: Any, nunits: Any) -> Any:
    """Re-enable notifications on every queue the worker waits for; True if work arrived."""
    pending = False
    for i in range(nunits):
        for addr in (_unit_queue(units, i, U_RXQ), _unit_queue(units, i, U_TXQ)):
            if addr != 0:
                q = _row(addr, QCOLS)
                if q[Q_ERROR] == 0 and q[Q_ARM] and enable_notification(q):
                    pending = True
    return pending


@_kernel
def run_worker(
    ctl: Any,
    units: Any,
    nunits: Any,
    segs_t: Any,
    segs_r: Any,
    held: Any,
    chains: Any,
    sink: Any,
    zeros: Any,
    iov: Any,
    epfd: Any,
    events: Any,
    mode: Any,
    spin_ns: Any,
    sleep_ms: Any,
) -> Any:
    """Serve ``units`` (host addresses of unit rows) until ``ctl[C_REQUEST]`` is set.

    ``segs_t``, ``segs_r``, ``held``, ``chains``, ``sink``, ``zeros`` and
    ``iov`` are the worker's scratch memory (segments of transmit and receive
    chains, receive chains of one frame, chains of one transmit burst, frame
    sink, a zeroed header, ``int64[IOV_MAX, 2]`` iovecs).

    ``mode`` is MODE_POLL, MODE_EVENT or MODE_ADAPTIVE; ``spin_ns`` is how
    long event and adaptive modes keep polling after the last work before
    they sleep; ``sleep_ms``
    bounds a sleep (-1: until a kick, or 1 when some queue has no kick fd).
    ``epfd`` watches the kick eventfds, the worker's wake eventfd and the
    units' own fds (``U_FD``, edge-triggered).
    Returns the number of passes made.
    """
    zero_addr = np.int64(zeros.ctypes.data)
    events_addr = np.int64(events.ctypes.data)
    # Kicks are wanted only while the worker sleeps.
    _quiet(units, nunits, False)
    passes = 0
    idle_since = 0
    while _ld_shared(ctl, C_REQUEST) == 0:
        work = 0
        for i in range(nunits):
            u = _row(units[i], UCOLS)
            program = u[U_PROGRAM]
            if program == P_BLK:
                work += _blk_requests(u, segs_t, iov)
                continue
            if program == P_GEN:
                work += _generate(u, segs_r, held, zero_addr)
            elif program == P_TAP:
                work += _tap_receive(u, segs_r, held, zero_addr, iov)
            work += _transmit(u, segs_t, segs_r, held, chains, sink, zero_addr, iov)
        passes += 1
        _st_shared(ctl, C_EPOCH, ctl[C_EPOCH] + 1)
        if work:
            idle_since = 0
            continue
        if mode == MODE_POLL:
            _cpu_relax()
            continue
        if spin_ns > 0:
            now = _monotonic_ns()
            if idle_since == 0:
                idle_since = now
            if now - idle_since < spin_ns:
                _cpu_relax()
                continue
        if _arm(units, nunits):
            _quiet(units, nunits, True)
            continue
        _st_shared(ctl, C_SLEEPING, 1)
        _fence()
        if _ld_shared(ctl, C_REQUEST) == 0:
            ready = _epoll_wait(epfd, events_addr, MAX_EVENTS, sleep_ms)
            for k in range(ready):
                # The event's data is the fd it was registered with; a unit's
                # own fd carries frames, not a counter to reset.
                fd = _ld_u32(events_addr + EPOLL_EVENT_SIZE * k + _EPOLL_DATA_OFFSET)
                if not _is_unit_fd(units, nunits, fd):
                    _eventfd_drain(fd)
        _st_shared(ctl, C_SLEEPING, 0)
        _st_shared(ctl, C_EPOCH, ctl[C_EPOCH] + 1)
        _quiet(units, nunits, True)
        idle_since = 0
    return passes
