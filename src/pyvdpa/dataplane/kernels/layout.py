"""The state the kernels work on: one field list per kind of row, and the codes they record.

Theory of operation
-------------------
Kernels and Python share state as rows of 64-bit integers: a virtqueue's row
(its parameters and its position in the ring, sections 2.7 and 2.8 of
virtio 1.2), a unit's row (one net queue pair or blk queue and the program
that runs it), a worker's control words, a queue's counters.  Python holds
each row as an ``int64`` array and indexes it with the constants declared
here (``row[Q_LAST_AVAIL]``); the kernels see the same bytes as a numba
record and read named fields (``q.last_avail``).

Each kind of row is one :class:`Row`, declared one field per line::

    Q_LAST_AVAIL = QUEUE.field("last_avail")

The call appends the field and returns its index, so adding a field is one
line and no index is written by hand; :meth:`Row.close` ends the list, pads
the row (queue, unit and control rows to whole cache lines) and builds the
numpy structured dtype and the numba record type from it.  :func:`check`
holds every constant to its field's name.  Tables of rows the kernels keep
for themselves (a chain's segments, a burst's chains, iovecs, translations)
are rows of the same kind, declared by their field names alone.

A record is a pointer to the row: passing one to a kernel that is not
inlined costs one register, and a field is one load or store at a constant
offset, the code an indexed ``int64`` row compiles to.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import numba
import numpy as np
import numpy.typing as npt
from numba import types

from pyvdpa.dataplane.kernels.cache import kernel
from pyvdpa.dataplane.kernels.intrinsics import (
    Record,
    Table,
    record_at,
    record_of,
    records_at,
    records_of,
)

__all__ = [
    "ACCESS_ADJOINS",
    "ACCESS_CONTINUES",
    "ACCESS_PERM_SHIFT",
    "ACCESS_READ",
    "ACCESS_WRITE",
    "CCOLS",
    "CHAIN",
    "CONTROL",
    "C_EPOCH",
    "C_REQUEST",
    "C_SLEEPING",
    "DONE",
    "EMPTY",
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
    "E_ORDER",
    "E_ORDER_LINKS",
    "E_TOO_BIG",
    "E_TOO_MANY",
    "HELD",
    "HELD_CAP",
    "IOVEC",
    "IOV_MAX",
    "KERNEL_STAT_NAMES",
    "MAX_BURST",
    "MAX_EVENTS",
    "MISS",
    "MODE_ADAPTIVE",
    "MODE_EVENT",
    "MODE_POLL",
    "NPROGRAMS",
    "NSTATS",
    "POPPED",
    "PROGRAM_NAMES",
    "P_BLK",
    "P_DROP",
    "P_GEN",
    "P_LOOPBACK",
    "P_TAP",
    "QCOLS",
    "QUEUE",
    "Q_ARM",
    "Q_ATTN_FD",
    "Q_AVAIL_SEEN",
    "Q_AVAIL_WRAP",
    "Q_BATCH",
    "Q_BATCH_OPEN",
    "Q_BATCH_SLOT",
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
    "Q_IN_ORDER",
    "Q_IOTLB",
    "Q_LAST_AVAIL",
    "Q_LOG",
    "Q_LOG_MISSED",
    "Q_LOG_RING",
    "Q_LOG_SIZE",
    "Q_MISS_ACCESS",
    "Q_MISS_ADDR",
    "Q_NEXT_HEAD",
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
    "REQUEST",
    "SEGMENT",
    "SEG_CAP",
    "SHADOW",
    "SINK_SIZE",
    "STATS",
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
    "TRANSLATION",
    "UCOLS",
    "UNIT",
    "U_BLK_FD",
    "U_BOUNCE",
    "U_BOUNCE_LEN",
    "U_BURST",
    "U_CAPACITY",
    "U_DONE",
    "U_DONE_LEN",
    "U_DRAIN",
    "U_FD",
    "U_FRAME",
    "U_FRAME_LEN",
    "U_FREE",
    "U_FREE_TOP",
    "U_HDR",
    "U_INFLIGHT",
    "U_INFLIGHT_COUNTER",
    "U_IO_FD",
    "U_IO_PENDING",
    "U_IO_SEQ",
    "U_MAC",
    "U_MAX_SECTORS",
    "U_MAX_SEG",
    "U_MRG",
    "U_PENDING",
    "U_PROGRAM",
    "U_READONLY",
    "U_REAP_IOV",
    "U_REQUESTS",
    "U_RXQ",
    "U_SERIAL",
    "U_SLOT_SEGS",
    "U_TEST_DELAY_EVERY",
    "U_TEST_DELAY_MS",
    "U_TXQ",
    "U_ZEROS",
    "U_ZEROS_LEN",
    "WORKER",
    "Control",
    "Int64Row",
    "Int64Table",
    "Popped",
    "Queue",
    "Record",
    "Row",
    "Stats",
    "Table",
    "Unit",
    "Worker",
    "chains_at",
    "check",
    "control_of",
    "done_at",
    "fail",
    "held_at",
    "iovecs_at",
    "queue_at",
    "queue_of",
    "request_at",
    "requests_at",
    "segments_at",
    "segments_of",
    "shadow_at",
    "stats_at",
    "translations_at",
    "unit_at",
    "worker_at",
]

_FIELD_BYTES = 8


class Row:
    """The fields of one kind of row, in order: 8 bytes each, ``int64`` unless ``unsigned``.

    Declared one :meth:`field` at a time and ended by :meth:`close`, or
    whole from ``fields``.  ``prefix`` names the constants Python indexes
    the row with (``Q`` for ``Q_SIZE``); ``pad_to`` rounds the width up to
    a multiple of that many fields.
    """

    def __init__(
        self,
        name: str,
        prefix: str = "",
        *,
        fields: Sequence[str] = (),
        unsigned: bool = False,
        pad_to: int = 1,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self._names: list[str] = []
        self._scalar = np.dtype(np.uint64 if unsigned else np.int64)
        self._pad_to = pad_to
        self._width: int | None = None
        self._dtype: np.dtype[np.void] | None = None
        self._record: types.Record | None = None
        for field in fields:
            self.field(field)
        if fields:
            self.close()

    def field(self, name: str) -> int:
        """Append the field ``name``; return its index."""
        if self._width is not None:
            raise ValueError(f"the {self.name} row is closed; {name!r} comes too late")
        if name in self._names:
            raise ValueError(f"the {self.name} row has two fields named {name!r}")
        self._names.append(name)
        return len(self._names) - 1

    def close(self) -> int:
        """End the field list; return the row's width in fields (padding included)."""
        count = len(self._names)
        width = -(-count // self._pad_to) * self._pad_to
        self._width = width
        self._dtype = np.dtype(
            {
                "names": self._names,
                "formats": [self._scalar] * count,
                "offsets": [_FIELD_BYTES * i for i in range(count)],
                "itemsize": _FIELD_BYTES * width,
            },
            align=True,
        )
        record = numba.from_dtype(self._dtype)
        assert isinstance(record, types.Record)
        self._record = record
        return width

    @property
    def names(self) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(self._names)

    @property
    def width(self) -> int:
        """Fields in a row, padding included."""
        if self._width is None:
            raise ValueError(f"the {self.name} row is still open")
        return self._width

    @property
    def dtype(self) -> np.dtype[np.void]:
        """The row as a numpy structured dtype (the layout of one row of a table)."""
        if self._dtype is None:
            raise ValueError(f"the {self.name} row is still open")
        return self._dtype

    @property
    def record(self) -> types.Record:
        """The row as the numba record type the kernels compile."""
        if self._record is None:
            raise ValueError(f"the {self.name} row is still open")
        return self._record

    def offset(self, index: int) -> int:
        """Byte offset of field ``index`` in a row."""
        return _FIELD_BYTES * index

    def constant(self, name: str) -> str:
        """The name of the constant indexing field ``name`` (``Q_LAST_AVAIL``)."""
        return f"{self.prefix}_{name.upper()}"


# --------------------------------------------------------------------------- queue row

QUEUE = Row("queue", "Q", pad_to=8)
"""A virtqueue, split or packed: its parameters, then its state."""
# Parameters, set when the queue is built.
Q_SIZE = QUEUE.field("size")
Q_PACKED = QUEUE.field("packed")
Q_EVENT_IDX = QUEUE.field("event_idx")
Q_INDIRECT = QUEUE.field("indirect")
Q_DESC = QUEUE.field("desc")
"""Host address of the descriptor table (split) or ring (packed)."""
Q_DRIVER = QUEUE.field("driver")
"""Host address of the available ring (split) or driver event area (packed)."""
Q_DEVICE = QUEUE.field("device")
"""Host address of the used ring (split) or device event area (packed)."""
Q_REGS = QUEUE.field("regs")
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
Q_NREGS = QUEUE.field("nregs")
Q_LOG = QUEUE.field("log")
"""Host address of the dirty bitmap, 0 without logging."""
Q_LOG_SIZE = QUEUE.field("log_size")
Q_LOG_RING = QUEUE.field("log_ring")
"""Guest-physical address at which used-ring writes are logged."""
Q_STATS = QUEUE.field("stats")
"""Host address of the queue's counters (an ``int64[NSTATS]`` stats row)."""
Q_CALL_FD = QUEUE.field("call_fd")
"""Call eventfd, -1 for none; the control plane may replace it while the queue runs."""
Q_ARM = QUEUE.field("arm")
"""1 when the worker waits for this queue's kicks before sleeping.

The ``tap`` program sets it on its receive queue only while frames may wait
for buffers, and clears it when the TAP has nothing to give.
"""
# State.
Q_LAST_AVAIL = QUEUE.field("last_avail")
"""Split: next avail index (16 bits, free-running).  Packed: next slot."""
Q_AVAIL_WRAP = QUEUE.field("avail_wrap")
Q_AVAIL_SEEN = QUEUE.field("avail_seen")
"""Split: the avail index last read; chains up to it need no new acquire load."""
Q_USED_IDX = QUEUE.field("used_idx")
Q_USED_WRAP = QUEUE.field("used_wrap")
Q_INFLIGHT = QUEUE.field("inflight")
Q_INFLIGHT_SLOTS = QUEUE.field("inflight_slots")
Q_UNSIGNALLED = QUEUE.field("unsignalled")
Q_UNPUBLISHED = QUEUE.field("unpublished")
"""Used entries written (split) or recorded in the shadow (packed), not yet published."""
Q_NOTIFY = QUEUE.field("notify")
"""1 while the device asks for available-buffer notifications."""
Q_ERROR = QUEUE.field("error")
"""The first ``E_*`` code met; non-zero means the queue is broken."""
Q_ERROR_A = QUEUE.field("error_a")
Q_ERROR_B = QUEUE.field("error_b")
Q_LOG_MISSED = QUEUE.field("log_missed")
"""Dirty pages beyond the end of the bitmap, not logged."""
Q_SHADOW = QUEUE.field("shadow")
"""Packed: host address of the shadow table (``SHADOW`` rows) of used descriptors not yet
published."""
Q_IOTLB = QUEUE.field("iotlb")
"""1 when device addresses are IOVAs: a range the table lacks is a miss, not an error."""
Q_STALLED = QUEUE.field("stalled")
"""1 from a miss until the control plane has new translations (the ring is not popped)."""
Q_MISS_ADDR = QUEUE.field("miss_addr")
"""The first IOVA a stalled queue could not translate."""
Q_MISS_ACCESS = QUEUE.field("miss_access")
"""The access (``ACCESS_READ`` or ``ACCESS_WRITE``) the missing translation must allow."""
Q_ATTN_FD = QUEUE.field("attn_fd")
"""Eventfd signalled when the queue stalls on a miss, -1 for none."""
Q_IN_ORDER = QUEUE.field("in_order")
"""1 with VIRTIO_F_IN_ORDER: a chain out of ring order breaks the ring."""
Q_BATCH = QUEUE.field("batch")
"""1 when, in order, a chain used completely leaves its used entry to the next one pushed."""
Q_NEXT_HEAD = QUEUE.field("next_head")
"""Split, in order: the descriptor the next chain must start at, -1 until the first chain."""
Q_BATCH_OPEN = QUEUE.field("batch_open")
"""1 while the last chain pushed, used completely, waits for the next one's used entry."""
Q_BATCH_SLOT = QUEUE.field("batch_slot")
"""Split: the used index whose element the open batch writes."""
QCOLS = QUEUE.close()

# --------------------------------------------------------------------------- counters

STATS = Row("stats", "S")
"""A queue's counters: those of pyvdpa.devices.stats.STAT_NAMES, in order, then extras."""
S_RECEIVED_DESC = STATS.field("received_desc")
S_COMPLETED_DESC = STATS.field("completed_desc")
S_BAD_DESC_ERRORS = STATS.field("bad_desc_errors")
S_EXCEED_MAX_CHAIN = STATS.field("exceed_max_chain")
S_INVALID_BUFFER = STATS.field("invalid_buffer")
S_COMPLETION_ERRORS = STATS.field("completion_errors")
S_PACKETS = STATS.field("packets")
S_BYTES = STATS.field("bytes")
S_DROPPED = STATS.field("dropped")
S_CALLS = STATS.field("calls")
NSTATS = STATS.close()
KERNEL_STAT_NAMES = STATS.names
"""The counters' names, in column order."""

# --------------------------------------------------------------------------- unit row

UNIT = Row("unit", "U", pad_to=8)
"""One net queue pair (or one blk queue) and the program that runs it."""
U_PROGRAM = UNIT.field("program")
U_RXQ = UNIT.field("rxq")
"""Host address of the receive queue's row, 0 while it is not running."""
U_TXQ = UNIT.field("txq")
U_HDR = UNIT.field("hdr")
U_MRG = UNIT.field("mrg")
U_MAC = UNIT.field("mac")
"""The device's MAC, its first byte in the low bits."""
U_FRAME = UNIT.field("frame")
"""Host address of the generated frame (``gen``)."""
U_FRAME_LEN = UNIT.field("frame_len")
U_BURST = UNIT.field("burst")
U_FD = UNIT.field("fd")
"""The unit's own fd (``tap``: its TAP queue), -1 for none.

The worker sleeps on it edge-triggered and never reads it as an eventfd.
"""
# A blk unit.
U_CAPACITY = UNIT.field("capacity")
"""Capacity in 512-byte sectors."""
U_READONLY = UNIT.field("readonly")
U_SERIAL = UNIT.field("serial")
"""Host address of the 20-byte serial, zero padded."""
U_ZEROS = UNIT.field("zeros")
"""Host address of a zero-filled buffer (reads past the end of the file, zeroing fallback)."""
U_ZEROS_LEN = UNIT.field("zeros_len")
U_MAX_SEG = UNIT.field("max_seg")
"""Segments a DISCARD or WRITE_ZEROES request may carry."""
U_MAX_SECTORS = UNIT.field("max_sectors")
"""Sectors one DISCARD or WRITE_ZEROES segment may cover."""
U_BLK_FD = UNIT.field("blk_fd")
"""The backing file's descriptor (never watched: files are always ready)."""
U_INFLIGHT = UNIT.field("inflight")
"""Host address of the queue's part of the inflight region, 0 when nothing is recorded."""
U_INFLIGHT_COUNTER = UNIT.field("inflight_counter")
"""The fetch counter the next chain taken is recorded with."""
U_DONE = UNIT.field("done")
"""Host address of the table of requests completed and not yet returned (``DONE`` rows)."""
U_DONE_LEN = UNIT.field("done_len")
U_IO_FD = UNIT.field("io_fd")
"""Write end of the I/O pool's request pipe, -1 when the unit does its I/O itself."""
U_REQUESTS = UNIT.field("requests")
"""Host address of the unit's request slots (``REQUEST`` rows) for the I/O pool."""
U_FREE = UNIT.field("free")
"""Host address of the stack of free request slot indices (``int64``)."""
U_FREE_TOP = UNIT.field("free_top")
"""Free request slots: the stack's height."""
U_SLOT_SEGS = UNIT.field("slot_segs")
"""Segments a request slot holds (a longer chain is served by the worker itself)."""
U_IO_PENDING = UNIT.field("io_pending")
"""Requests handed to the I/O pool and not yet collected (the control plane waits for 0)."""
U_IO_SEQ = UNIT.field("io_seq")
"""Requests handed to the I/O pool so far."""
U_REAP_IOV = UNIT.field("reap_iov")
"""Host address of an iovec over the buffer the unit's completion pipe (``U_FD``) is read into."""
U_DRAIN = UNIT.field("drain")
"""1: take no new chains (the control plane is stopping the queue)."""
U_TEST_DELAY_MS = UNIT.field("test_delay_ms")
"""Test only: the I/O pool sleeps this long before every ``U_TEST_DELAY_EVERY``-th request."""
U_TEST_DELAY_EVERY = UNIT.field("test_delay_every")
# A tap unit.
U_BOUNCE = UNIT.field("bounce")
"""Host address of the unit's bounce buffer (``tap``: received frames longer than a chain)."""
U_BOUNCE_LEN = UNIT.field("bounce_len")
U_PENDING = UNIT.field("pending")
"""Length of the frame waiting in the bounce buffer for receive chains, 0 for none."""
UCOLS = UNIT.close()

# --------------------------------------------------------------------------- worker

CONTROL = Row("control", "C", pad_to=8)
"""A worker's control words, shared with the control plane while the worker runs."""
C_REQUEST = CONTROL.field("request")
"""Set by the control plane: return to Python at the next pass."""
C_EPOCH = CONTROL.field("epoch")
"""Bumped by the worker after every pass and every wake-up."""
C_SLEEPING = CONTROL.field("sleeping")
"""1 while the worker waits in epoll_wait."""
CCOLS = CONTROL.close()

WORKER = Row(
    "worker",
    fields=(
        # Host addresses of the scratch tables and buffers, and their lengths in rows or bytes.
        "segs_t",
        "segs_t_len",
        "segs_r",
        "segs_r_len",
        "held",
        "held_len",
        "chains",
        "chains_len",
        "sink",
        "sink_len",
        "zeros",
        "iov",
        "iov_len",
        # How the worker waits.
        "epfd",
        "events",
        "max_events",
        "mode",
        "spin_ns",
        "sleep_ms",
    ),
)
"""A worker's scratch memory and how it waits, built for each run of the worker loop.

``segs_t``/``segs_r``: segments of transmitted and received chains
(``SEGMENT`` rows); ``held``: the receive chains of one frame; ``chains``: a
transmit burst; ``sink``: where ``drop`` reads frames to; ``zeros``: a
zeroed header; ``iov``: iovecs for one system call; ``events``: room for
``max_events`` ``epoll_event`` structures.  ``mode`` is one of ``MODE_*``,
``spin_ns`` how long the worker keeps polling after its last work,
``sleep_ms`` the longest sleep (-1: until woken).
"""

# --------------------------------------------------------------------------- tables

SEGMENT = Row("segment", fields=("gpa", "host", "length", "writable"))
"""One buffer of a chain: its device address, host address, length, and 1 if writable."""
HELD = Row("held", fields=("id", "desc_count", "length", "wlen"))
"""A receive chain holding part of a frame, the bytes it got and the bytes it had room for."""
CHAIN = Row("chain", fields=("id", "desc_count", "first", "nread", "rlen", "wlen"))
"""A chain of a transmit burst: its first segment, readable segments and bytes, writable
bytes."""
IOVEC = Row("iovec", fields=("base", "length"))
"""``struct iovec`` on 64-bit Linux."""
TRANSLATION = Row("translation", fields=("start", "size", "host", "access", "gpa"), unsigned=True)
"""A row of a translation table (see ``Q_REGS``)."""
DONE = Row("done", fields=("id", "desc_count", "written", "wlen", "entry"))
"""A blk request finished and waiting to be returned: its buffer id, ring slots, bytes
written, writable bytes, and its inflight entry (split: the head; packed: the region's
entry)."""
REQUEST = Row(
    "request",
    fields=(
        "addr",
        "iov_base",
        "iov_len",
        "unit",
        "queue",
        "done_fd",
        "id",
        "desc_count",
        "entry",
        "nseg",
        "nread",
        "rlen",
        "wlen",
        "segs",
        "seq",
        "status",
        "reply",
    ),
)
"""A blk request slot handed to the I/O pool: its own address, and an iovec over it (the
message the pipes carry); the unit, queue and completion pipe; the chain (buffer id, ring
slots, inflight entry, segments copied to ``segs``); then the status and the bytes replied."""
SHADOW = Row("shadow", fields=("slot", "entry"))
"""A packed used descriptor waiting to be published: its slot, and id | flags << 16 | len << 32."""

# --------------------------------------------------------------------------- codes

# Programs (U_PROGRAM).
_program = itertools.count()
P_LOOPBACK = next(_program)
P_DROP = next(_program)
P_GEN = next(_program)
P_BLK = next(_program)
P_TAP = next(_program)
NPROGRAMS = next(_program)
PROGRAM_NAMES = {
    P_LOOPBACK: "loopback",
    P_DROP: "drop",
    P_GEN: "gen",
    P_BLK: "blk",
    P_TAP: "tap",
}

# How an idle worker waits (the worker's ``mode``).
_mode = itertools.count()
MODE_POLL = next(_mode)
MODE_EVENT = next(_mode)
MODE_ADAPTIVE = next(_mode)

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
MISS = 2
"""walk only: a translation is missing; ring_pop reports EMPTY and the queue stalls."""

# The rule a broken ring broke (Q_ERROR); pyvdpa.dataplane.queues maps them onto RingError
# classes.  0 is none.
_rule = itertools.count(1)
E_AVAIL_JUMP = next(_rule)
E_AVAIL_SLOTS = next(_rule)
E_HEAD_INDEX = next(_rule)
E_NEXT_INDEX = next(_rule)
E_ID_INDEX = next(_rule)
E_LOOP = next(_rule)
E_INDIRECT_FEATURE = next(_rule)
E_INDIRECT_NESTED = next(_rule)
E_INDIRECT_CHAINED = next(_rule)
E_INDIRECT_NEXT = next(_rule)
E_INDIRECT_LENGTH = next(_rule)
E_TOO_MANY = next(_rule)
E_TOO_BIG = next(_rule)
E_LAYOUT = next(_rule)
E_BUFFER = next(_rule)
E_ORDER = next(_rule)
E_ORDER_LINKS = next(_rule)

# Capacities.
SEG_CAP = 32768
"""Segments a chain can have: at most the largest queue size."""
HELD_CAP = 32768
"""Receive chains one frame can hold: at most the largest queue size."""
MAX_BURST = 1024
"""Chains a queue hands the worker in one burst, at most."""
SINK_SIZE = 131072
"""Bytes of the worker's sink: 64 slots of 2 KiB, which ``drop`` reads frames into in turn."""
MAX_EVENTS = 64
IOV_MAX = 1024
"""Buffers one ``readv``, ``writev``, ``preadv`` or ``pwritev`` takes, at most (``UIO_MAXIOV``)."""


def check(namespace: Mapping[str, object], rows: Sequence[Row]) -> None:
    """Raise unless each field of ``rows`` has its constant in ``namespace``, equal to its index."""
    for row in rows:
        for index, name in enumerate(row.names):
            constant = row.constant(name)
            if namespace.get(constant) != index:
                raise AssertionError(f"{constant} is not field {index} ({name!r}) of {row.name}")


check(globals(), (QUEUE, STATS, UNIT, CONTROL))

# --------------------------------------------------------------------------- views

Queue: TypeAlias = Record
"""A queue row as the kernels see it (``QUEUE``)."""
Unit: TypeAlias = Record
Stats: TypeAlias = Record
Control: TypeAlias = Record
Worker: TypeAlias = Record
Int64Row: TypeAlias = npt.NDArray[np.int64]
"""A row as Python holds it."""
Int64Table: TypeAlias = npt.NDArray[np.int64]
"""A table as Python holds it: ``int64[rows, fields]``."""
Popped: TypeAlias = tuple[int, int, int, int, int, int, int]
"""What popping a chain tells: status, then six numbers (see :func:`ring_pop`)."""

queue_at = record_at(QUEUE.record)
"""The queue row at a host address."""
queue_of = record_of(QUEUE.record)
"""A queue row, given as a record or as the int64 array Python holds."""
unit_at = record_at(UNIT.record)
stats_at = record_at(STATS.record)
control_of = record_of(CONTROL.record)
worker_at = record_at(WORKER.record)
segments_at = records_at(SEGMENT.record)
segments_of = records_of(SEGMENT.record)
"""A segment table, given as a record table or as the ``int64[n, 4]`` array Python holds."""
held_at = records_at(HELD.record)
chains_at = records_at(CHAIN.record)
iovecs_at = records_at(IOVEC.record)
translations_at = records_at(TRANSLATION.record)
shadow_at = records_at(SHADOW.record)
done_at = records_at(DONE.record)
requests_at = records_at(REQUEST.record)
request_at = record_at(REQUEST.record)


@kernel
def fail(q: Queue, code: int, a: int, b: int) -> Popped:
    """Record that the queue broke rule ``code`` (with two numbers for the message)."""
    q.error = code
    q.error_a = a
    q.error_b = b
    return (ERROR, 0, 0, 0, 0, 0, 0)
