"""The vhost-user back-end: one connection's state machine.

Theory of operation (vhost-user spec, "Front-end message types", "Ring
states", "REPLY_ACK"), in three layers as rust-vmm's ``vhost-user-backend``:

1. :meth:`BackendConnection.handle` is the *dispatcher*: it decodes a frame
   (header, exact payload size, fd allow-list: the codec's rules), checks
   the protocol-feature gate, calls the handler, and answers: the request's
   own reply, or with REPLY_ACK negotiated and NEED_REPLY set a u64 that is
   0 on success and non-zero on failure.  It is sans-I/O: frames in, encoded
   replies out; the runtime in :mod:`pyvdpa.vhost_user.server` moves bytes.
2. One ``_on_<REQUEST>`` method per request applies it to the connection
   state (features, memory table, vrings, log, inflight region).
3. A :class:`~pyvdpa.device.Device` is told when a ring starts (with a
   :class:`~pyvdpa.device.RingSpec` built and checked here, once) and
   stops (handing back the exact :class:`~pyvdpa.device.RingPosition`).

Ring lifecycle is a table (:data:`RING_TRANSITIONS`): events (a kick fd, an
in-band VRING_KICK, GET_VRING_BASE, SET_VRING_ENABLE) move a ring
between started/stopped and enabled/disabled; a ring *runs* (the device
processes it) exactly when it is started, enabled and configured.  Whenever
something a running ring depends on changes (a new memory table, features,
log base, an IOTLB invalidation), the ring is stopped, its exact position
saved, and restarted.

IOMMU (vhost-user spec, "IOMMU support"): a device that can work behind one
is offered with ``VIRTIO_F_ACCESS_PLATFORM`` (and only with the BACKEND_REQ
and REPLY_ACK protocol features QEMU requires for it).  Once negotiated, ring
addresses of SET_VRING_ADDR (the log address included) and descriptor
addresses are IOVAs, translated by the connection's
:class:`~pyvdpa.memory.Iotlb`, which ``IOTLB_MSG`` UPDATE and INVALIDATE
fill and empty.  A ring whose areas have no translation yet does not fail:
the back-end sends an IOTLB MISS on the back-end channel and starts the ring
when an UPDATE makes them translatable, as DPDK's ``vring_translate`` does.
Devices request the translations their buffers miss the same way
(:meth:`~pyvdpa.device.RingNotifiers.request_translation`), one MISS per
outstanding address.  An INVALIDATE stops every running ring before the
entries go and restarts them after, so no ring uses a translation the
front-end withdrew once the reply is sent.  ``IOTLB_MSG``'s reply is its
status: a refused message is answered non-zero and the connection goes on.

Back-end requests go out on the SET_BACKEND_REQ_FD channel through
:meth:`BackendConnection.send_backend_request`, one request and its reply
at a time; with in-band notifications ("In-band notifications", accepted
only with BACKEND_REQ and REPLY_ACK) the device threads send VRING_CALL /
VRING_ERR there, with NEED_REPLY, for rings without call (err) eventfds.

fd ownership: every fd received is handed to :meth:`handle`, which passes
the list to the handler; a handler *takes* the fds it keeps (pops them) and
the dispatcher closes whatever is left, on success and on every error.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvdpa.device import (
    Device,
    QueueNotRunningError,
    RingNotifiers,
    RingPosition,
    RingSpec,
    Signal,
    UnsupportedRequestError,
    describe_ring,
)
from pyvdpa.device.inflight import InflightRegion, PackedInflightQueue, SplitInflightQueue
from pyvdpa.device.ring import check_ring_size
from pyvdpa.errors import (
    GuestMemoryError,
    IotlbMissError,
    ProtocolError,
    PyvdpaError,
    RemoteProtocolError,
    RingError,
)
from pyvdpa.memory import (
    MAX_MEM_SLOTS,
    DirtyLog,
    GuestMemory,
    Iotlb,
    IotlbAddressSpace,
    MemoryRegion,
)
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.codec import Message
from pyvdpa.vhost_user.protocol import (
    ACKED_BACKEND_CHANNEL,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    HeaderFlags,
    IotlbPerm,
    IotlbType,
    ProtocolFeature,
    Request,
)
from pyvdpa.vhost_user.transport import Channel, Frame, close_fds
from pyvdpa.virtio.constants import DeviceStatus, VirtioFeature
from pyvdpa.virtio.packed import PackedLayout
from pyvdpa.virtio.ring import MAX_QUEUE_SIZE, AddressSpace
from pyvdpa.virtio.split import SplitLayout

__all__ = [
    "IMPLEMENTED_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "RING_TRANSITIONS",
    "BackendConnection",
    "RingEvent",
    "RingState",
    "Vring",
]

log = logging.getLogger(__name__)


#: Protocol features this back-end implements; a device's wishes are masked by it.
IMPLEMENTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.RARP
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.NET_MTU
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.INBAND_NOTIFICATIONS
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)

#: Feature bits the back-end itself contributes to every device's offer.
_BACKEND_FEATURES = VirtioFeature.PROTOCOL_FEATURES

#: Feature bits that may change while rings run (migration toggles logging).
_LIVE_FEATURES = VirtioFeature.LOG_ALL


class RingState(enum.Enum):
    """A vring's (started, enabled) pair."""

    STOPPED_DISABLED = (False, False)
    STOPPED_ENABLED = (False, True)
    STARTED_DISABLED = (True, False)
    STARTED_ENABLED = (True, True)


class RingEvent(enum.Enum):
    """What moves a vring between :class:`RingState` values."""

    KICK_FD = "SET_VRING_KICK"
    KICK = "VRING_KICK"
    GET_BASE = "GET_VRING_BASE"
    ENABLE = "SET_VRING_ENABLE 1"
    DISABLE = "SET_VRING_ENABLE 0"
    RESET = "reset"


def _ring_table() -> dict[tuple[RingState, RingEvent], RingState]:
    s = RingState
    table: dict[tuple[RingState, RingEvent], RingState] = {}
    for state in s:
        started, enabled = state.value
        table[(state, RingEvent.KICK_FD)] = s((True, enabled))
        table[(state, RingEvent.KICK)] = s((True, enabled))
        table[(state, RingEvent.GET_BASE)] = s((False, enabled))
        table[(state, RingEvent.ENABLE)] = s((started, True))
        table[(state, RingEvent.DISABLE)] = s((started, False))
        table[(state, RingEvent.RESET)] = s.STOPPED_DISABLED
    return table


#: (state, event) -> next state.  Every pair is legal: the spec lets
#: SET_VRING_ENABLE arrive before a ring is configured and a kick fd be
#: replaced while a ring runs.
RING_TRANSITIONS = _ring_table()


@dataclass(eq=False)
class Vring:
    """The back-end's record of one virtqueue (never the device's queue).

    ``base`` is the SET_VRING_BASE value, or where the device stopped (the
    GET_VRING_BASE encoding); ``spec`` is the ring's description while the
    device runs it.  The notifiers hold the kick, call and err eventfds.
    """

    index: int
    notifiers: RingNotifiers
    num: int = 0
    base: int = 0
    started: bool = False
    enabled: bool = False
    spec: RingSpec | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        """Started, enabled and configured: the device processes it."""
        return self.spec is not None

    @property
    def broken(self) -> bool:
        """Whether the device (or the back-end) found the ring broken."""
        return self.notifiers.broken

    @broken.setter
    def broken(self, value: bool) -> None:
        self.notifiers.broken = value

    @property
    def ring_addrs(self) -> tuple[int, int, int] | None:
        """The running ring's three area addresses in the device's address space."""
        return None if self.spec is None else self.spec.addrs


@dataclass(frozen=True, slots=True)
class _Reply:
    data: bytes
    fds: tuple[int, ...] = ()


class BackendConnection:
    """One front-end's connection to a device, as a sans-I/O state machine.

    Feed each received :class:`~pyvdpa.vhost_user.transport.Frame` to
    :meth:`handle` and send back what it returns; call :meth:`close` when the
    connection ends.  ``backend_channel_factory`` turns the fd of
    SET_BACKEND_REQ_FD into a channel (a :class:`Channel` over the socket).
    """

    def __init__(self, device: Device, *, name: str = "vhost-user") -> None:
        self.device = device
        self.name = name
        self.memory = GuestMemory(max_regions=MAX_MEM_SLOTS)
        self.vrings = [
            Vring(i, RingNotifiers(i, name, translation=self.request_translation))
            for i in range(device.num_queues)
        ]
        # Plain ints: inverting an IntFlag would drop bits it does not name.
        self.offered_features = int(device.features) | int(_BACKEND_FEATURES)
        self.offered_protocol_features = int(device.protocol_features) & int(
            IMPLEMENTED_PROTOCOL_FEATURES
        )
        if self.offered_features & VirtioFeature.LOG_ALL:
            self.offered_protocol_features |= int(ProtocolFeature.LOG_SHMFD)
        iommu = int(ACKED_BACKEND_CHANNEL)
        if device.access_platform and self.offered_protocol_features & iommu == iommu:
            self.offered_features |= int(VirtioFeature.ACCESS_PLATFORM)
        self.iotlb = Iotlb()
        self.iotlb_space = IotlbAddressSpace(self.iotlb, self.memory)
        self.iotlb_misses_sent = 0
        self._misses: set[int] = set()
        self.features = 0
        self.features_set = False
        self.protocol_features = ProtocolFeature(0)
        self.owner = False
        self.status = 0
        self.dirty_log: DirtyLog | None = None
        self.log_call_fd: int | None = None
        self.inflight: InflightRegion | None = None
        self.backend_channel: Channel | None = None
        # One back-end request and its reply at a time: device threads send
        # in-band notifications and IOTLB misses concurrently.
        self._backend_lock = threading.Lock()
        self.closed = False
        self._addrs: dict[int, codec.VringAddr] = {}
        self._handlers: dict[Request, Callable[[Message, list[int]], object]] = {
            request: getattr(self, f"_on_{request.name.lower()}")
            for request in Request
            if hasattr(self, f"_on_{request.name.lower()}")
        }

    # ------------------------------------------------------------------ dispatch

    def handle(self, frame: Frame) -> list[tuple[bytes, tuple[int, ...]]]:
        """Apply one frame; return the encoded replies to send (possibly none).

        Raises :class:`ProtocolError` with ``drop_connection`` set when the
        connection must be closed.  Every fd in ``frame.fds`` is either kept
        by the connection or closed before this returns.
        """
        fds = frame.fds
        header = frame.header
        try:
            try:
                message = codec.decode_request(header, frame.body, fds)
                codec.check_gate(message.request, self.protocol_features)
                handler = self._handlers.get(Request(message.request))
                if handler is None:
                    raise RemoteProtocolError(
                        f"{Request(message.request).name}: not supported by this back-end"
                    )
                result = handler(message, fds)
            except (PyvdpaError, UnsupportedRequestError) as exc:
                return self._refuse(header.request, header.flags, exc)
        finally:
            close_fds(fds)
            fds.clear()
        return self._answer(message, result)

    def _wants_ack(self, flags: int) -> bool:
        return bool(
            self.protocol_features & ProtocolFeature.REPLY_ACK and flags & HeaderFlags.NEED_REPLY
        )

    def _answer(self, message: Message, result: object) -> list[tuple[bytes, tuple[int, ...]]]:
        request = Request(message.request)
        if isinstance(result, _Reply):
            return [(result.data, result.fds)]
        if codec.has_reply(request):
            assert isinstance(result, codec.Payload)
            return [(codec.encode_reply(request, result), ())]
        if self._wants_ack(message.flags):
            return [(codec.encode_reply(request, codec.U64(0)), ())]
        return []

    def _refuse(
        self, request: int, flags: int, exc: Exception
    ) -> list[tuple[bytes, tuple[int, ...]]]:
        # A dropped connection is logged once, by whoever closes it.
        if isinstance(exc, ProtocolError) and exc.drop_connection:
            raise exc
        if request not in Request.__members__.values():
            log.error("%s: request %d refused: %s", self.name, request, exc)
            return self._ack_failure(request, flags)
        req = Request(request)
        if req is Request.IOTLB_MSG:
            log.error("%s: %s refused: %s", self.name, req.name, exc)
            # Its reply is its status (QEMU reads it like a REPLY_ACK).
            body = codec.U64(1).encode()
            header = codec.HEADER.pack(req, HeaderFlags.VERSION | HeaderFlags.REPLY, len(body))
            return [(header + body, ())]
        if codec.has_reply(req) and req is not Request.GET_CONFIG:
            # The front-end waits for a reply we cannot give: close the connection.
            raise RemoteProtocolError(
                f"{req.name} refused, and it must be answered: {exc}", drop_connection=True
            ) from exc
        log.error("%s: %s refused: %s", self.name, req.name, exc)
        if req is Request.GET_CONFIG:
            # libvhost-user's convention: an empty payload tells QEMU it failed.
            return [(codec.HEADER.pack(req, HeaderFlags.VERSION | HeaderFlags.REPLY, 0), ())]
        return self._ack_failure(request, flags)

    def _ack_failure(self, request: int, flags: int) -> list[tuple[bytes, tuple[int, ...]]]:
        if not self._wants_ack(flags):
            return []
        return [(codec.encode_ack_failure(request), ())]

    # ------------------------------------------------------------------ helpers

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RemoteProtocolError(
                f"vring index {index} out of range (device has {len(self.vrings)} queues)"
            )
        return self.vrings[index]

    @staticmethod
    def _take_fd(fds: list[int]) -> int:
        return fds.pop(0)

    @property
    def packed(self) -> bool:
        """Whether the packed ring layout was negotiated."""
        return bool(self.features & VirtioFeature.RING_PACKED)

    @property
    def iommu(self) -> bool:
        """Whether VIRTIO_F_ACCESS_PLATFORM was negotiated: device addresses are IOVAs."""
        return bool(self.features & VirtioFeature.ACCESS_PLATFORM)

    def _transition(self, vring: Vring, event: RingEvent) -> None:
        state = RingState((vring.started, vring.enabled))
        was_enabled = vring.enabled
        vring.started, vring.enabled = RING_TRANSITIONS[(state, event)].value
        disabled_only = vring.started and was_enabled and not vring.enabled
        if disabled_only:
            # The device hears of a disable before the ring stops, so that it
            # can tell a disabled ring from a stopped one.
            self.device.vring_state_changed(vring.index, False)
        self._sync(vring)
        if vring.enabled != was_enabled and not disabled_only:
            self.device.vring_state_changed(vring.index, vring.enabled)

    def _sync(self, vring: Vring) -> None:
        """Start or stop the device's processing to match the ring's state."""
        should_run = vring.started and vring.enabled and not vring.broken
        if vring.running and not should_run:
            self._stop(vring)
        elif should_run and not vring.running:
            self._start(vring)

    def _stop(self, vring: Vring) -> None:
        spec = vring.spec
        if spec is None:
            return
        try:
            position = self.device.stop_queue(vring.index)
        except QueueNotRunningError as exc:
            # The device let go of the ring on its own (it was closed).
            log.warning("%s: vring %d: %s", self.name, vring.index, exc)
            position = spec.position
        vring.base = position.encode(packed=spec.packed)
        vring.spec = None
        spec.areas.release()

    def _start(self, vring: Vring) -> None:
        try:
            spec = self._describe(vring)
        except IotlbMissError as miss:
            # Not the driver's fault: ask, and start when the UPDATE comes.
            log.info("%s: vring %d waits for a translation: %s", self.name, vring.index, miss)
            self.request_translation(miss.iova, miss.write)
            return
        except (RingError, GuestMemoryError, RemoteProtocolError) as exc:
            log.error("%s: vring %d cannot start: %s", self.name, vring.index, exc)
            vring.notifiers.fail(RingError(str(exc)))
            return
        try:
            self.device.start_queue(spec)
        except RingError as exc:
            spec.areas.release()
            log.error("%s: vring %d cannot start: %s", self.name, vring.index, exc)
            vring.notifiers.fail(exc)
            return
        vring.spec = spec

    def _inflight_record(self, vring: Vring) -> SplitInflightQueue | PackedInflightQueue | None:
        """The ring's part of the inflight region, when one of the ring's layout is shared."""
        region = self.inflight
        if region is None or vring.index >= region.num_queues or region.packed != self.packed:
            return None
        if region.packed:
            return region.packed_queue(vring.index)
        return region.split_queue(vring.index)

    def _describe(self, vring: Vring) -> RingSpec:
        """The ring's description from what the front-end sent: checked here, once."""
        addr = self._addrs.get(vring.index)
        if addr is None:
            raise RemoteProtocolError(f"vring {vring.index} started without SET_VRING_ADDR")
        if vring.num == 0:
            raise RemoteProtocolError(f"vring {vring.index} started without SET_VRING_NUM")
        space: AddressSpace
        if self.iommu:
            # IOVAs: the ring's views go through the IOTLB, which checks them.
            addrs = (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
            space = self.iotlb_space
        else:
            addrs = self._ring_gpas(vring.num, addr)
            space = self.memory
        dirty = self.dirty_log if self.features & VirtioFeature.LOG_ALL else None
        # Behind an IOMMU the log address is an IOVA too (DPDK and Linux vhost
        # translate it).
        log_addr = addr.log_guest_addr if addr.flags & 1 else None
        return describe_ring(
            vring.index, vring.num, self.features, addrs,
            RingPosition.decode(vring.base, packed=self.packed), space, vring.notifiers,
            max_size=self.device.max_queue_size, dirty_log=dirty, log_addr=log_addr,
            inflight=self._inflight_record(vring),
        )  # fmt: skip

    def _ring_gpas(self, num: int, addr: codec.VringAddr) -> tuple[int, int, int]:
        """Translate a ring's front-end addresses into guest-physical ones, checking sizes."""
        if self.packed:
            packed = PackedLayout(num)
            sizes = (packed.desc_size, packed.EVENT_SIZE, packed.EVENT_SIZE)
        else:
            split = SplitLayout(num)
            sizes = (split.desc_size, split.avail_size, split.used_size)
        uvas = (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
        names = ("descriptor table", "avail ring", "used ring")
        gpas = []
        for uva, size, what in zip(uvas, sizes, names, strict=True):
            try:
                gpas.append(self.memory.uva_to_gpa(uva, size))
            except GuestMemoryError as exc:
                raise RemoteProtocolError(
                    f"vring {addr.index} {what} at {uva:#x}+{size} is outside the memory table"
                ) from exc
        return gpas[0], gpas[1], gpas[2]

    def _restart_running(self, change: Callable[[], None]) -> None:
        """Stop running rings, apply ``change``, restart what should run."""
        running = [v for v in self.vrings if v.running]
        for vring in running:
            self._stop(vring)
        try:
            change()
        finally:
            for vring in self.vrings:
                self._sync(vring)

    # ------------------------------------------------------------------ handlers

    def _on_get_features(self, msg: Message, fds: list[int]) -> codec.Payload:
        return codec.U64(self.offered_features)

    def _on_set_features(self, msg: Message, fds: list[int]) -> None:
        features = _u64(msg)
        unknown = features & ~self.offered_features
        if unknown:
            raise RemoteProtocolError(f"SET_FEATURES: bits {unknown:#x} were not offered")
        running = any(v.running for v in self.vrings)
        if running and features == self.features:
            # QEMU 7.2 sends SET_FEATURES again for every queue pair it starts
            # (mq=on); as in DPDK, the same features change nothing while the
            # rings run, which must not be stopped for it.
            return
        if running and (features ^ self.features) & ~int(_LIVE_FEATURES):
            raise RemoteProtocolError("SET_FEATURES: features changed while rings run")

        def apply() -> None:
            self.features = features
            self.features_set = True
            self.device.set_features(features)

        self._restart_running(apply)
        if not features & VirtioFeature.PROTOCOL_FEATURES:
            # Without protocol features, rings are enabled as soon as features are set.
            for vring in self.vrings:
                self._transition(vring, RingEvent.ENABLE)

    def _on_set_owner(self, msg: Message, fds: list[int]) -> None:
        self.owner = True

    def _on_reset_owner(self, msg: Message, fds: list[int]) -> None:
        self._reset()

    def _on_reset_device(self, msg: Message, fds: list[int]) -> None:
        self._reset()

    def _reset(self) -> None:
        for vring in self.vrings:
            self._transition(vring, RingEvent.RESET)
            vring.notifiers.close_fds()
            vring.num = 0
            vring.base = 0
            vring.broken = False
        self._addrs.clear()
        self.iotlb.clear()
        with self._backend_lock:
            self._misses.clear()
        self.features = 0
        self.features_set = False
        self.status = 0
        self.device.reset()

    def _on_get_protocol_features(self, msg: Message, fds: list[int]) -> codec.Payload:
        return codec.U64(self.offered_protocol_features)

    def _on_set_protocol_features(self, msg: Message, fds: list[int]) -> None:
        value = _u64(msg)
        unknown = value & ~self.offered_protocol_features
        if unknown:
            raise RemoteProtocolError(f"SET_PROTOCOL_FEATURES: bits {unknown:#x} were not offered")
        if value & ProtocolFeature.INBAND_NOTIFICATIONS and ~value & ACKED_BACKEND_CHANNEL:
            # The spec's answer: the back-end has no other way to refuse it.
            raise RemoteProtocolError(
                "SET_PROTOCOL_FEATURES: INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK",
                drop_connection=True,
            )
        self.protocol_features = ProtocolFeature(value)
        inband = self._send_signal if value & ProtocolFeature.INBAND_NOTIFICATIONS else None
        for vring in self.vrings:
            vring.notifiers.sender = inband

    def _on_get_queue_num(self, msg: Message, fds: list[int]) -> codec.Payload:
        return codec.U64(len(self.vrings))

    def _on_get_max_mem_slots(self, msg: Message, fds: list[int]) -> codec.Payload:
        return codec.U64(MAX_MEM_SLOTS)

    def _on_set_mem_table(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.MemTable)
        pairs = list(zip(msg.payload.regions, fds, strict=True))
        self._restart_running(lambda: self.memory.set_table(pairs))

    def _on_add_mem_reg(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.SingleMemRegion)
        region: MemoryRegion = msg.payload.region
        if region in self.memory.regions:
            # QEMU 7.2 re-sends regions already mapped when it adds queues
            # (mq=on): the same region again changes nothing.
            return
        fd = fds[0]
        self._restart_running(lambda: self.memory.add_region(region, fd))

    def _on_rem_mem_reg(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.SingleMemRegion)
        region: MemoryRegion = msg.payload.region
        self._restart_running(lambda: self.memory.remove_region(region))

    def _on_set_vring_num(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.VringState)
        vring = self._vring(msg.payload.index)
        num = msg.payload.num
        try:
            check_ring_size(num, packed=self.packed, limit=self.device.max_queue_size)
        except RingError as exc:
            raise RemoteProtocolError(f"SET_VRING_NUM: {exc}") from exc
        if vring.running:
            raise RemoteProtocolError(f"SET_VRING_NUM: vring {vring.index} is running")
        vring.num = num

    def _on_set_vring_addr(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.VringAddr)
        addr = msg.payload
        vring = self._vring(addr.index)
        # IOVAs are checked when the ring starts, once translations exist.
        if vring.num and not self.iommu:
            self._ring_gpas(vring.num, addr)
        elif not self.iommu:
            for uva in (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr):
                try:
                    self.memory.uva_to_gpa(uva)
                except GuestMemoryError as exc:
                    raise RemoteProtocolError(
                        f"SET_VRING_ADDR: vring {addr.index} address {uva:#x} "
                        "is outside the memory table"
                    ) from exc

        def apply() -> None:
            self._addrs[addr.index] = addr
            vring.broken = False

        if vring.running:
            self._restart_running(apply)
        else:
            apply()

    def _on_set_vring_base(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.VringState)
        vring = self._vring(msg.payload.index)
        if vring.running:
            raise RemoteProtocolError(f"SET_VRING_BASE: vring {vring.index} is running")
        base = msg.payload.num
        if self.packed:
            # Bits 0-14 avail index, bit 15 its wrap counter.  QEMU also sends
            # the used index and wrap in bits 16-31; as in DPDK, the used side
            # restarts where the avail side is (nothing is in flight after a stop).
            base &= 0xFFFF
        elif base > 0xFFFF:
            raise RemoteProtocolError(f"SET_VRING_BASE: split ring base {base:#x} is not 16 bits")
        vring.base = base
        vring.broken = False

    def _on_get_vring_base(self, msg: Message, fds: list[int]) -> codec.Payload:
        assert isinstance(msg.payload, codec.VringState)
        vring = self._vring(msg.payload.index)
        self._transition(vring, RingEvent.GET_BASE)
        base = vring.base
        # The ring restarts from a new kick fd; the old one is finished with.
        kick = vring.notifiers.replace_kick_fd(None)
        if kick is not None:
            os.close(kick)
        return codec.VringState(vring.index, base)

    def _vring_file(self, msg: Message, fds: list[int]) -> tuple[Vring, int | None]:
        value = _u64(msg)
        vring = self._vring(value & VRING_IDX_MASK)
        fd = None if value & VRING_NOFD_MASK else self._take_fd(fds)
        return vring, fd

    def _on_set_vring_kick(self, msg: Message, fds: list[int]) -> None:
        vring, fd = self._vring_file(msg, fds)
        was_running = vring.running
        if was_running:
            self._stop(vring)
        old = vring.notifiers.replace_kick_fd(fd)
        if old is not None:
            os.close(old)
        self._transition(vring, RingEvent.KICK_FD)

    def _on_set_vring_call(self, msg: Message, fds: list[int]) -> None:
        vring, fd = self._vring_file(msg, fds)
        old = vring.notifiers.replace_call_fd(fd)
        if old is not None:
            os.close(old)

    def _on_set_vring_err(self, msg: Message, fds: list[int]) -> None:
        vring, fd = self._vring_file(msg, fds)
        old = vring.notifiers.replace_err_fd(fd)
        if old is not None:
            os.close(old)

    def _on_set_vring_enable(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.VringState)
        if not self.features & VirtioFeature.PROTOCOL_FEATURES and self.features_set:
            raise RemoteProtocolError("SET_VRING_ENABLE without PROTOCOL_FEATURES negotiated")
        vring = self._vring(msg.payload.index)
        if msg.payload.num not in (0, 1):
            raise RemoteProtocolError(f"SET_VRING_ENABLE: value {msg.payload.num} is not 0 or 1")
        self._transition(vring, RingEvent.ENABLE if msg.payload.num else RingEvent.DISABLE)

    def _on_vring_kick(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.VringState)
        vring = self._vring(msg.payload.index)
        # Like a kick on the kick fd, the first one starts the ring.
        if not vring.started:
            self._transition(vring, RingEvent.KICK)
        if vring.running:
            self.device.kick(vring.index)

    def _on_send_rarp(self, msg: Message, fds: list[int]) -> None:
        self.device.send_rarp(struct.pack("<Q", _u64(msg))[:6])

    def _on_net_set_mtu(self, msg: Message, fds: list[int]) -> None:
        mtu = _u64(msg)
        if not 68 <= mtu <= 65535:
            raise RemoteProtocolError(f"NET_SET_MTU: MTU {mtu} out of range 68..65535")
        self.device.set_mtu(mtu)

    def _on_set_backend_req_fd(self, msg: Message, fds: list[int]) -> None:
        fd = self._take_fd(fds)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise RemoteProtocolError("SET_BACKEND_REQ_FD: fd is not a socket") from exc
        if sock.family != socket.AF_UNIX:
            sock.close()
            raise RemoteProtocolError("SET_BACKEND_REQ_FD: fd is not a unix socket")
        old = self.backend_channel
        if old is not None:
            # Wake a device thread waiting for a reply on the old channel.
            old.shutdown()
        with self._backend_lock:
            self.backend_channel = Channel(sock)
        if old is not None:
            old.close()

    def _on_set_log_base(self, msg: Message, fds: list[int]) -> codec.Payload:
        assert isinstance(msg.payload, codec.LogArea)
        area = msg.payload
        new_log = DirtyLog(fds[0], area.mmap_size, area.mmap_offset)

        def apply() -> None:
            old, self.dirty_log = self.dirty_log, new_log
            if old is not None:
                old.close()

        self._restart_running(apply)
        return codec.U64(0)

    def _on_set_log_fd(self, msg: Message, fds: list[int]) -> None:
        fd = self._take_fd(fds)
        old, self.log_call_fd = self.log_call_fd, fd
        if old is not None:
            os.close(old)

    def _on_get_config(self, msg: Message, fds: list[int]) -> codec.Payload:
        assert isinstance(msg.payload, codec.ConfigSpace)
        request = msg.payload
        data = self.device.get_config(request.offset, request.size)
        if len(data) != request.size:
            raise RemoteProtocolError(
                f"GET_CONFIG: device returned {len(data)} bytes, {request.size} asked"
            )
        return codec.ConfigSpace(request.offset, request.size, request.flags, data)

    def _on_set_config(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.ConfigSpace)
        self.device.set_config(msg.payload.offset, msg.payload.data)

    def _on_get_inflight_fd(self, msg: Message, fds: list[int]) -> _Reply:
        assert isinstance(msg.payload, codec.Inflight)
        req = msg.payload
        if not 0 < req.num_queues <= len(self.vrings) or not 0 < req.queue_size <= MAX_QUEUE_SIZE:
            raise RemoteProtocolError(
                f"GET_INFLIGHT_FD: {req.num_queues} queues of {req.queue_size} out of range"
            )
        region = InflightRegion.allocate(req.num_queues, req.queue_size, packed=self.packed)
        self._replace_inflight(region)
        reply = codec.Inflight(region.mmap_size, 0, req.num_queues, req.queue_size)
        return _Reply(codec.encode_reply(Request.GET_INFLIGHT_FD, reply), (region.fd,))

    def _on_set_inflight_fd(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, codec.Inflight)
        req = msg.payload
        if not 0 < req.num_queues <= len(self.vrings):
            raise RemoteProtocolError(f"SET_INFLIGHT_FD: {req.num_queues} queues out of range")
        region = InflightRegion.from_fd(
            fds[0], req.mmap_size, req.mmap_offset, req.num_queues, req.queue_size,
            packed=self.packed,
        )  # fmt: skip
        self._replace_inflight(region)

    def _replace_inflight(self, region: InflightRegion) -> None:
        old, self.inflight = self.inflight, region
        if old is not None:
            old.close()

    def _on_set_status(self, msg: Message, fds: list[int]) -> None:
        status = _u64(msg)
        if status > 0xFF:
            raise RemoteProtocolError(f"SET_STATUS: status {status:#x} is not 8 bits")
        if status == 0:
            self._reset()
            return
        if status & DeviceStatus.FEATURES_OK and not self.features_set:
            raise RemoteProtocolError("SET_STATUS: FEATURES_OK before SET_FEATURES")
        self.status = status

    def _on_get_status(self, msg: Message, fds: list[int]) -> codec.Payload:
        return codec.U64(self.status)

    def _on_iotlb_msg(self, msg: Message, fds: list[int]) -> codec.Payload:
        assert isinstance(msg.payload, codec.IotlbMsg)
        entry = msg.payload
        if not self.iommu:
            raise RemoteProtocolError("IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM negotiated")
        if entry.type is IotlbType.UPDATE:
            try:
                self.iotlb.update(entry.iova, entry.size, entry.uaddr, entry.perm)
            except GuestMemoryError as exc:
                raise RemoteProtocolError(f"IOTLB_MSG UPDATE: {exc}") from exc
            with self._backend_lock:
                self._misses = {iova for iova in self._misses if not self.iotlb.covers(iova)}
            # Rings that waited for their areas start now.
            for vring in self.vrings:
                self._sync(vring)
            self.device.iotlb_updated()
        else:

            def invalidate() -> None:
                try:
                    self.iotlb.invalidate(entry.iova, entry.size)
                except GuestMemoryError as exc:
                    raise RemoteProtocolError(f"IOTLB_MSG INVALIDATE: {exc}") from exc

            if not self.device.iotlb_invalidate(entry.iova, entry.size, invalidate):
                self._restart_running(invalidate)
        return codec.U64(0)

    # ------------------------------------------------------------------ back-end channel

    def send_backend_request(
        self, request: BackendRequest, payload: codec.Payload, *, need_reply: bool = False
    ) -> int:
        """Send a back-end request (e.g. CONFIG_CHANGE_MSG) on the back-end channel.

        With ``need_reply`` (REPLY_ACK negotiated) wait for the front-end's
        u64 and return it (0: success); otherwise return 0 once sent.
        Raises :class:`ProtocolError` without a channel, :class:`TransportError`
        if it broke, :class:`RemoteProtocolError` for a malformed reply.
        """
        flags = HeaderFlags.VERSION | (HeaderFlags.NEED_REPLY if need_reply else 0)
        data, fds = codec.encode(Message(request, payload, HeaderFlags(flags)))
        with self._backend_lock:
            channel = self.backend_channel
            if channel is None:
                raise ProtocolError("no back-end channel (SET_BACKEND_REQ_FD not received)")
            channel.send(data, fds)
            if not need_reply:
                return 0
            frame = channel.recv()
        try:
            reply = codec.decode_backend_reply(request, frame.header, frame.body, frame.fds)
        finally:
            close_fds(frame.fds)
        assert isinstance(reply.payload, codec.U64)
        return reply.payload.value

    def _send_signal(self, signal: Signal, index: int) -> None:
        """VRING_CALL / VRING_ERR for vring ``index``, blocking until the front-end processed it."""
        request = BackendRequest.VRING_CALL if signal is Signal.CALL else BackendRequest.VRING_ERR
        result = self.send_backend_request(request, codec.VringState(index, 0), need_reply=True)
        if result:
            raise RemoteProtocolError(f"front-end answered {request.name} with {result}")

    def request_translation(self, iova: int, write: bool) -> None:
        """Send an IOTLB MISS for ``iova`` unless one is outstanding (thread-safe).

        The front-end answers with an UPDATE on the main channel.  A missing
        or broken back-end channel is logged: the ring then waits until the
        front-end maps the address by itself.
        """
        with self._backend_lock:
            if iova in self._misses or self.iotlb.covers(iova):
                return
            self._misses.add(iova)
            self.iotlb_misses_sent += 1
        perm = IotlbPerm.WO if write else IotlbPerm.RO
        miss = codec.IotlbMsg(iova, 0, 0, perm, IotlbType.MISS)
        try:
            self.send_backend_request(BackendRequest.IOTLB_MSG, miss)
        except PyvdpaError as exc:
            log.error("%s: IOTLB miss at %#x not sent: %s", self.name, iova, exc)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """The connection ended: stop rings, unmap memory, close every fd."""
        if self.closed:
            return
        self.closed = True
        if self.backend_channel is not None:
            # Device threads waiting for a front-end's reply give up before they are stopped.
            self.backend_channel.shutdown()
        for vring in self.vrings:
            self._transition(vring, RingEvent.RESET)
            vring.notifiers.close_fds()
        with contextlib.suppress(PyvdpaError):
            self.device.reset()
        self.memory.close()
        if self.dirty_log is not None:
            self.dirty_log.close()
        if self.inflight is not None:
            self.inflight.close()
        if self.log_call_fd is not None:
            os.close(self.log_call_fd)
            self.log_call_fd = None
        if self.backend_channel is not None:
            self.backend_channel.close()


def _u64(msg: Message) -> int:
    assert isinstance(msg.payload, codec.U64)
    return msg.payload.value
