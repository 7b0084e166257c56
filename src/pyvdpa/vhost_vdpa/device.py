"""The vhost-vdpa character device: one method per ioctl, IOTLB messages written to it.

Theory of operation (Linux 6.12 ``drivers/vhost/vdpa.c``; layouts in
:mod:`pyvdpa.vhost_vdpa.uapi`): :class:`VhostVdpaDevice` is the thin I/O
layer a vhost-vdpa front-end stands on.  A front-end typically

1. opens ``/dev/vhost-vdpa-N`` (:meth:`VhostVdpaDevice.open`), calls
   :meth:`~VhostVdpaDevice.set_owner` and acknowledges back-end features
   (IOTLB_MSG_V2, and IOTLB_BATCH when offered);
2. resets the device (status 0), writes ACKNOWLEDGE and DRIVER, sets the
   features it accepts and adds FEATURES_OK with
   :meth:`~VhostVdpaDevice.add_status`, which reads the status back and
   raises :class:`~pyvdpa.vhost_vdpa.uapi.FeaturesRefusedError` if the device
   cleared it;
3. maps guest memory and rings with :meth:`~VhostVdpaDevice.iotlb_update`
   (inside :meth:`~VhostVdpaDevice.iotlb_batch`), within the range
   :meth:`~VhostVdpaDevice.get_iova_range` reports;
4. per ring: ``set_vring_num``, ``set_vring_base``, ``set_vring_addr``,
   ``set_vring_kick``, ``set_vring_call`` and ``set_vring_enable``;
5. adds DRIVER_OK.

Every ioctl argument is a mutable :class:`bytearray` of the argument's
exact size: :func:`fcntl.ioctl` copies an immutable ``bytes`` argument only
up to 1024 bytes, which a large config space read would overrun.  errno is
mapped here, once, into the :class:`DeviceError` family, each with a
one-line message naming the path and the request.  The kernel answers an
IOTLB write it cannot apply with EFAULT whatever the reason (outside the
IOVA range, overlapping an existing mapping, memory not mapped in this
process, no owner yet, an address space or batch it does not know): the
message of :class:`IotlbUpdateError` lists them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

from pyvdpa.errors import ConfigError
from pyvdpa.vhost_vdpa.uapi import (
    INT,
    U8,
    U16,
    U32,
    U64,
    VHOST_FILE_UNBIND,
    BackendFeature,
    InvalidRequestError,
    Ioctl,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    IovaRange,
    MsgV2,
    VdpaConfig,
    VhostVdpaError,
    VringAddr,
    VringFile,
    VringState,
    check_status,
    decode_scalar,
    encode_scalar,
)
from pyvdpa.virtio.constants import DeviceStatus

__all__ = [
    "DeviceBusyError",
    "DeviceError",
    "DeviceNotFoundError",
    "DevicePermissionError",
    "IoctlError",
    "IotlbUpdateError",
    "NotOwnerError",
    "NotVhostVdpaError",
    "UnsupportedIoctlError",
    "VhostVdpaDevice",
]

#: The kernel's internal "not supported" errno, which a few drivers let through.
_ENOTSUPP = 524


class DeviceError(VhostVdpaError):
    """An operation on a vhost-vdpa device failed; ``errno`` is the OS's, if any."""

    def __init__(self, message: str, *, path: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class DeviceNotFoundError(DeviceError, ConfigError):
    """No device at the path (or the driver behind the node is gone)."""


class NotVhostVdpaError(DeviceError, ConfigError):
    """The path is not a vhost-vdpa device: not a character device, or no answer to its ioctls."""


class DevicePermissionError(DeviceError):
    """This process may not open the device read-write."""


class DeviceBusyError(DeviceError):
    """Another user holds the device open: vhost-vdpa allows one at a time."""


class IoctlError(DeviceError):
    """The kernel refused an ioctl; ``request`` names it."""

    def __init__(
        self, message: str, *, path: str, request: Ioctl, errno: int | None = None
    ) -> None:
        super().__init__(message, path=path, errno=errno)
        self.request = request


class UnsupportedIoctlError(IoctlError):
    """The kernel or the device does not implement the request (ENOTTY, EOPNOTSUPP)."""


class NotOwnerError(IoctlError):
    """The request needs the device's owner: VHOST_SET_OWNER first (EPERM)."""


class IotlbUpdateError(DeviceError):
    """The kernel refused an IOTLB message; ``msg`` is the message refused."""

    def __init__(self, message: str, *, path: str, msg: MsgV2, errno: int | None = None) -> None:
        super().__init__(message, path=path, errno=errno)
        self.msg = msg


# The names the kernel uses where Python's table picks an alias (ENOTSUP) or has none.
_ERRNO_NAMES = {errno.EOPNOTSUPP: "EOPNOTSUPP", _ENOTSUPP: "ENOTSUPP"}


def _errno_name(err: int | None) -> str:
    if err is None:
        return "no errno"
    return _ERRNO_NAMES.get(err) or errno.errorcode.get(err, f"errno {err}")


def _reason(err: int | None) -> str:
    if err is None:
        return "unknown error"
    return f"{os.strerror(err)}, {_errno_name(err)}"


def _open_error(path: str, exc: OSError) -> DeviceError:
    """Map an error from stat or open of ``path``."""
    err = exc.errno
    if err in (errno.ENOENT, errno.ENOTDIR, errno.ENXIO, errno.ENODEV):
        return DeviceNotFoundError(
            f"{path}: no such device (is the vDPA device bound to vhost_vdpa?)",
            path=path,
            errno=err,
        )
    if err in (errno.EACCES, errno.EPERM):
        return DevicePermissionError(
            f"{path}: permission denied (a vhost-vdpa device must be opened read-write)",
            path=path,
            errno=err,
        )
    if err == errno.EBUSY:
        return DeviceBusyError(
            f"{path} is busy: another process holds it open (one user at a time)",
            path=path,
            errno=err,
        )
    return DeviceError(f"cannot open {path}: {_reason(err)}", path=path, errno=err)


_IOCTL_HINTS = {
    errno.ENOBUFS: "no virtqueue with that index",
    errno.EBUSY: "busy: the device already has an owner, or its features are negotiated",
    errno.E2BIG: "beyond the device's config space",
}


def _ioctl_error(path: str, request: Ioctl, exc: OSError) -> IoctlError:
    """Map an error from ioctl ``request``."""
    err = exc.errno
    if err in (errno.ENOTTY, errno.EOPNOTSUPP, _ENOTSUPP):
        return UnsupportedIoctlError(
            f"{request.name} on {path}: not supported by this device or kernel "
            f"({_errno_name(err)})",
            path=path,
            request=request,
            errno=err,
        )
    if err == errno.EPERM:
        return NotOwnerError(
            f"{request.name} on {path}: this process is not the device's owner "
            "(VHOST_SET_OWNER first)",
            path=path,
            request=request,
            errno=err,
        )
    hint = _IOCTL_HINTS.get(err) if err is not None else None
    detail = f"{hint}: {_reason(err)}" if hint else _reason(err)
    return IoctlError(
        f"{request.name} on {path} failed: {detail}", path=path, request=request, errno=err
    )


_IOTLB_HINTS = {
    errno.EFAULT: (
        "outside the IOVA range, overlapping a mapping, memory not mapped in this "
        "process, no owner yet, or an address space or batch the device does not know"
    ),
    errno.EINVAL: "malformed message or empty range",
    errno.ENOMEM: "out of memory or over RLIMIT_MEMLOCK",
}


def _iotlb_error(path: str, msg: MsgV2, exc: OSError) -> DeviceError:
    """Map an error from writing ``msg``."""
    err = exc.errno
    hint = _IOTLB_HINTS.get(err) if err is not None else None
    if hint is None:
        return DeviceError(
            f"writing an IOTLB message to {path} failed: {_reason(err)}", path=path, errno=err
        )
    m = msg.iotlb
    span = "" if m.type.is_hint else f" [{m.iova:#x}, +{m.size:#x})"
    return IotlbUpdateError(
        f"IOTLB {m.type.name}{span} in address space {msg.asid} refused by {path}: "
        f"{hint} ({_errno_name(err)})",
        path=path,
        msg=msg,
        errno=err,
    )


class VhostVdpaDevice:
    """An open vhost-vdpa device: one method per ioctl, IOTLB messages, close.

    Use :meth:`open`; the constructor takes over an fd opened elsewhere (by
    a management process, say) without checking what it is.
    """

    def __init__(self, fd: int, *, path: str | None = None) -> None:
        self._fd: int | None = fd
        #: The device node, for messages.
        self.path = path if path is not None else f"fd {fd}"
        #: The back-end features acknowledged with :meth:`set_backend_features`.
        self.backend_features = BackendFeature(0)
        #: The virtio features written with :meth:`set_features`, if any.
        self.features: int | None = None
        self._batch_asid: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> VhostVdpaDevice:
        """Open the device node at ``path`` read-write and check it is a vhost-vdpa device.

        Raises :class:`DeviceNotFoundError`, :class:`NotVhostVdpaError`,
        :class:`DevicePermissionError`, :class:`DeviceBusyError` or
        :class:`DeviceError`.
        """
        name = os.fspath(path)
        try:
            mode = os.stat(name).st_mode
        except OSError as exc:
            raise _open_error(name, exc) from None
        if not stat.S_ISCHR(mode):
            raise NotVhostVdpaError(
                f"{name} is not a vhost-vdpa device: not a character device", path=name
            )
        try:
            fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(name, exc) from None
        device = cls(fd, path=name)
        try:
            device.get_device_id()
        except IoctlError as exc:
            device.close()
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                raise NotVhostVdpaError(
                    f"{name} is not a vhost-vdpa device: it does not answer "
                    f"{Ioctl.VHOST_VDPA_GET_DEVICE_ID.name}",
                    path=name,
                    errno=exc.errno,
                ) from None
            raise
        except BaseException:
            device.close()
            raise
        return device

    # ------------------------------------------------------------------ plumbing

    def fileno(self) -> int:
        """The device's fd (for ``mmap`` of doorbells, or handing it over)."""
        if self._fd is None:
            raise DeviceError(f"{self.path} is closed", path=self.path)
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None

    def close(self) -> None:
        """Close the fd (the kernel resets the device and drops its mappings); idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> VhostVdpaDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, request: Ioctl, arg: bytearray | None = None) -> None:
        fd = self.fileno()
        try:
            if arg is None:
                fcntl.ioctl(fd, request, 0)
            else:
                fcntl.ioctl(fd, request, arg, True)
        except OSError as exc:
            raise _ioctl_error(self.path, request, exc) from None

    def _get(self, request: Ioctl, layout: struct.Struct) -> int:
        buf = bytearray(layout.size)
        self._ioctl(request, buf)
        return decode_scalar(layout, buf, request.name)

    def _set(self, request: Ioctl, layout: struct.Struct, value: int, what: str) -> None:
        self._ioctl(request, bytearray(encode_scalar(layout, value, what)))

    def _state(self, request: Ioctl, state: VringState) -> VringState:
        buf = bytearray(state.encode())
        self._ioctl(request, buf)
        return state.reply(buf)

    def _file(self, request: Ioctl, index: int, fd: int | None) -> None:
        arg = VringFile(index, VHOST_FILE_UNBIND if fd is None else fd)
        self._ioctl(request, bytearray(arg.encode()))

    # ------------------------------------------------------------------ vhost ioctls

    def set_owner(self) -> None:
        """VHOST_SET_OWNER: make this process the device's owner (EBUSY if owned)."""
        self._ioctl(Ioctl.VHOST_SET_OWNER)

    def reset_owner(self) -> None:
        """VHOST_RESET_OWNER: give up ownership."""
        self._ioctl(Ioctl.VHOST_RESET_OWNER)

    def get_features(self) -> int:
        """VHOST_GET_FEATURES: the virtio features the device offers."""
        return self._get(Ioctl.VHOST_GET_FEATURES, U64)

    def set_features(self, features: int) -> None:
        """VHOST_SET_FEATURES: the virtio features the driver accepts (before FEATURES_OK)."""
        self._set(Ioctl.VHOST_SET_FEATURES, U64, features, "features")
        self.features = features

    def get_backend_features(self) -> BackendFeature:
        """VHOST_GET_BACKEND_FEATURES: the back-end features the kernel offers."""
        return BackendFeature(self._get(Ioctl.VHOST_GET_BACKEND_FEATURES, U64))

    def set_backend_features(self, features: BackendFeature) -> None:
        """VHOST_SET_BACKEND_FEATURES: acknowledge back-end features (EOPNOTSUPP if not offered)."""
        self._set(Ioctl.VHOST_SET_BACKEND_FEATURES, U64, features, "back-end features")
        self.backend_features = BackendFeature(features)

    def set_vring_num(self, index: int, num: int) -> None:
        """VHOST_SET_VRING_NUM: ring ``index`` has ``num`` descriptors."""
        self._ioctl(Ioctl.VHOST_SET_VRING_NUM, bytearray(VringState(index, num).encode()))

    def set_vring_base(self, index: int, base: int) -> None:
        """VHOST_SET_VRING_BASE: where ring ``index`` starts (see :class:`VringState`)."""
        self._ioctl(Ioctl.VHOST_SET_VRING_BASE, bytearray(VringState(index, base).encode()))

    def get_vring_base(self, index: int) -> int:
        """VHOST_GET_VRING_BASE: where ring ``index`` stands now."""
        return self._state(Ioctl.VHOST_GET_VRING_BASE, VringState(index, 0)).num

    def set_vring_addr(self, addr: VringAddr) -> None:
        """VHOST_SET_VRING_ADDR: the I/O virtual addresses of a ring's three areas."""
        self._ioctl(Ioctl.VHOST_SET_VRING_ADDR, bytearray(addr.encode()))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_KICK: the eventfd the driver signals for ring ``index``.

        ``None`` unbinds the one set.
        """
        self._file(Ioctl.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_CALL: the eventfd the device signals for ring ``index``.

        ``None`` unbinds the one set.
        """
        self._file(Ioctl.VHOST_SET_VRING_CALL, index, fd)

    def set_log_base(self, addr: int) -> None:
        """VHOST_SET_LOG_BASE: the dirty log's address (vhost_vdpa: unsupported)."""
        self._set(Ioctl.VHOST_SET_LOG_BASE, U64, addr, "log base")

    def set_log_fd(self, fd: int | None) -> None:
        """VHOST_SET_LOG_FD: the eventfd signalled on log writes (vhost_vdpa: unsupported)."""
        self._set(Ioctl.VHOST_SET_LOG_FD, INT, VHOST_FILE_UNBIND if fd is None else fd, "log fd")

    # ------------------------------------------------------------------ vhost-vdpa ioctls

    def get_device_id(self) -> int:
        """VHOST_VDPA_GET_DEVICE_ID: the virtio device id (1 net, 2 block, ...)."""
        return self._get(Ioctl.VHOST_VDPA_GET_DEVICE_ID, U32)

    def get_status(self) -> DeviceStatus:
        """VHOST_VDPA_GET_STATUS: the device status byte."""
        return DeviceStatus(self._get(Ioctl.VHOST_VDPA_GET_STATUS, U8))

    def set_status(self, status: DeviceStatus | int) -> None:
        """VHOST_VDPA_SET_STATUS: write the status byte; 0 resets the device.

        The kernel refuses (EINVAL) clearing bits other than by a reset.
        """
        self._set(Ioctl.VHOST_VDPA_SET_STATUS, U8, status, "status")

    def add_status(self, bits: DeviceStatus) -> DeviceStatus:
        """Add ``bits`` to the status, read it back and check the device kept them.

        Raises :class:`~pyvdpa.vhost_vdpa.uapi.FeaturesRefusedError` when the
        device clears FEATURES_OK, :class:`~pyvdpa.vhost_vdpa.uapi.StatusRefusedError`
        for any other difference.
        """
        wanted = self.get_status() | bits
        self.set_status(wanted)
        read_back = self.get_status()
        check_status(wanted, read_back, features=self.features)
        return read_back

    def get_config(self, offset: int, length: int) -> bytes:
        """VHOST_VDPA_GET_CONFIG: ``length`` bytes of config space at ``offset``."""
        request = VdpaConfig.request(offset, length)
        buf = bytearray(request.encode())
        self._ioctl(Ioctl.VHOST_VDPA_GET_CONFIG, buf)
        return request.reply(buf)

    def set_config(self, offset: int, data: bytes) -> None:
        """VHOST_VDPA_SET_CONFIG: write ``data`` into config space at ``offset``."""
        self._ioctl(Ioctl.VHOST_VDPA_SET_CONFIG, bytearray(VdpaConfig(offset, data).encode()))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """VHOST_VDPA_SET_VRING_ENABLE: mark ring ``index`` ready (or not)."""
        state = VringState(index, int(enable))
        self._ioctl(Ioctl.VHOST_VDPA_SET_VRING_ENABLE, bytearray(state.encode()))

    def get_vring_num(self) -> int:
        """VHOST_VDPA_GET_VRING_NUM: the largest ring size the device supports."""
        return self._get(Ioctl.VHOST_VDPA_GET_VRING_NUM, U16)

    def set_config_call(self, fd: int | None) -> None:
        """VHOST_VDPA_SET_CONFIG_CALL: the eventfd signalled on config changes (None: unbind)."""
        value = VHOST_FILE_UNBIND if fd is None else fd
        self._set(Ioctl.VHOST_VDPA_SET_CONFIG_CALL, INT, value, "config call fd")

    def get_iova_range(self) -> IovaRange:
        """VHOST_VDPA_GET_IOVA_RANGE: the I/O virtual addresses the device can map."""
        buf = bytearray(IovaRange.LAYOUT.size)
        self._ioctl(Ioctl.VHOST_VDPA_GET_IOVA_RANGE, buf)
        return IovaRange.decode(buf)

    def get_config_size(self) -> int:
        """VHOST_VDPA_GET_CONFIG_SIZE: the size of the device's config space."""
        return self._get(Ioctl.VHOST_VDPA_GET_CONFIG_SIZE, U32)

    def get_vqs_count(self) -> int:
        """VHOST_VDPA_GET_VQS_COUNT: how many virtqueues the device has."""
        return self._get(Ioctl.VHOST_VDPA_GET_VQS_COUNT, U32)

    def get_group_num(self) -> int:
        """VHOST_VDPA_GET_GROUP_NUM: how many virtqueue groups the device has."""
        return self._get(Ioctl.VHOST_VDPA_GET_GROUP_NUM, U32)

    def get_as_num(self) -> int:
        """VHOST_VDPA_GET_AS_NUM: how many address spaces the device has."""
        return self._get(Ioctl.VHOST_VDPA_GET_AS_NUM, U32)

    def get_vring_group(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_GROUP: the group of virtqueue ``index``."""
        return self._state(Ioctl.VHOST_VDPA_GET_VRING_GROUP, VringState(index, 0)).num

    def set_group_asid(self, group: int, asid: int) -> None:
        """VHOST_VDPA_SET_GROUP_ASID: put virtqueue group ``group`` in address space ``asid``."""
        state = VringState(group, asid)
        self._ioctl(Ioctl.VHOST_VDPA_SET_GROUP_ASID, bytearray(state.encode()))

    def suspend(self) -> None:
        """VHOST_VDPA_SUSPEND: stop processing rings, keeping their state (back-end SUSPEND)."""
        self._ioctl(Ioctl.VHOST_VDPA_SUSPEND)

    def resume(self) -> None:
        """VHOST_VDPA_RESUME: resume a suspended device (back-end RESUME)."""
        self._ioctl(Ioctl.VHOST_VDPA_RESUME)

    def get_vring_desc_group(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_DESC_GROUP: the group of ring ``index``'s areas (DESC_ASID)."""
        return self._state(Ioctl.VHOST_VDPA_GET_VRING_DESC_GROUP, VringState(index, 0)).num

    def get_vring_size(self, index: int) -> int:
        """VHOST_VDPA_GET_VRING_SIZE: the ring size of virtqueue ``index``."""
        return self._state(Ioctl.VHOST_VDPA_GET_VRING_SIZE, VringState(index, 0)).num

    # ------------------------------------------------------------------ IOTLB

    def _send(self, msg: MsgV2) -> None:
        msg.check_features(self.backend_features)
        if self._batch_asid is not None and msg.asid != self._batch_asid:
            raise InvalidRequestError(
                f"{MsgV2.NAME}: address space {msg.asid} inside a batch "
                f"for address space {self._batch_asid}"
            )
        data = msg.encode()
        fd = self.fileno()
        try:
            written = os.write(fd, data)
        except OSError as exc:
            raise _iotlb_error(self.path, msg, exc) from None
        if written != len(data):
            raise DeviceError(
                f"short IOTLB write to {self.path}: {written} of {len(data)} bytes",
                path=self.path,
            )

    def iotlb_update(
        self, iova: int, size: int, uaddr: int, perm: IotlbPerm, asid: int = 0
    ) -> None:
        """Map ``[iova, iova + size)`` to this process's ``uaddr`` with ``perm``.

        The kernel pins the pages; a non-zero ``asid`` needs IOTLB_ASID.
        """
        self._send(MsgV2(asid, IotlbMsg.update(iova, size, uaddr, perm)))

    def iotlb_invalidate(self, iova: int, size: int, asid: int = 0) -> None:
        """Unmap ``[iova, iova + size)`` (``0, 0``: everything) and unpin its pages."""
        self._send(MsgV2(asid, IotlbMsg.invalidate(iova, size)))

    @contextlib.contextmanager
    def iotlb_batch(self, asid: int = 0) -> Iterator[None]:
        """Group the IOTLB messages sent inside into one batch for address space ``asid``.

        With IOTLB_BATCH acknowledged the batch is framed by BATCH_BEGIN and
        BATCH_END (sent even if the body raises), and a device may apply the
        changes only at the end; without it the messages go one by one.
        Batches do not nest.
        """
        if self._batch_asid is not None:
            raise InvalidRequestError("IOTLB batches do not nest")
        hints = bool(self.backend_features & BackendFeature.IOTLB_BATCH)
        if hints:
            self._send(MsgV2(asid, IotlbMsg.hint(IotlbType.BATCH_BEGIN)))
        self._batch_asid = asid
        try:
            yield
        finally:
            self._batch_asid = None
            if hints:
                self._send(MsgV2(asid, IotlbMsg.hint(IotlbType.BATCH_END)))
