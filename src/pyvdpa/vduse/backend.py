"""The VDUSE control plane: a pyvdpa device on the Linux kernel's vDPA bus.

Theory of operation (Linux ``Documentation/userspace-api/vduse.rst``): the
process creates the device on ``/dev/vduse/control`` with its features,
queue count and config space, sets up every queue (VDUSE_VQ_SETUP) and then
serves the requests the kernel writes to ``/dev/vduse/NAME``, each answered
within the kernel's ``msg_timeout``:

* SET_STATUS — DRIVER_OK starts the device: the features the driver
  accepted (VDUSE_DEV_GET_FEATURES), every ready queue's ring
  (VDUSE_VQ_GET_INFO) and the driver's memory, mapped from the fds
  VDUSE_IOTLB_GET_FD hands out (the bounce buffer and ring pages of
  virtio_vdpa, or what a vhost-vdpa user mapped).  Each ring is described
  and checked once (:func:`~pyvdpa.device.describe_ring`) and handed to the
  device, as the vhost-user back-end hands its rings.  Status 0 is a reset:
  every queue stops, every mapping and ring position is forgotten.
* GET_VQ_STATE — where a queue stands; a running queue is stopped for it
  (the kernel asks when the driver takes the ring back).
* UPDATE_IOTLB — mappings in a range changed: running queues stop, the
  range is unmapped and mapped again from the kernel, queues restart where
  they were.

A restarted process takes over a device the kernel kept (VDUSE_CREATE_DEV
says EEXIST, the device node opens): the features and rings the driver set
up are read back and every ready ring resumes at its used index.

Kicks arrive on eventfds given to VDUSE_VQ_SETUP_KICKFD when a queue
starts (a reset drops them in the kernel), which the device's data path
waits on.  Interrupts go the other way through one eventfd per
queue that the data path signals; this loop turns each into
VDUSE_VQ_INJECT_IRQ.  A broken ring is logged and that queue stops; VDUSE
has no error channel to the driver.

Config changes the device makes (a sim-net link going down) reach the
back-end through the device's config listener: VDUSE_DEV_SET_CONFIG writes the
whole new config space into the kernel's copy, which the driver reads, and
after DRIVER_OK VDUSE_DEV_INJECT_CONFIG_IRQ tells the driver (virtio_vdpa's
config callback, vhost_vdpa's config eventfd).  Before DRIVER_OK the driver
reads the new bytes when it sets the device up; the kernel refuses the
interrupt then anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading

from pyvdpa.device import (
    Device,
    QueueNotRunningError,
    RingNotifiers,
    RingPosition,
    RingSpec,
    describe_ring,
)
from pyvdpa.errors import GuestMemoryError, IotlbMissError, PyvdpaError, RingError
from pyvdpa.memory import IotlbPerm, IovaSpace
from pyvdpa.vduse.kernel import (
    VduseBusyError,
    VduseControl,
    VduseDevice,
    VduseKernelError,
    VduseNameInUseError,
)
from pyvdpa.vduse.uapi import (
    DeviceConfig,
    GetVqStateRequest,
    PackedState,
    Request,
    Response,
    ResponseResult,
    SetStatusRequest,
    SplitState,
    UpdateIotlbRequest,
    VduseConfigError,
    VduseProtocolError,
    VqInfo,
    VqState,
)
from pyvdpa.virtio.constants import BlkFeature, DeviceId, DeviceStatus, VirtioFeature

__all__ = ["DEFAULT_QUEUE_SIZE", "VDUSE_VENDOR_ID", "VduseBackend", "vduse_features"]

log = logging.getLogger(__name__)

#: Largest ring the kernel's driver may set up per queue.
DEFAULT_QUEUE_SIZE = 256
#: The vendor id VDUSE devices report (none in particular).
VDUSE_VENDOR_ID = 0
_IOVA_LAST = (1 << 64) - 1
# Feature bits of vhost-user that are no virtio device features, and the
# packed layout: a restarted process resumes a split ring at its used index
# (as libvduse and DPDK's VDUSE devices, which offer split rings only).
_NOT_OFFERED = VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.LOG_ALL | VirtioFeature.RING_PACKED


def vduse_features(device: Device) -> int:
    """The feature bits a device is offered with on VDUSE.

    VERSION_1 and ACCESS_PLATFORM (the kernel requires both), without the
    vhost-user-only bits, without blk's CONFIG_WCE, which VDUSE refuses, and
    without the packed layout (split rings only, so that a restarted process
    can resume where the used ring stands).
    """
    features = (int(device.features) & ~int(_NOT_OFFERED)) | int(
        VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM
    )
    if device.device_id is DeviceId.BLOCK:
        features &= ~int(BlkFeature.CONFIG_WCE)
    return features


class VduseBackend:
    """Serve ``device`` as the VDUSE device ``name`` until :meth:`close`.

    :meth:`start` creates the device and starts serving its requests on a
    thread; it is then ready to be added to the vDPA bus
    (:mod:`pyvdpa.vduse.netlink`).  Raises
    :class:`~pyvdpa.vduse.uapi.VduseConfigError` for a device the kernel
    would refuse and :class:`~pyvdpa.vduse.kernel.VduseKernelError` for what
    the kernel says.
    """

    def __init__(self, device: Device, name: str, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if device.device_id not in (DeviceId.NET, DeviceId.BLOCK):
            raise VduseConfigError(f"{name}: VDUSE serves net and blk devices only")
        if device.device_id is DeviceId.NET and device.num_queues != 2:
            raise VduseConfigError(
                f"{name}: a VDUSE net device has one queue pair (the kernel refuses CTRL_VQ)"
            )
        self.device = device
        self.name = name
        self.queue_size = min(queue_size, device.max_queue_size)
        self.features = vduse_features(device)
        self.space = IovaSpace(resolver=self._resolve)
        self.status = 0
        self.negotiated = 0
        self._notifiers = [
            RingNotifiers(i, f"vduse:{name}", translation=self._translate)
            for i in range(device.num_queues)
        ]
        self._specs: dict[int, RingSpec] = {}
        self._positions: dict[int, RingPosition] = {}
        self._calls: dict[int, int] = {}
        self._kernel: VduseDevice | None = None
        self._control: VduseControl | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._lock = threading.Lock()
        self.requests = 0
        #: Whether :meth:`start` took over a device a previous process left.
        self.reconnected = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the device, set up its queues and serve it on a thread."""
        config = DeviceConfig(
            self.name, VDUSE_VENDOR_ID, int(self.device.device_id), self.features,
            self.device.num_queues, os.sysconf("SC_PAGE_SIZE"),
            self.device.get_config(0, self.device.config_size),
        )  # fmt: skip
        control = VduseControl()
        try:
            control.create_device(config)
            self.reconnected = False
        except VduseNameInUseError:
            # A previous process served it and the kernel kept it: take it over.
            self.reconnected = True
        except BaseException:
            control.close()
            raise
        self._control = control
        try:
            try:
                kernel = VduseDevice(self.name, vq_num=self.device.num_queues)
            except VduseBusyError as exc:
                raise VduseBusyError(
                    f"VDUSE device {self.name!r} is served by another process",
                    errno_value=exc.errno,
                ) from None
            self._kernel = kernel
            for index, notifiers in enumerate(self._notifiers):
                if not self.reconnected:
                    kernel.setup_vq(index, self.queue_size)
                kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                notifiers.replace_kick_fd(kick)
                notifiers.replace_call_fd(call)
                self._calls[call] = index
        except BaseException:
            self.close()
            raise
        if self.reconnected:
            with self._lock:
                self._resume()
            # The kernel kept the previous process's config space; this
            # device's may differ (a disk file grown while no one served it).
            self.config_changed()
        self.device.config_listener = self.config_changed
        self._thread = threading.Thread(target=self._serve, name=f"vduse-{self.name}", daemon=True)
        self._thread.start()
        log.info(
            "%s: VDUSE device %s, %d queues", self.name,
            "taken over" if self.reconnected else "created", self.device.num_queues,
        )  # fmt: skip

    def _resume(self) -> None:
        """Take over a device a previous process served: resume its running rings.

        The kernel keeps the device, its negotiated features and its rings;
        a ring the driver set up is resumed at its used index, so requests
        the previous process took but never completed are served again (the
        device completes requests in order, so none completed is served twice
        out of order, and rewriting a block is harmless).
        """
        kernel = self._kernel
        assert kernel is not None
        infos = [kernel.vq_info(i, packed=False) for i in range(self.device.num_queues)]
        if not any(info.ready for info in infos):
            return
        self.status = int(
            DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
            | DeviceStatus.DRIVER_OK
        )  # fmt: skip
        self.negotiated = kernel.get_features()
        self.device.set_features(self.negotiated)
        self._map(0, _IOVA_LAST)
        for index, info in enumerate(infos):
            if info.ready and info.num:
                try:
                    used = self.space.view(info.device_addr + 2, 2, write=False)
                except GuestMemoryError as exc:
                    log.error("%s: queue %d cannot resume: %s", self.name, index, exc)
                    continue
                self._positions[index] = RingPosition.split(int.from_bytes(used, "little"))
                used.release()
                self._start(index)
                # The previous process may have died between a completion and
                # its interrupt: the driver would wait for it forever.  A
                # spurious one costs the driver a look at the used ring.
                self._notifiers[index].signal_call()

    def close(self) -> None:
        """Stop serving, stop every queue, close and destroy the VDUSE device.

        The device must be off the vDPA bus by then (``vdpa dev del``), or
        the kernel keeps it (the destroy is refused and logged).
        """
        if self.device.config_listener == self.config_changed:
            self.device.config_listener = None
        os.write(self._stop_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._lock:
            self._reset()
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None
        for notifiers in self._notifiers:
            notifiers.close_fds()
        self._calls.clear()
        if self._control is not None:
            try:
                self._control.destroy_device(self.name)
            except VduseKernelError as exc:
                log.error("%s: %s", self.name, exc)
            self._control.close()
            self._control = None
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def config_changed(self) -> None:
        """The device's config listener: VDUSE_DEV_SET_CONFIG, then the config interrupt.

        The interrupt only after DRIVER_OK (before, the driver reads the new
        config space when it sets the device up).  Raises
        :class:`~pyvdpa.vduse.kernel.VduseKernelError` when the kernel refuses.
        """
        with self._lock:
            kernel = self._kernel
            if kernel is None:
                return
            kernel.set_config(0, self.device.get_config(0, self.device.config_size))
            if self.status & DeviceStatus.DRIVER_OK:
                kernel.inject_config_irq()
                log.info("%s: config changed, config interrupt injected", self.name)
            else:
                log.info("%s: config changed (no driver yet)", self.name)

    # ------------------------------------------------------------------ request loop

    def _serve(self) -> None:
        kernel = self._kernel
        assert kernel is not None
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        poller.register(kernel.fileno(), select.POLLIN)
        for fd in self._calls:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, events in poller.poll():
                if fd == self._stop_r:
                    return
                if fd == kernel.fileno():
                    if events & (select.POLLERR | select.POLLHUP):
                        log.error("%s: the kernel broke the device (POLLERR)", self.name)
                        return
                    self._drain(kernel)
                else:
                    self._interrupt(kernel, fd)

    def _drain(self, kernel: VduseDevice) -> None:
        while True:
            try:
                request = kernel.read_request()
            except VduseProtocolError as exc:
                log.error("%s: bad request from the kernel: %s", self.name, exc)
                if exc.request_id is not None:
                    self._answer(kernel, Response(exc.request_id, ResponseResult.FAILED))
                continue
            except VduseKernelError as exc:
                log.error("%s: %s", self.name, exc)
                return
            if request is None:
                return
            self.requests += 1
            with self._lock:
                response = self.handle(request)
            self._answer(kernel, response)

    def _answer(self, kernel: VduseDevice, response: Response) -> None:
        try:
            kernel.write_response(response)
        except VduseKernelError as exc:
            log.error("%s: %s", self.name, exc)

    def _interrupt(self, kernel: VduseDevice, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        if self.status & DeviceStatus.DRIVER_OK:
            try:
                kernel.inject_vq_irq(self._calls[fd])
            except VduseKernelError as exc:
                log.warning("%s: %s", self.name, exc)

    # ------------------------------------------------------------------ requests

    def handle(self, request: Request) -> Response:
        """Apply one request from the kernel and return its answer."""
        try:
            if isinstance(request, SetStatusRequest):
                self._set_status(int(request.status))
            elif isinstance(request, GetVqStateRequest):
                state = self._vq_state(request.index)
                return Response(request.request_id, ResponseResult.OK, state)
            elif isinstance(request, UpdateIotlbRequest):
                self._update_iotlb(request.start, request.last)
        except (PyvdpaError, ValueError) as exc:
            log.error("%s: %s refused: %s", self.name, type(request).__name__, exc)
            return Response(request.request_id, ResponseResult.FAILED)
        return Response(request.request_id)

    def _set_status(self, status: int) -> None:
        if status == 0:
            self._reset()
            return
        was = self.status
        self.status = status
        if status & DeviceStatus.DRIVER_OK and not was & DeviceStatus.DRIVER_OK:
            kernel = self._kernel
            assert kernel is not None
            self.negotiated = kernel.get_features()
            self.device.set_features(self.negotiated)
            self._map(0, _IOVA_LAST)
            log.info(
                "%s: DRIVER_OK, features %#x, %d IOVA regions mapped",
                self.name, self.negotiated, len(self.space.mappings),
            )  # fmt: skip
            for index in range(self.device.num_queues):
                self._start(index)

    def _reset(self) -> None:
        for index in list(self._specs):
            self._stop(index)
        self._positions.clear()
        self.space.clear()
        for notifiers in self._notifiers:
            notifiers.broken = False
        if self.status:
            with contextlib.suppress(PyvdpaError):
                self.device.reset()
        self.status = 0
        self.negotiated = 0

    @property
    def packed(self) -> bool:
        """Whether the driver accepted the packed layout."""
        return bool(self.negotiated & VirtioFeature.RING_PACKED)

    def _position(self, info: VqInfo) -> RingPosition:
        state = info.state
        if isinstance(state, PackedState):
            return RingPosition(
                state.last_avail_idx, bool(state.last_avail_counter),
                state.last_used_idx, bool(state.last_used_counter),
            )  # fmt: skip
        return RingPosition.split(state.avail_index)

    def _start(self, index: int) -> None:
        kernel = self._kernel
        assert kernel is not None
        info = kernel.vq_info(index, packed=self.packed)
        if not info.ready or info.num == 0:
            return
        position = self._positions.get(index, self._position(info))
        notifiers = self._notifiers[index]
        # A reset drops the kernel's kick eventfd: give it anew (kicks that
        # came meanwhile are signalled on it at once).
        kernel.set_kickfd(index, notifiers.kick_fd)
        try:
            spec = describe_ring(
                index, info.num, self.negotiated,
                (info.desc_addr, info.driver_addr, info.device_addr),
                position, self.space, notifiers, max_size=self.queue_size,
            )  # fmt: skip
        except (RingError, GuestMemoryError, IotlbMissError) as exc:
            notifiers.fail(RingError(f"cannot start: {exc}"))
            return
        try:
            self.device.start_queue(spec)
        except RingError as exc:
            spec.areas.release()
            notifiers.fail(exc)
            return
        self._specs[index] = spec
        log.info(
            "%s: queue %d started: %d entries at %s, from %s",
            self.name, index, info.num, [hex(a) for a in spec.addrs], position,
        )  # fmt: skip

    def _stop(self, index: int) -> None:
        spec = self._specs.pop(index, None)
        if spec is None:
            return
        try:
            self._positions[index] = self.device.stop_queue(index)
        except QueueNotRunningError:
            self._positions[index] = spec.position
        spec.areas.release()

    def _vq_state(self, index: int) -> VqState:
        self._stop(index)
        position = self._positions.get(index)
        if position is None:
            kernel = self._kernel
            assert kernel is not None
            position = self._position(kernel.vq_info(index, packed=self.packed))
        if self.packed:
            return VqState(
                index,
                PackedState(
                    int(position.avail_wrap), position.avail_idx,
                    int(position.used_wrap), position.used_idx,
                ),
            )  # fmt: skip
        return VqState(index, SplitState(position.avail_idx))

    def _update_iotlb(self, start: int, last: int) -> None:
        running = list(self._specs)
        for index in running:
            self._stop(index)
        self.space.unmap(start, last)
        if self.status & DeviceStatus.DRIVER_OK:
            self._map(start, last)
            for index in running:
                self._start(index)
            self.device.iotlb_updated()

    def _resolve(self, iova: int) -> bool:
        """Map the IOTLB region holding ``iova``, if the kernel has one (thread-safe).

        Called by the address space for a view no mapping holds, and by the
        data path for a stalled queue: virtio_vdpa's bounce buffer enters the
        kernel's IOTLB when the driver maps its first buffer, and no request
        says so.
        """
        kernel = self._kernel
        if kernel is None or not self.status & DeviceStatus.DRIVER_OK:
            return False
        before = self.space.generation
        self._map(iova, iova)
        return self.space.generation != before

    def _translate(self, iova: int, write: bool) -> None:
        """A compiled queue stalled at ``iova``: map it, then let the queue retry."""
        if self._resolve(iova):
            self.device.iotlb_updated()
        else:
            log.warning("%s: no IOTLB region holds IOVA %#x", self.name, iova)

    def _map(self, start: int, last: int) -> None:
        """Map every IOTLB region the kernel has in ``[start, last]``."""
        kernel = self._kernel
        assert kernel is not None
        while start <= last:
            try:
                fd, entry = kernel.iotlb_get_fd(start, last)
            except VduseKernelError:
                return
            try:
                if not self.space.covers(entry.start, entry.size):
                    self.space.map(
                        entry.start, entry.size, fd, entry.offset, IotlbPerm(int(entry.perm))
                    )
            except GuestMemoryError as exc:
                log.warning("%s: %s", self.name, exc)
            finally:
                os.close(fd)
            if entry.last >= last:
                return
            start = entry.last + 1
