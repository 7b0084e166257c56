"""The back-end's request handler: one method per front-end request, typed arguments.

Theory of operation (vhost-user spec, "Front-end message types", "Ring
states", "IOMMU support", "Inflight I/O tracking"; rust-vmm's
``VhostUserBackendReqHandler``): :class:`BackendHandler` holds one
connection's state (features, memory table, vrings, dirty log, inflight
region, IOTLB) and has one method per request it implements, named after
the request (``set_vring_num(index, num)``, ``set_mem_table(regions,
fds)``...).  The dispatcher (:mod:`pyvdpa.vhost_user.dispatch`) has already
decoded and checked the message; a method applies it or raises a typed
error, and changes nothing when it raises.  A method given an fd owns it
once it returns; if it raises, the dispatcher closes it.

The state machines are tables (:mod:`pyvdpa.vhost_user.states`): the
connection's phase (SET_OWNER before the rest), each ring's lifecycle and
the device status.

Rings: a ring *runs* (the device processes it) exactly when it is started,
enabled and configured.  Whenever something a running ring depends on
changes (a new memory table, features, log base, kick fd, an IOTLB
invalidation), the ring is stopped, its exact position saved, and
restarted.  A ring's description (:class:`~pyvdpa.device.RingSpec`) is
built and checked here, once, from what the front-end sent.

IOMMU: once ACCESS_PLATFORM is negotiated, ring and log addresses are IOVAs
translated by the connection's :class:`~pyvdpa.memory.Iotlb`, which
IOTLB_MSG UPDATE and INVALIDATE fill and empty.  A ring whose areas have no
translation yet waits, unstarted, and the handler asks for the translation
(an IOTLB MISS through its :class:`~pyvdpa.vhost_user.link.BackendLink`),
as DPDK's ``vring_translate`` does; devices ask the same way through the
ring's notifiers.  An INVALIDATE stops every running ring before the
entries go and restarts them after, unless the device withdraws the
translations in place.

The back-end channel is not here: SET_BACKEND_REQ_FD's fd, IOTLB misses,
in-band VRING_CALL / VRING_ERR and CONFIG_CHANGE_MSG go to the link the I/O
layer gave, as :class:`~pyvdpa.vhost_user.link.BackendMessage` values.

Config changes: the handler is its device's config listener while the
connection lasts; a change the device makes becomes CONFIG_CHANGE_MSG when
the front-end negotiated CONFIG (and BACKEND_REQ) and opened the channel,
acknowledged with REPLY_ACK negotiated.  Otherwise the front-end reads the
config space when it next asks (GET_CONFIG).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvdpa.device import (
    Device,
    QueueNotRunningError,
    RingNotifiers,
    RingPosition,
    RingSpec,
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
from pyvdpa.vhost_user.link import BackendLink, BackendMessage, NoBackendChannel
from pyvdpa.vhost_user.protocol import (
    ACKED_BACKEND_CHANNEL,
    BackendRequest,
    IotlbType,
    ProtocolFeature,
    Request,
)
from pyvdpa.vhost_user.states import (
    Phase,
    RingEvent,
    RingState,
    next_phase,
    next_ring_state,
    next_status,
)
from pyvdpa.virtio.constants import DeviceStatus, VirtioFeature
from pyvdpa.virtio.packed import PackedLayout
from pyvdpa.virtio.ring import MAX_QUEUE_SIZE, AddressSpace
from pyvdpa.virtio.split import SplitLayout

__all__ = ["IMPLEMENTED_PROTOCOL_FEATURES", "MAX_MEM_SLOTS", "BackendHandler", "Vring"]

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

#: Test only: with PYVDPA_TEST_NO_DIRTY_LOG=1 in the environment of the process,
#: read once when this module is imported, the log SET_LOG_BASE maps never
#: reaches the rings, so the device's writes to guest memory are not logged and
#: a live migration loses them.  The migration tests use it to show that they
#: catch exactly that; nothing else may set it.
TEST_NO_DIRTY_LOG = os.environ.get("PYVDPA_TEST_NO_DIRTY_LOG") == "1"


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
    state: RingState = RingState.STOPPED_DISABLED
    spec: RingSpec | None = field(default=None, repr=False)

    @property
    def started(self) -> bool:
        """Kicked and not stopped since (:class:`RingState`)."""
        return self.state.started

    @property
    def enabled(self) -> bool:
        """Enabled by the front-end (:class:`RingState`)."""
        return self.state.enabled

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


class BackendHandler:
    """One front-end connection's state, with one method per request.

    ``backend`` is the back-end channel the I/O layer owns (none by default).
    """

    def __init__(
        self, device: Device, *, name: str = "vhost-user", backend: BackendLink | None = None
    ) -> None:
        self.device = device
        self.name = name
        self.backend: BackendLink = NoBackendChannel() if backend is None else backend
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
        self.phase = Phase.AWAITING_OWNER
        self.features = 0
        self.features_set = False
        self.protocol_features = ProtocolFeature(0)
        self.status = DeviceStatus(0)
        self.dirty_log: DirtyLog | None = None
        self.log_call_fd: int | None = None
        self.inflight: InflightRegion | None = None
        self.closed = False
        self._addrs: dict[int, codec.VringAddr] = {}
        device.config_listener = self.config_changed

    # ------------------------------------------------------------------ state

    @property
    def packed(self) -> bool:
        """Whether the packed ring layout was negotiated."""
        return bool(self.features & VirtioFeature.RING_PACKED)

    @property
    def iommu(self) -> bool:
        """Whether VIRTIO_F_ACCESS_PLATFORM was negotiated: device addresses are IOVAs."""
        return bool(self.features & VirtioFeature.ACCESS_PLATFORM)

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RemoteProtocolError(
                f"vring index {index} out of range (device has {len(self.vrings)} queues)"
            )
        return self.vrings[index]

    def _transition(self, vring: Vring, event: RingEvent) -> None:
        was_enabled = vring.enabled
        vring.state = next_ring_state(vring.index, vring.state, event)
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
        logging_on = self.features & VirtioFeature.LOG_ALL and not TEST_NO_DIRTY_LOG
        dirty = self.dirty_log if logging_on else None
        # Behind an IOMMU the log address is an IOVA too (DPDK and Linux vhost
        # translate it).
        log_addr = addr.log_guest_addr if addr.flags & codec.VringAddrFlags.LOG else None
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
        for vring in self.vrings:
            if vring.running:
                self._stop(vring)
        try:
            change()
        finally:
            for vring in self.vrings:
                self._sync(vring)

    def _reset(self) -> None:
        for vring in self.vrings:
            self._transition(vring, RingEvent.RESET)
            vring.notifiers.close_fds()
            vring.num = 0
            vring.base = 0
            vring.broken = False
        self._addrs.clear()
        self.iotlb.clear()
        self.backend.forget_translations()
        self.features = 0
        self.features_set = False
        self.status = DeviceStatus(0)
        self.device.reset()

    # ------------------------------------------------------------------ features, owner, reset

    def get_features(self) -> int:
        """GET_FEATURES: the device's feature bits and the back-end's."""
        return self.offered_features

    def set_features(self, features: int) -> None:
        """SET_FEATURES: bits offered only; while rings run, only LOG_ALL may change."""
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
        log.info("%s: features %#x negotiated", self.name, features)
        if not features & VirtioFeature.PROTOCOL_FEATURES:
            # Without protocol features, rings are enabled as soon as features are set.
            for vring in self.vrings:
                self._transition(vring, RingEvent.ENABLE)

    def get_protocol_features(self) -> int:
        """GET_PROTOCOL_FEATURES: what the device wants, as far as the back-end implements it."""
        return self.offered_protocol_features

    def set_protocol_features(self, features: int) -> None:
        """SET_PROTOCOL_FEATURES: in-band notifications need BACKEND_REQ and REPLY_ACK."""
        unknown = features & ~self.offered_protocol_features
        if unknown:
            raise RemoteProtocolError(f"SET_PROTOCOL_FEATURES: bits {unknown:#x} were not offered")
        if features & ProtocolFeature.INBAND_NOTIFICATIONS and ~features & ACKED_BACKEND_CHANNEL:
            # The spec's answer: the back-end has no other way to refuse it.
            raise RemoteProtocolError(
                "SET_PROTOCOL_FEATURES: INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK",
                drop_connection=True,
            )
        self.protocol_features = ProtocolFeature(features)
        inband = features & ProtocolFeature.INBAND_NOTIFICATIONS
        for vring in self.vrings:
            vring.notifiers.sender = self.backend.signal if inband else None

    def set_owner(self) -> None:
        """SET_OWNER: the session starts (again, for each queue pair QEMU sets up)."""
        self.phase = next_phase(self.phase, Request.SET_OWNER)

    def reset_owner(self) -> None:
        """RESET_OWNER: reset the device, as RESET_DEVICE (the spec's older name for it)."""
        self._reset()

    def reset_device(self) -> None:
        """RESET_DEVICE: stop every ring, close their fds, forget features and translations."""
        self._reset()

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM: the device's queue count."""
        return len(self.vrings)

    # ------------------------------------------------------------------ memory

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS."""
        return MAX_MEM_SLOTS

    def set_mem_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
        """SET_MEM_TABLE: map every region (all or nothing) from its fd; running rings restart."""
        pairs = list(zip(regions, fds, strict=True))
        self._restart_running(lambda: self.memory.set_table(pairs))

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        """ADD_MEM_REG: map one more region; running rings restart."""
        if region in self.memory.regions:
            # QEMU 7.2 re-sends regions already mapped when it adds queues
            # (mq=on): the same region again changes nothing.
            return
        self._restart_running(lambda: self.memory.add_region(region, fd))

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        """REM_MEM_REG: unmap one region; running rings restart."""
        self._restart_running(lambda: self.memory.remove_region(region))

    def set_log_base(self, fd: int, size: int, offset: int) -> None:
        """SET_LOG_BASE: map the dirty log; running rings restart with it."""
        new_log = DirtyLog(fd, size, offset)
        if TEST_NO_DIRTY_LOG:
            log.warning("%s: PYVDPA_TEST_NO_DIRTY_LOG=1: the rings ignore the dirty log", self.name)

        def apply() -> None:
            old, self.dirty_log = self.dirty_log, new_log
            if old is not None:
                old.close()

        self._restart_running(apply)

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD: keep ``fd``, the eventfd signalled when the log was synced."""
        old, self.log_call_fd = self.log_call_fd, fd
        if old is not None:
            os.close(old)

    # ------------------------------------------------------------------ rings

    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM of a stopped ring: a size the layout and the device accept."""
        vring = self._vring(index)
        try:
            check_ring_size(num, packed=self.packed, limit=self.device.max_queue_size)
        except RingError as exc:
            raise RemoteProtocolError(f"SET_VRING_NUM: {exc}") from exc
        vring.state = next_ring_state(index, vring.state, RingEvent.SET_NUM)
        vring.num = num

    def set_vring_addr(self, addr: codec.VringAddr) -> None:
        """SET_VRING_ADDR: addresses inside the memory table (IOVAs are checked at start)."""
        vring = self._vring(addr.index)
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

    def set_vring_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE of a stopped ring: where it resumes."""
        vring = self._vring(index)
        if self.packed:
            # Bits 0-14 avail index, bit 15 its wrap counter.  QEMU also sends
            # the used index and wrap in bits 16-31; as in DPDK, the used side
            # restarts where the avail side is (nothing is in flight after a stop).
            base &= 0xFFFF
        elif base > 0xFFFF:
            raise RemoteProtocolError(f"SET_VRING_BASE: split ring base {base:#x} is not 16 bits")
        vring.state = next_ring_state(index, vring.state, RingEvent.SET_BASE)
        vring.base = base
        vring.broken = False

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring; return where it stands (the vhost encoding)."""
        vring = self._vring(index)
        self._transition(vring, RingEvent.GET_BASE)
        # The ring restarts from a new kick fd; the old one is finished with.
        kick = vring.notifiers.replace_kick_fd(None)
        if kick is not None:
            os.close(kick)
        return vring.base

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK: keep ``fd`` (None: NOFD) and start the ring, restarting it if it ran."""
        vring = self._vring(index)
        next_ring_state(index, vring.state, RingEvent.KICK_FD)
        if vring.running:
            self._stop(vring)
        old = vring.notifiers.replace_kick_fd(fd)
        if old is not None:
            os.close(old)
        self._transition(vring, RingEvent.KICK_FD)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL: keep ``fd`` (None: NOFD), even while the ring runs."""
        old = self._vring(index).notifiers.replace_call_fd(fd)
        if old is not None:
            os.close(old)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR: keep ``fd`` (None: NOFD), even while the ring runs."""
        old = self._vring(index).notifiers.replace_err_fd(fd)
        if old is not None:
            os.close(old)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE: only with protocol features, once features are set."""
        if not self.features & VirtioFeature.PROTOCOL_FEATURES and self.features_set:
            raise RemoteProtocolError("SET_VRING_ENABLE without PROTOCOL_FEATURES negotiated")
        vring = self._vring(index)
        self._transition(vring, RingEvent.ENABLE if enable else RingEvent.DISABLE)

    def vring_kick(self, index: int) -> None:
        """In-band VRING_KICK: like a kick on the kick fd, the first one starts the ring."""
        vring = self._vring(index)
        if not vring.started:
            self._transition(vring, RingEvent.KICK)
        if vring.running:
            self.device.kick(vring.index)

    # ------------------------------------------------------------------ device

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: the device announces ``mac``."""
        self.device.send_rarp(mac)

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: 68..65535."""
        if not 68 <= mtu <= 65535:
            raise RemoteProtocolError(f"NET_SET_MTU: MTU {mtu} out of range 68..65535")
        self.device.set_mtu(mtu)

    def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: exactly ``size`` bytes of config space."""
        data = self.device.get_config(offset, size)
        if len(data) != size:
            raise RemoteProtocolError(
                f"GET_CONFIG: device returned {len(data)} bytes, {size} asked"
            )
        return data

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG: the device decides what is writable."""
        self.device.set_config(offset, data)

    def set_status(self, status: int) -> None:
        """SET_STATUS: a move the status table lists; 0 resets the device."""
        new = next_status(self.status, status, features_set=self.features_set)
        if new == 0:
            self._reset()
        self.status = new

    def get_status(self) -> int:
        """GET_STATUS."""
        return int(self.status)

    # ------------------------------------------------------------------ inflight

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightRegion:
        """GET_INFLIGHT_FD: a fresh shared region (its fd goes with the reply)."""
        if not 0 < num_queues <= len(self.vrings) or not 0 < queue_size <= MAX_QUEUE_SIZE:
            raise RemoteProtocolError(
                f"GET_INFLIGHT_FD: {num_queues} queues of {queue_size} out of range"
            )
        region = InflightRegion.allocate(num_queues, queue_size, packed=self.packed)
        self._replace_inflight(region)
        return region

    def set_inflight_fd(self, fd: int, area: codec.Inflight) -> None:
        """SET_INFLIGHT_FD: map the region a previous back-end filled."""
        if not 0 < area.num_queues <= len(self.vrings):
            raise RemoteProtocolError(f"SET_INFLIGHT_FD: {area.num_queues} queues out of range")
        region = InflightRegion.from_fd(
            fd, area.mmap_size, area.mmap_offset, area.num_queues, area.queue_size,
            packed=self.packed,
        )  # fmt: skip
        self._replace_inflight(region)

    def _replace_inflight(self, region: InflightRegion) -> None:
        old, self.inflight = self.inflight, region
        if old is not None:
            old.close()

    # ------------------------------------------------------------------ IOMMU, back-end channel

    def iotlb_msg(self, entry: codec.IotlbMsg) -> None:
        """IOTLB_MSG UPDATE (waiting rings start) or INVALIDATE (running rings restart)."""
        if not self.iommu:
            raise RemoteProtocolError("IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM negotiated")
        if entry.type is IotlbType.UPDATE:
            try:
                self.iotlb.update(entry.iova, entry.size, entry.uaddr, entry.perm)
            except GuestMemoryError as exc:
                raise RemoteProtocolError(f"IOTLB_MSG UPDATE: {exc}") from exc
            self.backend.translations_added(self.iotlb.covers)
            # Rings that waited for their areas start now.
            for vring in self.vrings:
                self._sync(vring)
            self.device.iotlb_updated()
            return

        def invalidate() -> None:
            try:
                self.iotlb.invalidate(entry.iova, entry.size)
            except GuestMemoryError as exc:
                raise RemoteProtocolError(f"IOTLB_MSG INVALIDATE: {exc}") from exc

        if not self.device.iotlb_invalidate(entry.iova, entry.size, invalidate):
            self._restart_running(invalidate)

    def set_backend_req_fd(self, fd: int) -> None:
        """SET_BACKEND_REQ_FD: the link takes the socket."""
        self.backend.attach(fd)

    def request_translation(self, iova: int, write: bool) -> None:
        """Ask the front-end for the translation of ``iova`` (thread-safe, one MISS at a time)."""
        self.backend.request_translation(iova, write, self.iotlb.covers)

    def send_backend_request(
        self, request: BackendRequest, payload: codec.Payload, *, need_reply: bool = False
    ) -> int:
        """Send a back-end request (e.g. CONFIG_CHANGE_MSG) on the back-end channel.

        With ``need_reply`` wait for the front-end's u64 and return it (0:
        success); otherwise return 0 once sent.  Raises
        :class:`~pyvdpa.errors.ProtocolError` without a channel,
        :class:`~pyvdpa.errors.TransportError` if it broke.
        """
        return self.backend.send(BackendMessage(request, payload, need_reply))

    def config_changed(self) -> None:
        """The device's config listener: CONFIG_CHANGE_MSG when the front-end can take it.

        Sent when CONFIG and BACKEND_REQ are negotiated and the back-end
        channel exists; with REPLY_ACK the front-end's answer is waited for
        and a refusal (or a bad answer) is logged.  Raises
        :class:`~pyvdpa.errors.TransportError` if the channel broke.
        """
        wanted = ProtocolFeature.CONFIG | ProtocolFeature.BACKEND_REQ
        if self.closed or self.protocol_features & wanted != wanted:
            log.info("%s: config changed; the front-end did not negotiate CONFIG", self.name)
            return
        need_reply = bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        message = BackendMessage(BackendRequest.CONFIG_CHANGE_MSG, codec.NoPayload(), need_reply)
        try:
            result = self.backend.send(message)
        except RemoteProtocolError as exc:
            log.warning("%s: CONFIG_CHANGE_MSG: %s", self.name, exc)
            return
        except ProtocolError as exc:
            log.info("%s: config changed; CONFIG_CHANGE_MSG not sent: %s", self.name, exc)
            return
        if result:
            log.warning("%s: the front-end answered CONFIG_CHANGE_MSG with %d", self.name, result)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """The connection ended: stop rings, unmap memory, close every fd.

        The I/O layer shuts the back-end channel down first, so that device
        threads waiting for the front-end's reply give up before they are stopped.
        """
        if self.closed:
            return
        self.closed = True
        if self.device.config_listener == self.config_changed:
            self.device.config_listener = None
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
