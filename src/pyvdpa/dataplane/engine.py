"""The data-plane engine: worker threads running the compiled kernels without the GIL.

Theory of operation
-------------------
An :class:`Engine` owns worker threads.  Each worker runs
:func:`pyvdpa.dataplane.kernels.run_worker`, which releases the GIL and
serves the worker's *ports* until asked to return; a port is one unit of
work (a virtio-net queue pair or a virtio-blk queue, and the program that
runs it, a row of integers) and is served by exactly one worker, so no two threads ever touch
a ring.  New ports go to the worker with the fewest.

Modes (:class:`EngineMode`):

* ``poll`` — the worker never sleeps and asks drivers not to kick: lowest
  latency, one busy core, like a DPDK polling core.  A poll-mode worker is
  always pinned: to the CPU it is given, or else to the one
  :func:`pick_poll_cpu` picks (the highest-numbered CPU the process may run
  on that no other poll-mode worker of the process holds), and it logs a
  warning when it shares its CPU with another poll-mode worker;
* ``event`` — when no work has come for :data:`EVENT_SPIN_US` (about what
  one sleep and wake-up costs, so that a busy device is not put to sleep
  between two bursts) the worker re-enables notifications
  on the queues it consumes, checks them once more, and sleeps in
  ``epoll_wait`` on their kick eventfds, its own wake eventfd and the fds
  its ports bring (a TAP queue, watched edge-triggered so that frames left
  waiting for receive buffers do not keep waking it); an idle device costs
  nothing;
* ``adaptive`` — polls while work keeps arriving and for ``spin_us`` after
  the last of it, then sleeps as in event mode.

Control (vhost-user's ring start and stop) goes through :meth:`Port.attach`
and :meth:`Port.detach`: the worker is asked to return to Python (a control
word, then its wake eventfd), the port table is changed while it is out of
the kernel, and it goes back in.  The kernels finish every chain within a
burst, so once a queue is detached its row holds the exact ring position,
which is what GET_VRING_BASE reports.

Kick and call eventfds are duplicated when a queue is attached, so the
front-end replacing them never leaves the worker with a recycled number.
The front-end may replace a call eventfd while the ring runs
(SET_VRING_CALL); a monitor thread notices, installs a duplicate of the new
one in the queue row, and closes the old duplicate once the worker has made
two passes since (or is out of the kernel).  The monitor also reports a
ring the kernels broke: it logs the error and signals the ring's error
eventfd through :meth:`~pyvdpa.device.RingNotifiers.fail`.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import numpy as np

from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.kernels.layout import CHAIN, HELD
from pyvdpa.dataplane.queues import CompiledQueue, Int64Array
from pyvdpa.device import RingNotifiers
from pyvdpa.errors import ConfigError

__all__ = [
    "EVENT_SPIN_US",
    "RX",
    "TX",
    "WORKER_THREAD_PREFIX",
    "Engine",
    "EngineIommu",
    "EngineMode",
    "Port",
    "pick_poll_cpu",
    "polling_cpus",
]

log = logging.getLogger(__name__)

RX = 0
"""Port role of the receive queue."""
TX = 1
"""Port role of the transmit queue."""

EVENT_SPIN_US = 20.0
"""How long an event-mode worker keeps polling after its last work before it sleeps.

About the cost of one sleep and wake-up (``epoll_wait``, the driver's kick
system call): sleeping sooner costs a busy device more than it saves.
"""

WORKER_THREAD_PREFIX = "pyvdpa-dp"
"""Workers' thread names as the system shows them (``top -H``, ``/proc/PID/task/*/comm``)."""

_PR_SET_NAME = 15
_ROLE_COLUMNS = {RX: k.U_RXQ, TX: k.U_TXQ}
_EPOCHS_BEFORE_CLOSE = 2


class EngineMode(enum.Enum):
    """How an idle worker waits for work."""

    POLL = "poll"
    EVENT = "event"
    ADAPTIVE = "adaptive"


_MODE_CODES = {
    EngineMode.POLL: k.MODE_POLL,
    EngineMode.EVENT: k.MODE_EVENT,
    EngineMode.ADAPTIVE: k.MODE_ADAPTIVE,
}


def pick_poll_cpu(allowed: Collection[int], held: Mapping[int, int]) -> int:
    """The CPU a poll-mode worker given none is pinned to.

    ``allowed`` are the CPUs the process may run on, ``held`` how many
    poll-mode workers of the process each CPU already has.  The pick is the
    highest-numbered allowed CPU that none holds (the system and other
    programs tend to start from CPU 0); when every one is held, the one held
    by the fewest, the highest of those.
    """
    if not allowed:
        raise ConfigError("the process may run on no CPU")
    return max(allowed, key=lambda cpu: (-held.get(cpu, 0), cpu))


class _PollCpus:
    """The CPUs the process's poll-mode workers are pinned to, and how many on each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}

    def claim(self, cpu: int | None) -> tuple[int, int]:
        """Hold ``cpu``, or the CPU :func:`pick_poll_cpu` picks; return it and its other holders."""
        with self._lock:
            if cpu is None:
                cpu = pick_poll_cpu(os.sched_getaffinity(0), self._held)
            others = self._held.get(cpu, 0)
            self._held[cpu] = others + 1
            return cpu, others

    def held(self) -> dict[int, int]:
        """How many poll-mode workers each CPU has."""
        with self._lock:
            return dict(self._held)

    def release(self, cpu: int) -> None:
        """Let go of ``cpu``."""
        with self._lock:
            left = self._held.pop(cpu, 1) - 1
            if left:
                self._held[cpu] = left


_POLL_CPUS = _PollCpus()


def polling_cpus() -> dict[int, int]:
    """The CPUs the process's running poll-mode workers are pinned to, and how many on each."""
    return _POLL_CPUS.held()


@dataclass(eq=False)
class _Attached:
    """A queue attached to a port, with the eventfd duplicates the worker uses."""

    notifiers: RingNotifiers
    queue: CompiledQueue
    armed: bool
    kick: int | None
    call_generation: int
    reported: bool = False


@dataclass(eq=False)
class _Retired:
    """A call eventfd duplicate the worker may still be using."""

    fd: int
    worker: _Worker
    epoch: int


class Port:
    """One unit of work (a net queue pair or a blk queue, and its program), served by one worker.

    Built by :meth:`Engine.add_port`; ``unit`` is the row the kernels read.
    The port keeps alive every buffer the row points at.
    """

    def __init__(self, engine: Engine, worker: _Worker, unit: Int64Array, keep: object) -> None:
        self.engine = engine
        self.unit = unit
        self._worker = worker
        self._keep = keep
        self._queues: dict[int, _Attached] = {}

    @property
    def queues(self) -> dict[int, CompiledQueue]:
        """The attached queues by role (RX, TX)."""
        return {role: entry.queue for role, entry in self._queues.items()}

    def attach(
        self, role: int, queue: CompiledQueue, notifiers: RingNotifiers, *, armed: bool
    ) -> None:
        """Start serving ``queue`` (the ring ``notifiers`` belong to) in ``role``.

        ``armed`` queues are the ones whose new buffers are work: the worker
        waits for their kicks before it sleeps.  Replaces any queue already
        in that role.
        """
        if role not in _ROLE_COLUMNS:
            raise ValueError(f"unknown port role {role}")
        if queue.size > k.SEG_CAP:
            raise ValueError(f"queue of {queue.size} descriptors exceeds {k.SEG_CAP}")
        with self.engine._lock, self._worker.paused():
            self._remove(role)
            kick = None if notifiers.kick_fd is None else os.dup(notifiers.kick_fd)
            generation, call = notifiers.dup_call_fd()
            queue.row[k.Q_CALL_FD] = -1 if call is None else call
            queue.row[k.Q_ARM] = armed
            queue.row[k.Q_ATTN_FD] = self.engine._attention
            entry = _Attached(notifiers, queue, armed, kick, generation)
            self._queues[role] = entry
            self.unit[_ROLE_COLUMNS[role]] = queue.row.ctypes.data
            self._worker.watch(entry)

    def detach(self, role: int) -> CompiledQueue | None:
        """Stop serving the queue in ``role``; return it, its row quiescent and exact."""
        with self.engine._lock, self._worker.paused():
            entry = self._queues.get(role)
            self._remove(role)
        return None if entry is None else entry.queue

    def set(self, column: int, value: int) -> None:
        """Change one parameter of the unit row while the worker is out of the kernel."""
        with self.engine._lock, self._worker.paused():
            self.unit[column] = value

    def _remove(self, role: int) -> None:
        """Drop the queue in ``role``; the worker must be paused."""
        entry = self._queues.pop(role, None)
        self.unit[_ROLE_COLUMNS[role]] = 0
        if entry is None:
            return
        self._worker.unwatch(entry)
        call = int(entry.queue.row[k.Q_CALL_FD])
        entry.queue.row[k.Q_CALL_FD] = -1
        if call >= 0:
            os.close(call)
        self.engine._close_retired(entry.queue)

    def _check(self, retired: list[tuple[CompiledQueue, _Retired]]) -> None:
        """The monitor's pass: report broken rings, serve IOTLB misses, follow call eventfds."""
        for entry in self._queues.values():
            error = entry.queue.error
            if error is not None and not entry.reported:
                entry.reported = True
                entry.notifiers.fail(error)
            if entry.queue.stalled is not None:
                self._translate(entry)
            if entry.notifiers.call_generation == entry.call_generation:
                continue
            entry.call_generation, new = entry.notifiers.dup_call_fd()
            row = entry.queue.row
            old = int(row[k.Q_CALL_FD])
            row[k.Q_CALL_FD] = -1 if new is None else new
            if old >= 0:
                retired.append((entry.queue, _Retired(old, self._worker, self._worker.epoch)))

    def _translate(self, entry: _Attached) -> None:
        """Unstall a queue that missed a translation, or ask the front-end for it.

        When the IOTLB has changed since the queue's table was built, the
        table is rebuilt and the queue retries the chain; otherwise the
        front-end is asked (once per address) and the next IOTLB update
        brings the monitor back here.
        """
        queue = entry.queue
        miss = queue.stalled
        if not queue.translates or miss is None:
            return
        if not queue.translation_current:
            with self._worker.paused():
                queue.retranslate()
            return
        entry.notifiers.request_translation(*miss)


class _Worker:
    """One worker thread, its control words, scratch memory and epoll set."""

    def __init__(self, engine: Engine, index: int, cpu: int | None) -> None:
        self.engine = engine
        self.index = index
        self.cpu = cpu
        # The CPU held in the process's table of polling workers, while held.
        self._claimed: int | None = None
        self.ports: list[Port] = []
        self.ctl = np.zeros(k.CCOLS, dtype=np.int64)
        self._units: Int64Array = np.zeros(1, dtype=np.int64)
        self._nunits = 0
        self._segs_t = np.zeros((k.SEG_CAP, 4), dtype=np.int64)
        self._segs_r = np.zeros((k.SEG_CAP, 4), dtype=np.int64)
        self._held = np.zeros((k.HELD_CAP, HELD.width), dtype=np.int64)
        self._chains = np.zeros((k.MAX_BURST, CHAIN.width), dtype=np.int64)
        self._sink = np.zeros(k.SINK_SIZE, dtype=np.uint8)
        self._zeros = np.zeros(16, dtype=np.uint8)
        self._iov = np.zeros((k.IOV_MAX, 2), dtype=np.int64)
        self._events = np.zeros(k.MAX_EVENTS * k.EPOLL_EVENT_SIZE, dtype=np.uint8)
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._polled = 0
        self._cond = threading.Condition()
        self._pausers = 0
        self._in_kernel = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"dataplane-{index}", daemon=True)

    @property
    def epoch(self) -> int:
        """The worker's pass counter (it moves only while the worker is in the kernel)."""
        return int(self.ctl[k.C_EPOCH])

    @property
    def in_kernel(self) -> bool:
        """Whether the worker is serving its ports right now."""
        with self._cond:
            return self._in_kernel

    def start(self) -> None:
        """Start the thread, pinned to the worker's CPU (if any) before it serves a queue.

        A poll-mode worker given no CPU takes the one :func:`pick_poll_cpu` picks.
        """
        if self.engine.mode is EngineMode.POLL:
            picked = self.cpu is None
            self.cpu, others = _POLL_CPUS.claim(self.cpu)
            self._claimed = self.cpu
            if picked:
                log.info("data-path worker %d polls on CPU %d (picked)", self.index, self.cpu)
            if others:
                log.warning(
                    "data-path worker %d polls on CPU %d, which %d other polling worker(s) "
                    "of this process poll on too: they share one core",
                    self.index, self.cpu, others,
                )  # fmt: skip
        self._thread.start()
        if self.cpu is None:
            return
        tid = self._thread.native_id
        assert tid is not None
        try:
            os.sched_setaffinity(tid, {self.cpu})
        except OSError as exc:
            self.close()
            raise ConfigError(
                f"cannot pin data-path worker {self.index} to CPU {self.cpu}: {exc.strerror}"
            ) from None

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self.ctl[k.C_REQUEST] = 1
            self._cond.notify_all()
        self.wake()
        self._thread.join()
        self.release()

    def release(self) -> None:
        """Close the epoll set and the wake eventfd (the thread has ended or never ran)."""
        self._epoll.close()
        os.close(self._wake_fd)
        if self._claimed is not None:
            _POLL_CPUS.release(self._claimed)
            self._claimed = None

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the worker out of the kernel; on exit rebuild its table and let it go on."""
        with self._cond:
            self._pausers += 1
            self.ctl[k.C_REQUEST] = 1
        self.wake()
        with self._cond:
            while self._in_kernel:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._pausers -= 1
                if self._pausers == 0:
                    self._rebuild()
                    if not self._closing:
                        self.ctl[k.C_REQUEST] = 0
                self._cond.notify_all()

    def watch(self, entry: _Attached) -> None:
        """Wait for the queue's kicks when it is armed (worker paused)."""
        if entry.kick is not None and entry.armed:
            self._epoll.register(entry.kick, select.EPOLLIN)
        if entry.kick is None and entry.armed:
            self._polled += 1

    def watch_port(self, port: Port) -> None:
        """Wake when the port's own fd becomes readable (worker paused)."""
        fd = int(port.unit[k.U_FD])
        if fd >= 0:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)

    def unwatch_port(self, port: Port) -> None:
        """Stop watching the port's own fd (worker paused); the fd stays open."""
        fd = int(port.unit[k.U_FD])
        if fd >= 0:
            self._epoll.unregister(fd)

    def unwatch(self, entry: _Attached) -> None:
        """Stop waiting for the queue's kicks and close the kick duplicate (worker paused)."""
        if entry.kick is not None:
            if entry.armed:
                self._epoll.unregister(entry.kick)
            os.close(entry.kick)
        elif entry.armed:
            self._polled -= 1

    def _rebuild(self) -> None:
        addresses = [port.unit.ctypes.data for port in self.ports]
        self._units = np.array(addresses or [0], dtype=np.int64)
        self._nunits = len(addresses)

    def _run(self) -> None:
        # Named for the system, so that tools can find (and pin) the worker.
        name = f"{WORKER_THREAD_PREFIX}{self.index}".encode()
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name, 0, 0, 0)
        mode = _MODE_CODES[self.engine.mode]
        spin_us = self.engine.spin_us if mode == k.MODE_ADAPTIVE else EVENT_SPIN_US
        spin_ns = int(spin_us * 1000)
        while True:
            with self._cond:
                while not self._closing and (self._pausers or not self._nunits):
                    self._cond.wait()
                if self._closing:
                    return
                self._in_kernel = True
                units, nunits = self._units, self._nunits
                # A ring without a kick eventfd must be polled even by a sleeping worker.
                sleep_ms = 1 if self._polled else -1
            try:
                k.run_worker(
                    self.ctl, units, nunits, self._segs_t, self._segs_r, self._held,
                    self._chains, self._sink, self._zeros, self._iov, self._epoll.fileno(),
                    self._events, mode, spin_ns, sleep_ms,
                )  # fmt: skip
            finally:
                with self._cond:
                    self._in_kernel = False
                    self._cond.notify_all()


@dataclass
class _Monitor:
    """The engine's housekeeping thread state."""

    interval: float
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Engine:
    """Worker threads that run compiled ring kernels with the GIL released.

    ``workers`` threads are started by :meth:`start`, pinned to ``cpus``
    (one per worker) when given; in poll mode, to CPUs picked by
    :func:`pick_poll_cpu` otherwise.  ``spin_us`` is how long an adaptive worker
    polls after its last work; ``burst`` caps the chains one queue handles
    before the worker moves on.
    """

    def __init__(
        self,
        mode: EngineMode | str = EngineMode.ADAPTIVE,
        *,
        workers: int = 1,
        cpus: Sequence[int] | None = None,
        spin_us: float = 100.0,
        burst: int = 64,
        monitor_interval: float = 0.05,
    ) -> None:
        try:
            self.mode = EngineMode(mode)
        except ValueError:
            names = ", ".join(m.value for m in EngineMode)
            raise ConfigError(f"unknown engine mode {mode!r} ({names})") from None
        if workers < 1:
            raise ConfigError(f"an engine needs at least one worker, not {workers}")
        if cpus is not None and len(cpus) != workers:
            raise ConfigError(f"{workers} workers need {workers} cpus, not {len(cpus)}")
        if not 1 <= burst <= k.MAX_BURST:
            raise ConfigError(f"burst must be 1..{k.MAX_BURST}, not {burst}")
        if spin_us < 0:
            raise ConfigError(f"spin_us must not be negative, not {spin_us}")
        self.spin_us = spin_us
        self.burst = burst
        self._lock = threading.RLock()
        self._workers = [
            _Worker(self, i, None if cpus is None else cpus[i]) for i in range(workers)
        ]
        self._monitor = _Monitor(monitor_interval)
        # Signalled by a queue that stalls on an IOTLB miss and by attend().
        self._attention = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._retired: list[tuple[CompiledQueue, _Retired]] = []
        self._started = False
        self._closed = False

    @property
    def cpus(self) -> tuple[int | None, ...]:
        """The CPU each worker is pinned to (None: the system schedules it)."""
        return tuple(worker.cpu for worker in self._workers)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Load (or compile) the kernels, then start the workers and the monitor."""
        with self._lock:
            if self._closed:
                raise ConfigError("the engine is closed")
            if self._started:
                return self
            warm_up()
            for started, worker in enumerate(self._workers):
                try:
                    worker.start()
                except ConfigError:
                    # The failed worker closed itself; the rest never ran.
                    for other in self._workers[:started]:
                        other.close()
                    for other in self._workers[started + 1 :]:
                        other.release()
                    os.close(self._attention)
                    self._closed = True
                    raise
            monitor = threading.Thread(target=self._watch, name="dataplane-monitor", daemon=True)
            self._monitor.thread = monitor
            monitor.start()
            self._started = True
        return self

    def close(self) -> None:
        """Stop the workers (every port must be removed first) and the monitor."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = [port for worker in self._workers for port in worker.ports]
        for port in busy:
            self.remove_port(port)
        self._monitor.stop.set()
        self.attend()
        if self._monitor.thread is not None:
            self._monitor.thread.join()
        os.close(self._attention)
        for worker in self._workers:
            if self._started:
                worker.close()
        with self._lock:
            for _, retired in self._retired:
                os.close(retired.fd)
            self._retired.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ ports

    def add_port(self, unit: Int64Array, keep: object = None, fd: int | None = None) -> Port:
        """Serve the unit row ``unit`` on the least busy worker.

        ``keep`` is held as long as the port lives (buffers the row points at).
        ``fd`` is the unit's own fd (a TAP queue), which its program reads and
        writes: the worker wakes when it becomes readable.  It must stay open
        until the port is removed.
        """
        if unit.shape != (k.UCOLS,) or unit.dtype != np.int64 or not unit.flags.c_contiguous:
            raise ValueError(f"a unit row is a contiguous int64[{k.UCOLS}] array")
        # On this thread, not a worker's: a first use may compile the program.
        k.load((int(unit[k.U_PROGRAM]),))
        with self._lock:
            if not self._started:
                raise ConfigError("start the engine before adding ports")
            worker = min(self._workers, key=lambda w: len(w.ports))
            unit[k.U_RXQ] = unit[k.U_TXQ] = 0
            unit[k.U_BURST] = self.burst
            unit[k.U_FD] = -1 if fd is None else fd
            port = Port(self, worker, unit, keep)
            with worker.paused():
                worker.ports.append(port)
                worker.watch_port(port)
        return port

    def remove_port(self, port: Port) -> None:
        """Detach every queue of ``port`` and stop serving it."""
        with self._lock:
            worker = port._worker
            with worker.paused():
                for role in list(port._queues):
                    port._remove(role)
                if port in worker.ports:
                    worker.ports.remove(port)
                    worker.unwatch_port(port)

    def invalidate(
        self, ports: Sequence[Port], iova: int, size: int, change: Callable[[], None]
    ) -> bool:
        """Apply an IOTLB invalidation (``change``) under the queues of ``ports``, in place.

        The workers serving them are held out of the kernel while ``change``
        runs and every queue behind an IOMMU rebuilds its translation table,
        so none uses a withdrawn translation afterwards.  Returns False, and
        changes nothing, when the range holds a ring area (the rings must be
        set up again).
        """
        with self._lock:
            queues = [queue for port in ports for queue in port.queues.values()]
            if any(q.iotlb is not None and q.uses_ring_areas(iova, size) for q in queues):
                return False
            with contextlib.ExitStack() as stack:
                for worker in {port._worker for port in ports}:
                    stack.enter_context(worker.paused())
                change()
                for queue in queues:
                    if queue.iotlb is not None:
                        queue.retranslate()
        return True

    @property
    def ports(self) -> list[Port]:
        """Every port, whatever its worker."""
        with self._lock:
            return [port for worker in self._workers for port in worker.ports]

    def worker_of(self, port: Port) -> int:
        """Index of the worker serving ``port``."""
        return port._worker.index

    # ------------------------------------------------------------------ monitor

    def attend(self) -> None:
        """Make the monitor pass now, not at its next interval (new IOTLB entries)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._attention, 1)

    def _watch(self) -> None:
        attention = self._attention
        poller = select.poll()
        poller.register(attention, select.POLLIN)
        timeout_ms = max(1, int(self._monitor.interval * 1000))
        while not self._monitor.stop.is_set():
            if poller.poll(timeout_ms):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(attention)
            if not self._monitor.stop.is_set():
                self.check()

    def check(self) -> None:
        """One monitor pass: report broken rings, serve IOTLB misses, follow call eventfds."""
        with self._lock:
            for worker in self._workers:
                for port in worker.ports:
                    port._check(self._retired)
            keep = []
            for queue, retired in self._retired:
                worker = retired.worker
                if not worker.in_kernel or worker.epoch - retired.epoch >= _EPOCHS_BEFORE_CLOSE:
                    os.close(retired.fd)
                else:
                    keep.append((queue, retired))
            self._retired = keep

    def _close_retired(self, queue: CompiledQueue) -> None:
        """Close the retired call duplicates of a queue whose worker is paused."""
        keep = []
        for owner, retired in self._retired:
            if owner is queue:
                os.close(retired.fd)
            else:
                keep.append((owner, retired))
        self._retired = keep


class EngineIommu:
    """What a device whose queues run on an :class:`Engine` does behind an IOMMU.

    Mixed into the engine devices, before their vhost-user base: the kernels
    translate IOVAs with a table of the IOTLB, a queue that misses stalls
    until the engine's monitor brings it new translations, and
    invalidations are applied in place (:meth:`Engine.invalidate`).  The
    device keeps its ports in ``_ports`` under ``_lock``.
    """

    access_platform = True
    engine: Engine
    _lock: threading.Lock
    _ports: list[Port | None]

    def iotlb_updated(self) -> None:
        """New IOTLB entries: let the engine unstall the queues waiting for them."""
        self.engine.attend()

    def iotlb_invalidate(self, iova: int, size: int, invalidate: Callable[[], None]) -> bool:
        """Withdraw translations in place, the rings running on."""
        with self._lock:
            ports = [port for port in self._ports if port is not None]
        return self.engine.invalidate(ports, iova, size, invalidate)


#: Seconds a kernel load may take before ``warm_up`` reports that it is compiling.
COMPILE_NOTICE_AFTER = 1.0


def warm_up(
    progress: Callable[[str], None] | None = None, programs: Collection[int] | None = None
) -> None:
    """Load the worker loop and ``programs`` from the on-disk cache, compiling the first time.

    ``programs`` are ``k.P_*`` codes, every program by default; a program not
    loaded here is loaded when a port first runs it.  A load from the cache
    takes about a second; a first compilation takes tens of seconds (about
    10 s for the loop and one program).  When the load has not finished after
    :data:`COMPILE_NOTICE_AFTER` seconds, ``progress`` is called with a line
    saying so, and with another one when it is done.
    """

    def load() -> None:
        if programs is None:
            k.load()
        else:
            k.load(programs)
        log.info("data path programs loaded: %s", ", ".join(sorted(k.loaded())))

    if progress is None:
        load()
        return
    started = time.monotonic()
    told = threading.Event()

    def tell() -> None:
        told.set()
        progress("compiling the data-path kernels (first start only, cached on disk afterwards)…")

    notice = threading.Timer(COMPILE_NOTICE_AFTER, tell)
    notice.daemon = True
    notice.start()
    try:
        load()
    finally:
        notice.cancel()
        notice.join()
    if told.is_set():
        progress(f"data-path kernels ready in {time.monotonic() - started:.0f} s")
