"""The worker loop, and the programs it runs, each loaded (and compiled) when first needed.

Theory of operation
-------------------
A worker serves its units (host addresses of unit rows) until the control
plane asks it to return (``C_REQUEST``).  Each pass visits every unit once
and runs the unit's program for a bounded burst; the programs publish used
entries once per burst and signal call eventfds only when the driver's event
suppression asks for it.  After each pass the worker bumps ``C_EPOCH``.

In poll mode the worker never sleeps.  In event mode, after a pass with no
work and ``spin_ns`` more of polling (adaptive mode polls longer), it
re-enables notifications on the queues it waits for (``Q_ARM``), re-checks
them, and sleeps in ``epoll_wait`` on their kick eventfds, its own wake
eventfd and the units' own fds (their TAP queues, watched edge-triggered and
never drained); it asks for no kicks again once awake.  It returns to Python
only when asked, so that the control plane reads exact ring positions from
quiescent rows.

The loop does not call the programs by name: each unit's program is called
through a table of C entry points (``int64 program(unit, worker)``), filled
by :func:`load`.  The loop therefore compiles without any program, and a
program is compiled (or loaded from the cache) only once a unit needs it:
:func:`run_worker` loads the programs of the units it is given before it
enters the loop, and every program when given no unit (the engine's
warm-up, which makes sure that no later start waits for the compiler).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from numba import types
from numba.core.dispatcher import Dispatcher

from pyvdpa.dataplane.kernels import blk, net, tap
from pyvdpa.dataplane.kernels.cache import kernel
from pyvdpa.dataplane.kernels.intrinsics import (
    EPOLL_DATA_OFFSET,
    EPOLL_EVENT_SIZE,
    call_entry,
    cpu_relax,
    epoll_wait,
    eventfd_drain,
    fence,
    ld_u32,
    load_relaxed,
    monotonic_ns,
    store_relaxed,
)
from pyvdpa.dataplane.kernels.layout import (
    CHAIN,
    HELD,
    IOVEC,
    MAX_EVENTS,
    MODE_POLL,
    NPROGRAMS,
    P_BLK,
    P_DROP,
    P_GEN,
    P_LOOPBACK,
    P_TAP,
    PROGRAM_NAMES,
    SEGMENT,
    U_PROGRAM,
    UNIT,
    WORKER,
    Int64Row,
    Int64Table,
    Row,
    control_of,
    queue_at,
    unit_at,
    worker_at,
)
from pyvdpa.dataplane.kernels.ring import disable_notification, enable_notification

__all__ = ["PROGRAMS", "load", "loaded", "run_worker", "serve"]

ENTRY = types.int64(types.int64, types.int64)
"""The signature every program is compiled for: (unit address, worker address) -> work done."""

Program: TypeAlias = "Dispatcher[Callable[[int, int], int]]"
"""A program: one pass over a unit (its row's address), with a worker's scratch (its row's)."""

PROGRAMS: dict[int, Program] = {
    P_LOOPBACK: net.loopback_program,
    P_DROP: net.drop_program,
    P_GEN: net.gen_program,
    P_BLK: blk.blk_program,
    P_TAP: tap.tap_program,
}
"""The compiled program of each ``P_*`` code."""

_Int64Vector = types.Array(types.int64, 1, "C")
_SERVE = types.int64(_Int64Vector, _Int64Vector, types.int64, types.int64, _Int64Vector)

_entries = np.zeros(NPROGRAMS, dtype=np.int64)
"""The C entry point of each loaded program, 0 for one not loaded."""
_lock = threading.Lock()


@kernel
def _quiet(units: Int64Row, nunits: int, armed_only: bool) -> None:
    """Ask for no kicks on the units' queues (only on the armed ones with ``armed_only``)."""
    for i in range(nunits):
        u = unit_at(units[i])
        for addr in (u.rxq, u.txq):
            if addr != 0:
                q = queue_at(addr)
                if q.error == 0 and (q.arm or not armed_only):
                    disable_notification(q)


@kernel
def _arm(units: Int64Row, nunits: int) -> bool:
    """Re-enable notifications on every queue the worker waits for; True if work arrived."""
    pending = False
    for i in range(nunits):
        u = unit_at(units[i])
        for addr in (u.rxq, u.txq):
            if addr != 0:
                q = queue_at(addr)
                if q.error == 0 and q.arm and enable_notification(q):
                    pending = True
    return pending


@kernel
def _is_unit_fd(units: Int64Row, nunits: int, fd: int) -> bool:
    """Whether ``fd`` is a unit's own fd (watched edge-triggered, never drained)."""
    i = 0
    while i < nunits and unit_at(units[i]).fd != fd:
        i += 1
    return i < nunits


@kernel
def serve(ctl_row: Int64Row, units: Int64Row, nunits: int, worker: int, entries: Int64Row) -> int:
    """Serve ``units`` until ``ctl_row``'s request is set; return the number of passes made.

    ``worker`` is the host address of the worker's row (``WORKER``),
    ``entries`` the programs' C entry points by program code.
    """
    ctl = control_of(ctl_row)
    w = worker_at(worker)
    mode = w.mode
    spin_ns = w.spin_ns
    events = w.events
    # Kicks are wanted only while the worker sleeps.
    _quiet(units, nunits, False)
    passes = 0
    idle_since = 0
    while load_relaxed(ctl, "request") == 0:
        work = 0
        for i in range(nunits):
            work += call_entry(entries[unit_at(units[i]).program], units[i], worker)
        passes += 1
        store_relaxed(ctl, "epoch", ctl.epoch + 1)
        if work:
            idle_since = 0
            continue
        if mode == MODE_POLL:
            cpu_relax()
            continue
        if spin_ns > 0:
            now = monotonic_ns()
            if idle_since == 0:
                idle_since = now
            if now - idle_since < spin_ns:
                cpu_relax()
                continue
        if _arm(units, nunits):
            _quiet(units, nunits, True)
            continue
        store_relaxed(ctl, "sleeping", 1)
        fence()
        if load_relaxed(ctl, "request") == 0:
            ready = epoll_wait(w.epfd, events, w.max_events, w.sleep_ms)
            for k in range(ready):
                # The event's data is the fd it was registered with; a unit's
                # own fd carries frames, not a counter to reset.
                fd = ld_u32(events + EPOLL_EVENT_SIZE * k + EPOLL_DATA_OFFSET)
                if not _is_unit_fd(units, nunits, fd):
                    eventfd_drain(fd)
        store_relaxed(ctl, "sleeping", 0)
        store_relaxed(ctl, "epoch", ctl.epoch + 1)
        _quiet(units, nunits, True)
        idle_since = 0
    return passes


def _entry_point(program: Program) -> int:
    """Compile (or load) ``program`` for :data:`ENTRY`; the address of its C entry point."""
    program.compile(ENTRY)
    # numba gives every compiled function a C-callable wrapper (what its first-class
    # function values call); its annotations of a compile result stop at the class name.
    result: Any = program.get_compile_result(ENTRY)
    return int(result.library.get_pointer_to_function(result.fndesc.llvm_cfunc_wrapper_name))


def load(programs: Iterable[int] = tuple(PROGRAMS)) -> None:
    """Load the worker loop and ``programs`` (``P_*`` codes), compiling them the first time."""
    with _lock:
        serve.compile(_SERVE)
        for program in programs:
            if program not in PROGRAMS:
                raise ValueError(f"no program {program}")
            if _entries[program] == 0:
                _entries[program] = _entry_point(PROGRAMS[program])


def loaded() -> set[str]:
    """The names of the programs loaded in this process."""
    return {PROGRAM_NAMES[p] for p in PROGRAMS if _entries[p]}


def _program_of(unit: int) -> int:
    """The program of the unit row at host address ``unit``."""
    return int(ctypes.c_int64.from_address(unit + UNIT.offset(U_PROGRAM)).value)


def _table(array: Int64Table, row: Row, name: str) -> tuple[int, int]:
    """The address and row count of a scratch table, checked against its row kind."""
    if (
        array.dtype != np.int64
        or array.ndim != 2
        or array.shape[1] != row.width
        or not array.flags.c_contiguous
    ):
        raise ValueError(f"{name} must be a contiguous int64[n, {row.width}] array")
    return int(array.ctypes.data), int(array.shape[0])


def _bytes(array: npt.NDArray[np.uint8], name: str) -> tuple[int, int]:
    if array.dtype != np.uint8 or array.ndim != 1 or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous uint8 array")
    return int(array.ctypes.data), int(array.shape[0])


def run_worker(
    ctl: Int64Row,
    units: Int64Row,
    nunits: int,
    segs_t: Int64Table,
    segs_r: Int64Table,
    held: Int64Table,
    chains: Int64Table,
    sink: npt.NDArray[np.uint8],
    zeros: npt.NDArray[np.uint8],
    iov: Int64Table,
    epfd: int,
    events: npt.NDArray[np.uint8],
    mode: int,
    spin_ns: int,
    sleep_ms: int,
) -> int:
    """Serve ``units`` (host addresses of unit rows) until ``ctl[C_REQUEST]`` is set.

    ``segs_t``, ``segs_r``, ``held``, ``chains``, ``sink``, ``zeros`` and
    ``iov`` are the worker's scratch memory (segments of transmit and receive
    chains, receive chains of one frame, chains of one transmit burst, frame
    sink, a zeroed header, iovecs), ``events`` room for ``epoll_event``
    structures.  ``mode`` is MODE_POLL, MODE_EVENT or MODE_ADAPTIVE;
    ``spin_ns`` is how long event and adaptive modes keep polling after the
    last work before they sleep; ``sleep_ms`` bounds a sleep (-1: until a
    kick).  ``epfd`` watches the kick eventfds, the worker's wake eventfd and
    the units' own fds (``U_FD``, edge-triggered).

    The programs of the units are loaded first, every program when there is
    no unit.  Returns the number of passes made, with the GIL released
    meanwhile.
    """
    if not 0 <= nunits <= units.shape[0]:
        raise ValueError(f"{nunits} units, but {units.shape[0]} addresses")
    load({_program_of(int(unit)) for unit in units[:nunits]} if nunits else PROGRAMS)
    row = np.zeros(1, dtype=WORKER.dtype)
    row["segs_t"], row["segs_t_len"] = _table(segs_t, SEGMENT, "segs_t")
    row["segs_r"], row["segs_r_len"] = _table(segs_r, SEGMENT, "segs_r")
    row["held"], row["held_len"] = _table(held, HELD, "held")
    row["chains"], row["chains_len"] = _table(chains, CHAIN, "chains")
    row["iov"], row["iov_len"] = _table(iov, IOVEC, "iov")
    row["sink"], row["sink_len"] = _bytes(sink, "sink")
    row["zeros"] = _bytes(zeros, "zeros")[0]
    row["events"], room = _bytes(events, "events")
    row["max_events"] = min(MAX_EVENTS, room // EPOLL_EVENT_SIZE)
    row["epfd"] = epfd
    row["mode"] = mode
    row["spin_ns"] = spin_ns
    row["sleep_ms"] = sleep_ms
    return int(serve(ctl, units, nunits, row.ctypes.data, _entries))
