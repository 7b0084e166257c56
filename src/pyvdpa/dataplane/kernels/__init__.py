"""The compiled data path: ring kernels, device programs and the worker loop.

Theory of operation
-------------------
Everything here is compiled by numba, runs without the GIL and never sees a
Python object.  A virtqueue is a row of 64-bit integers holding its
parameters (size, layout, host addresses of its three ring areas and of its
translation table, dirty bitmap and counters) and its state (the positions
and wrap counters of virtio 1.2 sections 2.7 and 2.8, notification state,
the first error met).  Python holds the row as an ``int64`` array indexed by
the ``Q_*`` constants; the kernels see it as a record with named fields.
Guest memory is reached through host addresses, each buffer translated and
bounds-checked first.  The modules, from the bottom up:

* :mod:`~.cache` — how kernels are compiled, and the on-disk cache keyed on
  every source file of this package (a helper's change recompiles its
  callers);
* :mod:`~.intrinsics` — loads and stores with the ordering of section
  2.7.13, fences, views of rows as records, copies, system calls;
* :mod:`~.layout` — one field list per kind of row (queue, unit, control,
  counters, and the kernels' own tables), which generates the constants
  Python indexes with and the records the kernels read; result and error
  codes;
* :mod:`~.spec` — the specification values compiled in;
* :mod:`~.translate` — device addresses (guest-physical, or IOVAs through a
  table of the IOTLB) to host addresses, IOTLB misses, the dirty log;
* :mod:`~.chain` — the descriptor walk and its validation, the rules of
  :func:`pyvdpa.virtio.ring.walk_chain`;
* :mod:`~.split`, :mod:`~.packed` — the device side of each ring layout;
* :mod:`~.ring` — the steps whatever the layout (pop, push, publish,
  notifications), which Python also drives one by one;
* :mod:`~.segments` — scatter-gather over a chain's buffers;
* :mod:`~.net`, :mod:`~.tap`, :mod:`~.blk` — the programs: ``loopback``,
  ``drop``, ``gen``, ``tap`` (virtio-net, section 5.1) and ``blk``
  (virtio-blk, section 5.2);
* :mod:`~.worker` — the worker loop, which runs each unit's program through
  a table of entry points, so that a program is compiled only once a unit
  needs it (:func:`load`).
"""

from pyvdpa.dataplane.kernels import spec
from pyvdpa.dataplane.kernels.intrinsics import EPOLL_EVENT_SIZE
from pyvdpa.dataplane.kernels.layout import (
    ACCESS_ADJOINS,
    ACCESS_CONTINUES,
    ACCESS_PERM_SHIFT,
    ACCESS_READ,
    ACCESS_WRITE,
    C_EPOCH,
    C_REQUEST,
    C_SLEEPING,
    CCOLS,
    DONE,
    E_AVAIL_JUMP,
    E_AVAIL_SLOTS,
    E_BUFFER,
    E_HEAD_INDEX,
    E_ID_INDEX,
    E_INDIRECT_CHAINED,
    E_INDIRECT_FEATURE,
    E_INDIRECT_LENGTH,
    E_INDIRECT_NESTED,
    E_INDIRECT_NEXT,
    E_LAYOUT,
    E_LOOP,
    E_NEXT_INDEX,
    E_ORDER,
    E_ORDER_LINKS,
    E_TOO_BIG,
    E_TOO_MANY,
    EMPTY,
    ERROR,
    HELD_CAP,
    IOV_MAX,
    KERNEL_STAT_NAMES,
    MAX_BURST,
    MAX_EVENTS,
    MODE_ADAPTIVE,
    MODE_EVENT,
    MODE_POLL,
    NSTATS,
    P_BLK,
    P_DROP,
    P_GEN,
    P_LOOPBACK,
    P_TAP,
    POPPED,
    Q_ARM,
    Q_ATTN_FD,
    Q_AVAIL_SEEN,
    Q_AVAIL_WRAP,
    Q_BATCH,
    Q_BATCH_OPEN,
    Q_BATCH_SLOT,
    Q_CALL_FD,
    Q_DESC,
    Q_DEVICE,
    Q_DRIVER,
    Q_ERROR,
    Q_ERROR_A,
    Q_ERROR_B,
    Q_EVENT_IDX,
    Q_IN_ORDER,
    Q_INDIRECT,
    Q_INFLIGHT,
    Q_INFLIGHT_SLOTS,
    Q_IOTLB,
    Q_LAST_AVAIL,
    Q_LOG,
    Q_LOG_MISSED,
    Q_LOG_RING,
    Q_LOG_SIZE,
    Q_MISS_ACCESS,
    Q_MISS_ADDR,
    Q_NEXT_HEAD,
    Q_NOTIFY,
    Q_NREGS,
    Q_PACKED,
    Q_REGS,
    Q_SHADOW,
    Q_SIZE,
    Q_STALLED,
    Q_STATS,
    Q_UNPUBLISHED,
    Q_UNSIGNALLED,
    Q_USED_IDX,
    Q_USED_WRAP,
    QCOLS,
    S_BAD_DESC_ERRORS,
    S_BYTES,
    S_CALLS,
    S_COMPLETED_DESC,
    S_COMPLETION_ERRORS,
    S_DROPPED,
    S_EXCEED_MAX_CHAIN,
    S_INVALID_BUFFER,
    S_PACKETS,
    S_RECEIVED_DESC,
    SEG_CAP,
    SINK_SIZE,
    U_BLK_FD,
    U_BOUNCE,
    U_BOUNCE_LEN,
    U_BURST,
    U_CAPACITY,
    U_DONE,
    U_DONE_LEN,
    U_FD,
    U_FRAME,
    U_FRAME_LEN,
    U_HDR,
    U_INFLIGHT,
    U_INFLIGHT_COUNTER,
    U_MAC,
    U_MAX_SECTORS,
    U_MAX_SEG,
    U_MRG,
    U_PENDING,
    U_PROGRAM,
    U_READONLY,
    U_RXQ,
    U_SERIAL,
    U_TXQ,
    U_ZEROS,
    U_ZEROS_LEN,
    UCOLS,
)
from pyvdpa.dataplane.kernels.ring import (
    disable_notification,
    enable_notification,
    publish,
    push,
    ring_pop,
    should_notify,
)
from pyvdpa.dataplane.kernels.translate import log_write
from pyvdpa.dataplane.kernels.worker import load, loaded, run_worker

# The blk spec values under the names the blk tests hold to the reference device's.
_BLK_HEADER = spec.BLK_HEADER
_BLK_ID_BYTES = spec.BLK_ID_BYTES
_BLK_S_IOERR = spec.BLK_S_IOERR
_BLK_S_OK = spec.BLK_S_OK
_BLK_S_UNSUPP = spec.BLK_S_UNSUPP
_BLK_SEGMENT = spec.BLK_SEGMENT
_BLK_T_DISCARD = spec.BLK_T_DISCARD
_BLK_T_FLUSH = spec.BLK_T_FLUSH
_BLK_T_GET_ID = spec.BLK_T_GET_ID
_BLK_T_IN = spec.BLK_T_IN
_BLK_T_OUT = spec.BLK_T_OUT
_BLK_T_WRITE_ZEROES = spec.BLK_T_WRITE_ZEROES
_BLK_UNMAP = spec.BLK_UNMAP
_FALLOC_KEEP_SIZE = spec.FALLOC_KEEP_SIZE
_FALLOC_PUNCH_HOLE = spec.FALLOC_PUNCH_HOLE
_FALLOC_ZERO_RANGE = spec.FALLOC_ZERO_RANGE
_SECTOR_MASK = spec.SECTOR_MASK
_SECTOR_SHIFT = spec.SECTOR_SHIFT

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
    "DONE",
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
    "E_ORDER",
    "E_ORDER_LINKS",
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
    "U_DONE",
    "U_DONE_LEN",
    "U_FD",
    "U_FRAME",
    "U_FRAME_LEN",
    "U_HDR",
    "U_INFLIGHT",
    "U_INFLIGHT_COUNTER",
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
    "load",
    "loaded",
    "log_write",
    "publish",
    "push",
    "ring_pop",
    "run_worker",
    "should_notify",
]
