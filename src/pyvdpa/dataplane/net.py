"""A simulated virtio-net device whose data path runs on the compiled engine.

Theory of operation (virtio 1.2, section 5.1; Linux ``vdpa_sim_net``): the
device offers what :class:`~pyvdpa.devices.net.NetDevice` offers (the same
feature bits, protocol features, config space and per-queue counters), but
its queues never run Python.  Each queue pair *k* (receive queue ``2k``,
transmit queue ``2k + 1``) becomes one :class:`~pyvdpa.dataplane.engine.Port`
of an :class:`~pyvdpa.dataplane.engine.Engine`, and the control plane only
hands the engine ring addresses, memory and eventfds:

* :meth:`EngineNetDevice.start_queue` builds the queue's compiled state
  from the ring description
  (:meth:`~pyvdpa.dataplane.queues.CompiledQueue.from_spec`) and attaches
  it to the pair's port;
* :meth:`EngineNetDevice.stop_queue` detaches it and returns the ring's
  exact position: when it returns the worker no longer touches the ring.

Programs: ``loopback`` (transmitted frames accepted by vdpa_sim_net's filter
are received on the same pair; a frame finding no room in the receive ring
is dropped, as vdpa_sim_net drops it), ``drop`` (transmitted frames are read
and counted), ``gen`` (every receive buffer is filled with a generated
Ethernet/IPv4/UDP frame of ``frame_size`` bytes, copied from one of
:data:`~pyvdpa.dataplane.kernels.net.POOL_SLOTS` templates in turn, as DPDK
copies from a burst of mbufs; transmitted frames are dropped) and ``tap``
(the device is a NIC wired to a TAP interface,
:mod:`pyvdpa.devices.tap`: pair *k* moves frames between its rings and the
TAP's queue *k*, straight to and from guest memory; frames the host sends
while no receive buffer waits stay in the TAP's kernel queue).  When a frame
needs several merged receive buffers and fewer are available, the ones taken
are put back untouched for later, as Linux vhost-net and DPDK do, rather
than returned empty.  Counters use DPDK's names, plus ``dropped`` and
``calls`` (used buffer notifications sent).

The TAP is created with the device, so a name that cannot be used is a
:class:`~pyvdpa.errors.ConfigError` at once.  Its queue *k* > 0 is attached
to the interface only while pair *k*'s receive ring runs, so that the kernel
spreads the host's frames over the pairs the driver uses (a guest with fewer
CPUs than pairs enables only some), as QEMU's own TAP back-end does;
queue 0 always is.
"""

from __future__ import annotations

import atexit
import logging
import os
import struct
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pyvdpa.dataplane import kernels as k
from pyvdpa.dataplane.engine import RX, TX, Engine, EngineIommu, EngineMode, Port
from pyvdpa.dataplane.kernels.net import POOL_SLOTS, slot_stride
from pyvdpa.dataplane.queues import CompiledQueue, Int64Array
from pyvdpa.device import Device, QueueNotRunningError, RingPosition, RingSpec
from pyvdpa.devices.net import DEFAULT_MAC, NetControl, rarp_frame
from pyvdpa.devices.tap import DEFAULT_TAP_NAME, TAP_FRAME_MAX, Tap
from pyvdpa.errors import ConfigError
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import NetFeature
from pyvdpa.virtio.net import net_header_size

__all__ = [
    "DEFAULT_MAC",
    "ENGINE_EXCLUDED_PROTOCOL_FEATURES",
    "ENGINE_NET_MODES",
    "NET_PROGRAMS",
    "EngineNetDevice",
    "QueueCounters",
    "generated_frame",
    "shared_engine",
    "shared_engines",
]

log = logging.getLogger(__name__)


#: Protocol features no engine device offers.  In-band notifications: the
#: kernels signal used buffers on call eventfds only, and a VRING_CALL message
#: waits for the front-end's reply, a round trip a compiled data path does
#: not make; as with rust-vmm's vhost-user-backend, whose rings signal call
#: eventfds only, a device offers what its data path honours.
ENGINE_EXCLUDED_PROTOCOL_FEATURES = ProtocolFeature.INBAND_NOTIFICATIONS
MIN_FRAME = 14
MAX_FRAME = 65535

#: The compiled program of each sim-net mode.
NET_PROGRAMS = {"loopback": k.P_LOOPBACK, "drop": k.P_DROP, "gen": k.P_GEN, "tap": k.P_TAP}
ENGINE_NET_MODES = tuple(NET_PROGRAMS)
# Queues whose new buffers can be work for each program (the worker may wait
# for their kicks; the tap program decides while it runs, see kernels.Q_ARM).
_ARMED = {"loopback": (TX,), "drop": (TX,), "gen": (RX, TX), "tap": (RX, TX)}

# Frames a reset drops from one TAP queue at most (Linux's default TAP queue
# length): a host still sending must not keep the control plane reading.
_DISCARD_MAX = 1000

_ETHER = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ETH_P_IPV4 = 0x0800
_IPPROTO_UDP = 17
_DISCARD_PORT = 9
_SOURCE_IP = bytes((192, 0, 2, 1))
_DEST_IP = bytes((192, 0, 2, 2))


def _checksum(data: bytes) -> int:
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def generated_frame(size: int, source_mac: bytes) -> bytes:
    """The frame the ``gen`` program sends: broadcast Ethernet, then IPv4/UDP when it fits.

    UDP goes from 192.0.2.1 to 192.0.2.2 (TEST-NET-1) on the discard port;
    the payload counts up byte by byte.
    """
    if not MIN_FRAME <= size <= MAX_FRAME:
        raise ConfigError(f"frame size must be {MIN_FRAME}..{MAX_FRAME}, not {size}")
    ether = _ETHER.pack(b"\xff" * 6, source_mac, _ETH_P_IPV4)
    headers = _ETHER.size + _IPV4.size + _UDP.size
    if size < headers:
        return ether + bytes(range(size - len(ether)))
    ip_len = size - _ETHER.size
    ip = _IPV4.pack(0x45, 0, ip_len, 0, 0, 64, _IPPROTO_UDP, 0, _SOURCE_IP, _DEST_IP)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    udp = _UDP.pack(_DISCARD_PORT, _DISCARD_PORT, ip_len - _IPV4.size, 0)
    payload = bytes(i & 0xFF for i in range(size - headers))
    return ether + ip + udp + payload


class _Counter:
    """One counter of a :class:`QueueCounters`, read live from the engine's memory."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __get__(self, counters: QueueCounters, owner: object = None) -> int:
        return int(counters.row[self.index])


class QueueCounters:
    """Live counters of one queue, with the names of :class:`~pyvdpa.devices.stats.QueueStats`.

    The worker updates them while it runs; a read is a snapshot and
    :meth:`reset` may lose increments made at the same moment.
    """

    __slots__ = ("row",)

    received_desc = _Counter(k.S_RECEIVED_DESC)
    completed_desc = _Counter(k.S_COMPLETED_DESC)
    bad_desc_errors = _Counter(k.S_BAD_DESC_ERRORS)
    exceed_max_chain = _Counter(k.S_EXCEED_MAX_CHAIN)
    invalid_buffer = _Counter(k.S_INVALID_BUFFER)
    completion_errors = _Counter(k.S_COMPLETION_ERRORS)
    packets = _Counter(k.S_PACKETS)
    bytes = _Counter(k.S_BYTES)
    dropped = _Counter(k.S_DROPPED)
    calls = _Counter(k.S_CALLS)

    def __init__(self, row: Int64Array) -> None:
        self.row = row

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: int(self.row[i]) for i, name in enumerate(k.KERNEL_STAT_NAMES)}

    def reset(self) -> None:
        """Zero every counter."""
        self.row[:] = 0


_shared_lock = threading.Lock()
_shared: dict[tuple[EngineMode, tuple[int, ...] | None], Engine] = {}


def shared_engine(
    mode: EngineMode | str = EngineMode.ADAPTIVE, cpus: Sequence[int] | None = None
) -> Engine:
    """The process-wide engine of ``mode``, started on first use.

    Without ``cpus`` it has one worker, which the system schedules (in
    poll mode, pinned to a CPU the engine picks); with ``cpus`` it has one
    worker pinned to each CPU listed, and devices spread their queue pairs
    over them.
    """
    key = (EngineMode(mode), None if cpus is None else tuple(cpus))
    with _shared_lock:
        engine = _shared.get(key)
        if engine is None:
            workers = 1 if cpus is None else len(cpus)
            engine = Engine(key[0], workers=workers, cpus=key[1]).start()
            _shared[key] = engine
        return engine


def shared_engines() -> list[Engine]:
    """The process-wide engines started so far."""
    with _shared_lock:
        return list(_shared.values())


@atexit.register
def _close_shared() -> None:
    with _shared_lock:
        engines = list(_shared.values())
        _shared.clear()
    for engine in engines:
        engine.close()


def _open_tap(ifname: str, queues: int) -> Tap:
    """Create the TAP with only its first queue attached (no receive ring runs yet)."""
    tap = Tap(ifname, queues=queues)
    try:
        for queue in range(1, queues):
            tap.set_queue_attached(queue, False)
    except BaseException:
        tap.close()
        raise
    return tap


def _discard(fd: int) -> int:
    """Read and drop what a TAP queue holds, at most a full queue's worth; return the count."""
    count = 0
    for _ in range(_DISCARD_MAX):
        try:
            os.read(fd, TAP_FRAME_MAX)
        except OSError:
            # Empty (EAGAIN), or a detached queue, which holds nothing.
            break
        count += 1
    return count


def _templates(frame: bytes, pool: bool) -> npt.NDArray[np.uint8]:
    """The ``gen`` program's template frames: a pool of copies one slot apart, or just one."""
    stride = slot_stride.py_func(len(frame))
    count = POOL_SLOTS if pool else 1
    templates = np.zeros((count, stride), dtype=np.uint8)
    templates[:, : len(frame)] = np.frombuffer(frame, dtype=np.uint8)
    return templates


class EngineNetDevice(EngineIommu, NetControl, Device):
    """A virtio-net device (loopback, drop, gen or tap) whose queues run on an :class:`Engine`.

    ``engine`` defaults to the process-wide engine of ``engine_mode`` whose
    workers are pinned to ``cpus`` (see :func:`shared_engine`).
    ``frame_size`` is the length of the frames ``gen`` sends (Ethernet
    header included, no FCS).  ``ifname`` names the TAP in ``tap`` mode (a
    ``%d`` template lets the kernel choose); :meth:`close` releases it.
    ``burst`` caps the chains a queue of this device hands the worker in one
    pass (the engine's burst when ``None``), as testpmd's ``--burst`` does.
    """

    def __init__(
        self,
        *,
        mode: str = "loopback",
        mac: bytes = DEFAULT_MAC,
        mtu: int = 1500,
        queue_pairs: int = 1,
        frame_size: int = 64,
        engine_mode: EngineMode | str = EngineMode.ADAPTIVE,
        cpus: Sequence[int] | None = None,
        engine: Engine | None = None,
        status_feature: bool = False,
        ifname: str | None = None,
        burst: int | None = None,
    ) -> None:
        if mode not in ENGINE_NET_MODES:
            raise ConfigError(f"unknown engine net mode {mode!r} ({', '.join(ENGINE_NET_MODES)})")
        if ifname is not None and mode != "tap":
            raise ConfigError(f"ifname={ifname} needs mode=tap, not mode={mode}")
        self._init_net(mac=mac, mtu=mtu, queue_pairs=queue_pairs, status_feature=status_feature)
        self.protocol_features &= ~ENGINE_EXCLUDED_PROTOCOL_FEATURES
        if burst is not None and not 1 <= burst <= k.MAX_BURST:
            raise ConfigError(f"burst must be 1..{k.MAX_BURST}, not {burst}")
        self.mode = mode
        self.burst = burst
        self._frame_size = frame_size
        self._frame = _templates(generated_frame(frame_size, mac), mode == "gen")
        self._counters = np.zeros((self.num_queues, k.NSTATS), dtype=np.int64)
        self._ports: list[Port | None] = [None] * queue_pairs
        self._lock = threading.Lock()
        self.engine = engine if engine is not None else shared_engine(engine_mode, cpus)
        #: The TAP in ``tap`` mode: queue *k* serves pair *k*.
        self.tap: Tap | None = None
        self._bounce: npt.NDArray[np.uint8] = np.zeros((0, 0), dtype=np.uint8)
        if mode == "tap":
            self.tap = _open_tap(ifname or DEFAULT_TAP_NAME, queue_pairs)
            self._bounce = np.zeros((queue_pairs, TAP_FRAME_MAX), dtype=np.uint8)

    # ------------------------------------------------------------------ control

    @property
    def frame_size(self) -> int:
        """Length of the frames ``gen`` sends."""
        return self._frame_size

    @property
    def stats(self) -> list[QueueCounters]:
        """Per-queue counters, live."""
        return [QueueCounters(self._counters[i]) for i in range(self.num_queues)]

    @property
    def dropped(self) -> int:
        """Frames lost: refused by the receive filter, finding no receive buffer, or the TAP."""
        return int(self._counters[:, k.S_DROPPED].sum())

    def set_features(self, features: int) -> None:
        """Remember the negotiated features (they size the header, allow merged buffers)."""
        self.negotiated = features
        with self._lock:
            for port in self._ports:
                if port is not None:
                    port.set(k.U_HDR, net_header_size(features))
                    port.set(k.U_MRG, bool(features & NetFeature.MRG_RXBUF))

    def send_rarp(self, mac: bytes) -> None:
        """Announce ``mac`` on the TAP; in other modes there is no switch to tell."""
        if self.tap is None:
            return
        try:
            self.tap.write(0, [rarp_frame(mac)])
        except OSError as exc:
            log.warning("TAP %s: cannot announce %s: %s", self.tap.name, mac.hex(":"), exc)

    # ------------------------------------------------------------------ queues

    def _port(self, pair: int) -> Port:
        port = self._ports[pair]
        if port is None:
            unit = np.zeros(k.UCOLS, dtype=np.int64)
            unit[k.U_PROGRAM] = NET_PROGRAMS[self.mode]
            unit[k.U_HDR] = net_header_size(self.negotiated)
            unit[k.U_MRG] = bool(self.negotiated & NetFeature.MRG_RXBUF)
            unit[k.U_MAC] = int.from_bytes(self.mac, "little")
            unit[k.U_FRAME] = self._frame.ctypes.data
            unit[k.U_FRAME_LEN] = self._frame_size
            fd = None
            if self.tap is not None:
                bounce = self._bounce[pair]
                unit[k.U_BOUNCE] = bounce.ctypes.data
                unit[k.U_BOUNCE_LEN] = len(bounce)
                fd = self.tap.fds[pair]
            port = self.engine.add_port(unit, keep=(self._frame, self._bounce), fd=fd)
            if self.burst is not None:
                port.set(k.U_BURST, self.burst)
            self._ports[pair] = port
        return port

    def _steer(self, pair: int, receiving: bool) -> None:
        """Let the kernel send to a pair's TAP queue only while its receive ring runs."""
        if self.tap is not None and pair > 0:
            self.tap.set_queue_attached(pair, receiving)

    def start_queue(self, spec: RingSpec) -> None:
        """Build the ring's compiled queue and hand it to the engine."""
        pair, role = divmod(spec.index, 2)
        role = RX if role == 0 else TX
        # In order, a receive queue still writes every used element: DPDK's
        # in-order receive path reads each element's length.
        queue = CompiledQueue.from_spec(spec, stats=self._counters[spec.index], batch=role == TX)
        with self._lock:
            self._port(pair).attach(role, queue, spec.notifiers, armed=role in _ARMED[self.mode])
            if role == RX:
                self._steer(pair, True)

    def stop_queue(self, index: int) -> RingPosition:
        """Take the ring back from the engine and say where it stands."""
        pair, role = divmod(index, 2)
        role = RX if role == 0 else TX
        with self._lock:
            port = self._ports[pair]
            queue = None if port is None else port.detach(role)
            if port is None or queue is None:
                raise QueueNotRunningError(f"ring {index} is not running")
            if role == RX:
                self._steer(pair, False)
            if not port.queues:
                self.engine.remove_port(port)
                self._ports[pair] = None
        return queue.position

    def reset(self) -> None:
        """Drop the frames a TAP queue holds for a pair whose rings are all stopped.

        A reset NIC keeps nothing it received before; they count as dropped.
        """
        if self.tap is None:
            return
        with self._lock:
            for pair, fd in enumerate(self.tap.fds):
                if self._ports[pair] is None:
                    self._counters[2 * pair, k.S_DROPPED] += _discard(fd)

    def close(self) -> None:
        """Take every remaining ring back from the engine, then release the TAP."""
        with self._lock:
            for pair, port in enumerate(self._ports):
                if port is not None:
                    self.engine.remove_port(port)
                    self._ports[pair] = None
            if self.tap is not None:
                self.tap.close()
