"""VDUSE system calls: the control device, a device's ioctls, messages and IOTLB maps.

Theory of operation (Linux ``Documentation/userspace-api/vduse.rst``):
:class:`VduseControl` opens ``/dev/vduse/control``, sets API version 0 and
creates or destroys devices; :class:`VduseDevice` opens ``/dev/vduse/NAME``
(one process at a time), sets up its virtqueues, kick eventfds, config
space and interrupts, reads the kernel's requests and writes the answers.
Every SET_STATUS is synchronous on the kernel side: a request left
unanswered for ``msg_timeout`` seconds (``/sys/class/vduse/NAME/``, 30 by
default) breaks the device for good, so serve requests before adding the
device to the vDPA bus and while removing it.

The driver's memory is reached through IOTLB file descriptors:
:meth:`VduseDevice.map_iotlb` asks for the region holding one IOVA
(``VDUSE_IOTLB_GET_FD`` with ``start = last = iova``), maps it shared and
closes the fd.  An UPDATE_IOTLB request, and a reset (status 0), make every
mapping of the range stale.

All layouts come from :mod:`pyvdpa.vduse.uapi`; this module only moves
bytes.  ioctl arguments are always mutable ``bytearray`` buffers
(``fcntl.ioctl`` copies an immutable argument into a 1024-byte buffer,
which would truncate a device config with a large config space).  errno is
mapped once, by :func:`_kernel_error`, into the :class:`VduseKernelError`
family, each with one line saying what to do.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from enum import Enum, auto
from types import TracebackType
from typing import Self

from pyvdpa.errors import GuestMemoryError, TransportError
from pyvdpa.vduse.uapi import (
    API_VERSION,
    EVENTFD_DEASSIGN,
    REQUEST_SIZE,
    ConfigData,
    DeviceConfig,
    IotlbAccess,
    IotlbEntry,
    IovaInfo,
    IovaUmem,
    Request,
    Response,
    VduseIoctl,
    VqConfig,
    VqEventfd,
    VqInfo,
    decode_request,
    decode_u64,
    encode_name,
    encode_u32,
    encode_u64,
    validate_device_config,
)
from pyvdpa.virtio.constants import VirtioFeature

__all__ = [
    "CONTROL_PATH",
    "DEVICE_DIR",
    "IotlbMapping",
    "VduseBrokenError",
    "VduseBusyError",
    "VduseControl",
    "VduseDevice",
    "VduseKernelError",
    "VduseNameInUseError",
    "VduseNoDeviceError",
    "VdusePermissionError",
    "VduseRefusedError",
    "VduseUnavailableError",
    "device_path",
    "map_iotlb_entry",
]

#: The control device.
CONTROL_PATH = "/dev/vduse/control"
#: Where the kernel puts one character device per VDUSE device.
DEVICE_DIR = "/dev/vduse"


def device_path(name: str, directory: str = DEVICE_DIR) -> str:
    """Return the character device of VDUSE device ``name``."""
    encode_name(name)
    return os.path.join(directory, name)


# --- errors ----------------------------------------------------------------


class VduseKernelError(TransportError):
    """A VDUSE system call failed; ``errno`` is the OS error number."""

    def __init__(self, message: str, *, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value


class VduseUnavailableError(VduseKernelError):
    """The kernel has no VDUSE (module not loaded, or too old)."""


class VdusePermissionError(VduseKernelError):
    """The caller lacks the privilege the operation needs."""


class VduseNameInUseError(VduseKernelError):
    """A VDUSE device of that name exists already."""


class VduseBusyError(VduseKernelError):
    """The device is open elsewhere, or still on the vDPA bus."""


class VduseNoDeviceError(VduseKernelError):
    """No VDUSE device of that name exists."""


class VduseBrokenError(VduseKernelError):
    """The kernel marked the device broken (a request went unanswered too long)."""


class VduseRefusedError(VduseKernelError):
    """The kernel refused an argument (``EINVAL`` and kin)."""


class _Op(Enum):
    """What was being done when a system call failed: picks the errno meaning."""

    OPEN_CONTROL = auto()
    SET_API_VERSION = auto()
    CREATE = auto()
    DESTROY = auto()
    OPEN_DEVICE = auto()
    IOCTL = auto()
    READ = auto()
    WRITE = auto()
    MAP = auto()


_LOAD = "load the vduse module (Linux 5.15+)"

#: ``(operation, errno) -> (error class, message)``; ``None`` matches any
#: operation.  Messages are formatted with ``what`` (the call) and ``name``.
_ERRNO: dict[tuple[_Op | None, int], tuple[type[VduseKernelError], str]] = {
    (_Op.OPEN_CONTROL, errno.ENOENT): (VduseUnavailableError, f"no {{what}}: {_LOAD}"),
    (_Op.OPEN_CONTROL, errno.ENODEV): (VduseUnavailableError, f"{{what}} has no driver: {_LOAD}"),
    (_Op.OPEN_CONTROL, errno.ENXIO): (VduseUnavailableError, f"{{what}} has no driver: {_LOAD}"),
    (_Op.SET_API_VERSION, errno.EINVAL): (
        VduseUnavailableError,
        f"the kernel does not speak VDUSE API version {API_VERSION}",
    ),
    (_Op.CREATE, errno.EEXIST): (
        VduseNameInUseError,
        "a VDUSE device named {name!r} exists already: destroy it or pick another name",
    ),
    (_Op.CREATE, errno.EPERM): (
        VdusePermissionError,
        "creating VDUSE device {name!r} needs CAP_NET_ADMIN for a net device (run as root)",
    ),
    (_Op.CREATE, errno.EINVAL): (
        VduseRefusedError,
        "the kernel refused the config of VDUSE device {name!r} (EINVAL)",
    ),
    (_Op.DESTROY, errno.EINVAL): (VduseNoDeviceError, "no VDUSE device named {name!r}"),
    (_Op.DESTROY, errno.EBUSY): (
        VduseBusyError,
        "VDUSE device {name!r} is open or on the vDPA bus: close it and delete it "
        "from the bus (vdpa dev del) first",
    ),
    (_Op.OPEN_DEVICE, errno.ENOENT): (
        VduseNoDeviceError,
        "no {what}: create VDUSE device {name!r} first",
    ),
    (_Op.OPEN_DEVICE, errno.ENODEV): (VduseNoDeviceError, "VDUSE device {name!r} is gone"),
    (_Op.OPEN_DEVICE, errno.EBUSY): (
        VduseBusyError,
        "{what} is already open by another process",
    ),
    (_Op.IOCTL, errno.EPERM): (
        VduseBrokenError,
        "VDUSE device {name!r} is broken (a request went unanswered past msg_timeout): "
        "delete it from the bus, destroy it and create it again",
    ),
    (_Op.IOCTL, errno.EINVAL): (VduseRefusedError, "{what} on {name!r} refused by the kernel"),
    (_Op.WRITE, errno.ENOENT): (
        VduseRefusedError,
        "{what} on {name!r}: the kernel has no pending request with that id",
    ),
    (_Op.WRITE, errno.EINVAL): (VduseRefusedError, "{what} on {name!r} refused by the kernel"),
    (None, errno.EACCES): (VdusePermissionError, "{what} needs root: permission denied"),
    (None, errno.EPERM): (VdusePermissionError, "{what} needs root: operation not permitted"),
}


def _kernel_error(op: _Op, exc: OSError, what: str, name: str = "") -> VduseKernelError:
    """Map one failed system call to its typed error (the only errno mapping here)."""
    code = exc.errno or 0
    found = _ERRNO.get((op, code)) or _ERRNO.get((None, code))
    if found is None:
        cls, line = VduseKernelError, f"{what} failed: {exc.strerror or exc}"
    else:
        cls, template = found
        line = template.format(what=what, name=name)
    label = errno.errorcode.get(code, str(code))
    return cls(f"{line} ({label})", errno_value=code)


def _open(path: str, flags: int, op: _Op, name: str = "") -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise _kernel_error(op, exc, path, name) from None


def _ioctl(fd: int, request: VduseIoctl, arg: bytearray | None, op: _Op, name: str) -> int:
    try:
        if arg is None:
            return fcntl.ioctl(fd, request, 0)
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as exc:
        raise _kernel_error(op, exc, f"VDUSE_{request.name}", name) from None


class _Fd:
    """An owned file descriptor, closed once."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def get(self, what: str) -> int:
        if self._fd is None:
            raise VduseKernelError(f"{what} is closed", errno_value=errno.EBADF)
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


# --- /dev/vduse/control ----------------------------------------------------


class VduseControl:
    """``/dev/vduse/control``: API version 0, device creation and destruction.

    Opening needs root; a missing control device raises
    :class:`VduseUnavailableError` naming the module to load.
    """

    def __init__(self, path: str = CONTROL_PATH) -> None:
        self.path = path
        self._fd = _Fd(_open(path, os.O_RDWR, _Op.OPEN_CONTROL))
        try:
            fd = self._fd.get(path)
            _ioctl(fd, VduseIoctl.SET_API_VERSION, encode_u64(API_VERSION), _Op.SET_API_VERSION, "")
        except BaseException:
            self._fd.close()
            raise

    def fileno(self) -> int:
        """The control device's fd."""
        return self._fd.get(self.path)

    def api_version(self) -> int:
        """VDUSE_GET_API_VERSION: the version in effect on this open file."""
        buf = bytearray(8)
        _ioctl(self.fileno(), VduseIoctl.GET_API_VERSION, buf, _Op.IOCTL, "")
        return decode_u64(bytes(buf))

    def create_device(self, config: DeviceConfig) -> None:
        """VDUSE_CREATE_DEV after :func:`~pyvdpa.vduse.uapi.validate_device_config`."""
        validate_device_config(config)
        buf = bytearray(config.encode())
        _ioctl(self.fileno(), VduseIoctl.CREATE_DEV, buf, _Op.CREATE, config.name)

    def destroy_device(self, name: str) -> None:
        """VDUSE_DESTROY_DEV: the device must be closed and off the vDPA bus."""
        buf = bytearray(encode_name(name))
        _ioctl(self.fileno(), VduseIoctl.DESTROY_DEV, buf, _Op.DESTROY, name)

    def close(self) -> None:
        """Close the control device (devices created stay)."""
        self._fd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- IOTLB maps ------------------------------------------------------------

_PROT = {
    IotlbAccess.RO: mmap.PROT_READ,
    IotlbAccess.WO: mmap.PROT_WRITE,
    IotlbAccess.RW: mmap.PROT_READ | mmap.PROT_WRITE,
}


@dataclass(slots=True)
class IotlbMapping:
    """One IOTLB region mapped into this process.

    ``entry`` is the region as the kernel described it; ``memory`` the
    shared mapping, which starts ``base`` bytes before ``entry.start`` (the
    file offset rounded down to a page).  Close it when an UPDATE_IOTLB
    covering it arrives or the device resets.
    """

    entry: IotlbEntry
    memory: mmap.mmap
    base: int

    def view(self, iova: int, length: int) -> memoryview:
        """Return ``length`` bytes at ``iova``; :class:`GuestMemoryError` outside the region."""
        entry = self.entry
        if length < 0 or iova < entry.start or iova + length - 1 > entry.last:
            raise GuestMemoryError(
                f"IOVA range {iova:#x}+{length:#x} is outside the IOTLB region "
                f"[{entry.start:#x}, {entry.last:#x}]"
            )
        offset = self.base + iova - entry.start
        return memoryview(self.memory)[offset : offset + length]

    def close(self) -> None:
        """Unmap the region (views still held make this raise :class:`BufferError`)."""
        self.memory.close()


def map_iotlb_entry(fd: int, entry: IotlbEntry, name: str = "") -> IotlbMapping:
    """Map ``entry``'s region of ``fd`` (from VDUSE_IOTLB_GET_FD) shared, with its access.

    The caller still owns ``fd``; the mapping stays valid after it is closed.
    """
    base = entry.offset % mmap.ALLOCATIONGRANULARITY
    length = base + entry.size
    try:
        memory = mmap.mmap(
            fd, length, flags=mmap.MAP_SHARED, prot=_PROT[entry.perm], offset=entry.offset - base
        )
    except OSError as exc:
        raise _kernel_error(_Op.MAP, exc, "mmap of an IOTLB region", name) from None
    except (OverflowError, ValueError) as exc:
        raise VduseRefusedError(
            f"IOTLB region [{entry.start:#x}, {entry.last:#x}] of {name!r} cannot be mapped: {exc}"
        ) from None
    return IotlbMapping(entry, memory, base)


# --- /dev/vduse/NAME -------------------------------------------------------


class VduseDevice:
    """``/dev/vduse/NAME``: one VDUSE device's ioctls and its message channel.

    ``vq_num`` is the queue count the device was created with; requests
    naming another queue are refused while decoding.  With ``nonblocking``
    (the default) :meth:`read_request` returns None when nothing is pending,
    so the fd can sit in a poll loop.  Only one process may have the device
    open (:class:`VduseBusyError`).
    """

    def __init__(
        self,
        name: str,
        *,
        vq_num: int,
        nonblocking: bool = True,
        directory: str = DEVICE_DIR,
    ) -> None:
        self.name = name
        self.vq_num = vq_num
        self.path = device_path(name, directory)
        flags = os.O_RDWR | (os.O_NONBLOCK if nonblocking else 0)
        self._fd = _Fd(_open(self.path, flags, _Op.OPEN_DEVICE, name))

    def fileno(self) -> int:
        """The device's fd: readable when a request is pending."""
        return self._fd.get(self.path)

    def _ioctl(self, request: VduseIoctl, arg: bytearray | None = None) -> int:
        return _ioctl(self.fileno(), request, arg, _Op.IOCTL, self.name)

    def get_features(self) -> int:
        """VDUSE_DEV_GET_FEATURES: the features the driver accepted (valid after FEATURES_OK)."""
        buf = bytearray(8)
        self._ioctl(VduseIoctl.DEV_GET_FEATURES, buf)
        return decode_u64(bytes(buf))

    def set_config(self, offset: int, data: bytes) -> None:
        """VDUSE_DEV_SET_CONFIG: write ``data`` into the config space at ``offset``."""
        self._ioctl(VduseIoctl.DEV_SET_CONFIG, bytearray(ConfigData(offset, data).encode()))

    def inject_config_irq(self) -> None:
        """VDUSE_DEV_INJECT_CONFIG_IRQ: tell the driver the config space changed."""
        self._ioctl(VduseIoctl.DEV_INJECT_CONFIG_IRQ)

    def setup_vq(self, index: int, max_size: int) -> None:
        """VDUSE_VQ_SETUP: every queue needs one before the device joins the vDPA bus."""
        self._ioctl(VduseIoctl.VQ_SETUP, bytearray(VqConfig(index, max_size).encode()))

    def vq_info(self, index: int, *, packed: bool | None = None) -> VqInfo:
        """VDUSE_VQ_GET_INFO: the ring the driver configured for queue ``index``.

        ``packed`` says which state the kernel filled in; None asks the
        negotiated features for RING_PACKED.
        """
        if packed is None:
            packed = bool(self.get_features() & VirtioFeature.RING_PACKED)
        buf = VqInfo.request(index)
        self._ioctl(VduseIoctl.VQ_GET_INFO, buf)
        return VqInfo.decode(bytes(buf), packed=packed)

    def set_kickfd(self, index: int, fd: int | None) -> None:
        """VDUSE_VQ_SETUP_KICKFD: the eventfd signalled on kicks, or None to remove it."""
        eventfd = VqEventfd(index, EVENTFD_DEASSIGN if fd is None else fd)
        self._ioctl(VduseIoctl.VQ_SETUP_KICKFD, bytearray(eventfd.encode()))

    def inject_vq_irq(self, index: int) -> None:
        """VDUSE_VQ_INJECT_IRQ: signal queue ``index``'s used buffers (after DRIVER_OK)."""
        self._ioctl(VduseIoctl.VQ_INJECT_IRQ, encode_u32(index))

    def iotlb_get_fd(self, start: int, last: int) -> tuple[int, IotlbEntry]:
        """VDUSE_IOTLB_GET_FD: the first region overlapping ``[start, last]`` and its fd.

        The caller owns the returned fd.
        """
        buf = IotlbEntry.request(start, last)
        fd = self._ioctl(VduseIoctl.IOTLB_GET_FD, buf)
        try:
            return fd, IotlbEntry.decode(bytes(buf))
        except BaseException:
            os.close(fd)
            raise

    def map_iotlb(self, iova: int) -> IotlbMapping:
        """Map the IOTLB region holding ``iova`` (the fd is closed once mapped)."""
        fd, entry = self.iotlb_get_fd(iova, iova)
        try:
            return map_iotlb_entry(fd, entry, self.name)
        finally:
            os.close(fd)

    def iotlb_info(self, start: int, last: int) -> IovaInfo:
        """VDUSE_IOTLB_GET_INFO: the first region overlapping ``[start, last]``."""
        buf = IovaInfo.request(start, last)
        self._ioctl(VduseIoctl.IOTLB_GET_INFO, buf)
        return IovaInfo.decode(bytes(buf))

    def register_umem(self, uaddr: int, iova: int, size: int) -> None:
        """VDUSE_IOTLB_REG_UMEM: use this process's memory as the bounce buffer."""
        self._ioctl(VduseIoctl.IOTLB_REG_UMEM, bytearray(IovaUmem(uaddr, iova, size).encode()))

    def deregister_umem(self, iova: int, size: int) -> None:
        """VDUSE_IOTLB_DEREG_UMEM: give the bounce buffer back to the kernel."""
        self._ioctl(VduseIoctl.IOTLB_DEREG_UMEM, bytearray(IovaUmem(0, iova, size).encode()))

    def read_request(self) -> Request | None:
        """Read and decode one request; None when non-blocking and nothing is pending.

        A request that fails to decode raises a
        :class:`~pyvdpa.vduse.uapi.VduseProtocolError` carrying its
        ``request_id`` when it has one: answer it FAILED and go on.
        """
        try:
            data = os.read(self.fileno(), REQUEST_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _kernel_error(_Op.READ, exc, f"read of {self.path}", self.name) from None
        return decode_request(data, vq_num=self.vq_num)

    def write_response(self, response: Response) -> None:
        """Write the answer to one request."""
        data = response.encode()
        what = f"response {response.request_id}"
        try:
            written = os.write(self.fileno(), data)
        except OSError as exc:
            raise _kernel_error(_Op.WRITE, exc, what, self.name) from None
        if written != len(data):
            raise VduseKernelError(f"{what} on {self.name!r}: {written} of {len(data)} bytes")

    def close(self) -> None:
        """Close the device (it stays; another process may open it)."""
        self._fd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
