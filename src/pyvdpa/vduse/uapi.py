"""The VDUSE kernel interface as bytes and dataclasses (API version 0, Linux 6.12).

Theory of operation (Linux ``include/uapi/linux/vduse.h`` and
``Documentation/userspace-api/vduse.rst``): a daemon opens
``/dev/vduse/control``, sets API version 0 and creates a device with
``VDUSE_CREATE_DEV``, passing a :class:`DeviceConfig` (name, ids, features,
queue count, alignment and the initial config space).  The kernel then
offers ``/dev/vduse/NAME``: ioctls on it set up the virtqueues
(:class:`VqConfig`), kick eventfds (:class:`VqEventfd`), the config space
(:class:`ConfigData`) and interrupts, and read back what the driver
configured (:class:`VqInfo`, the negotiated features, IOTLB entries).  The
kernel asks the daemon questions on the same file: ``read(2)`` returns one
152-byte request (:func:`decode_request`: GET_VQ_STATE, SET_STATUS or
UPDATE_IOTLB) and ``write(2)`` of one 152-byte :class:`Response` answers it.

Every struct is native byte order with the C compiler's padding written as
explicit ``x`` bytes, so each precompiled :class:`struct.Struct` has exactly
the kernel's ``sizeof``.  The ioctl numbers are computed from the same sizes
with the generic ``_IOC`` encoding (x86, arm64, riscv and most other
architectures; not powerpc, mips, sparc or alpha).

Decoding is hostile-input code: what the kernel writes may come from a
driver in a guest or from another process behind vhost-vdpa.  Every decoder
checks the exact size first, then each field, and raises a subclass of
:class:`VduseProtocolError`; for a request whose header could be read the
error carries its ``request_id`` so the daemon can answer it FAILED and go
on.  Encoding our own structs raises :class:`VduseEncodeError` for a value
that does not fit.  :func:`validate_device_config` refuses, before
``VDUSE_CREATE_DEV``, what the 6.12 kernel refuses with a bare ``EINVAL``,
one clear line per rule.  Padding is written as zeros and ignored when read;
reserved words the kernel must leave zero are checked where the kernel
checks them.
"""

from __future__ import annotations

import abc
import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, Self

from pyvdpa.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from pyvdpa.ioctl import IoctlDirection
from pyvdpa.ioctl import ioctl_number as _ioc
from pyvdpa.virtio.constants import BlkFeature, DeviceId, DeviceStatus, NetFeature, VirtioFeature

__all__ = [
    "API_VERSION",
    "EVENTFD_DEASSIGN",
    "MAX_QUEUE_SIZE",
    "NAME_MAX",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "SUPPORTED_DEVICE_IDS",
    "VDUSE_BASE",
    "ConfigData",
    "DeviceConfig",
    "GetVqStateRequest",
    "IoctlDirection",
    "IotlbAccess",
    "IotlbEntry",
    "IovaCapability",
    "IovaInfo",
    "IovaUmem",
    "PackedState",
    "Request",
    "RequestType",
    "Response",
    "ResponseResult",
    "SetStatusRequest",
    "SplitState",
    "UpdateIotlbRequest",
    "VduseConfigError",
    "VduseEncodeError",
    "VduseFieldError",
    "VduseIoctl",
    "VduseIovaRangeError",
    "VduseProtocolError",
    "VduseRequestTypeError",
    "VduseSizeError",
    "VduseStatusError",
    "VduseVqIndexError",
    "VqConfig",
    "VqEventfd",
    "VqInfo",
    "VqRingState",
    "VqState",
    "decode_request",
    "decode_u64",
    "encode_name",
    "encode_u32",
    "encode_u64",
    "ioctl_number",
    "validate_device_config",
]

#: The ioctl type byte of every VDUSE ioctl.
VDUSE_BASE = 0x81
#: The only API version Linux 6.12 accepts in VDUSE_SET_API_VERSION.
API_VERSION = 0
#: Size of the ``name`` buffers, terminating NUL included.
NAME_MAX = 256
#: Largest virtqueue size virtio allows (virtio 1.2, section 2.7).
MAX_QUEUE_SIZE = 32768
#: ``vduse_vq_eventfd.fd`` that removes a queue's kick eventfd.
EVENTFD_DEASSIGN = -1
#: Device ids the 6.12 kernel lets VDUSE create.
SUPPORTED_DEVICE_IDS = frozenset({DeviceId.NET, DeviceId.BLOCK})
#: Most virtqueues one device may have (the kernel's limit on ``vq_num``).
_MAX_VQ_NUM = 0xFFFF

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_STATUS_MASK = sum(int(flag) for flag in DeviceStatus)


# --- errors ----------------------------------------------------------------


class VduseProtocolError(RemoteProtocolError):
    """Bytes from the kernel (or read back through it) break the VDUSE interface.

    ``request_id`` is set when the bytes were a request whose header could be
    read: the daemon can answer that request with
    :attr:`ResponseResult.FAILED` and keep serving.
    """

    def __init__(self, message: str, *, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class VduseSizeError(VduseProtocolError):
    """A struct or message does not have the size its layout has."""


class VduseRequestTypeError(VduseProtocolError):
    """A request has a type API version 0 does not define."""


class VduseVqIndexError(VduseProtocolError):
    """A request names a virtqueue the device does not have."""


class VduseStatusError(VduseProtocolError):
    """A SET_STATUS request sets device status bits virtio reserves."""


class VduseIovaRangeError(VduseProtocolError):
    """An IOVA range ends before it starts."""


class VduseFieldError(VduseProtocolError):
    """A field holds a value its type does not allow (a flag, a counter, a name...)."""


class VduseEncodeError(LocalProtocolError):
    """We were asked to encode a value that does not fit its field."""


class VduseConfigError(ConfigError):
    """A device configuration that VDUSE_CREATE_DEV would refuse."""


class _StatusBitsError(ValueError):
    """A status with reserved bits (becomes :class:`VduseStatusError` when decoding)."""


class _BackwardRangeError(ValueError):
    """``last < start`` (becomes :class:`VduseIovaRangeError` when decoding)."""


_DECODE_ERRORS: dict[type[ValueError], type[VduseProtocolError]] = {
    _StatusBitsError: VduseStatusError,
    _BackwardRangeError: VduseIovaRangeError,
}


def _check_uint(value: int, bits: int, what: str) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value} does not fit in {bits} unsigned bits")


def _check_range(start: int, last: int, what: str) -> None:
    _check_uint(start, 64, f"{what} start")
    _check_uint(last, 64, f"{what} last")
    if last < start:
        raise _BackwardRangeError(f"{what} [{start:#x}, {last:#x}] ends before it starts")


def _check_status(status: int) -> None:
    _check_uint(status, 8, "device status")
    reserved = status & ~_STATUS_MASK
    if reserved:
        raise _StatusBitsError(f"device status {status:#04x} sets reserved bits {reserved:#04x}")


def _unpack(layout: struct.Struct, data: bytes, what: str) -> tuple[Any, ...]:
    if len(data) != layout.size:
        raise VduseSizeError(f"{what} is {len(data)} bytes, expected {layout.size}")
    return layout.unpack(data)


# --- ioctl numbers ---------------------------------------------------------


def ioctl_number(direction: IoctlDirection, nr: int, size: int, kind: int = VDUSE_BASE) -> int:
    """The VDUSE ioctl number ``_IOC(direction, kind, nr, size)``."""
    return _ioc(direction, kind, nr, size)


_R = IoctlDirection.READ
_W = IoctlDirection.WRITE
_RW = IoctlDirection.READ | IoctlDirection.WRITE


# --- layouts ---------------------------------------------------------------


class _Layout(abc.ABC):
    """A kernel struct: validated, packed and parsed."""

    __slots__ = ()

    @abc.abstractmethod
    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first field that breaks a rule."""

    @abc.abstractmethod
    def _pack(self) -> bytes:
        """Pack fields already validated."""

    def encode(self) -> bytes:
        """Validate (:class:`VduseEncodeError`) and return the kernel's bytes."""
        try:
            self.validate()
        except ValueError as exc:
            raise VduseEncodeError(f"{type(self).__name__}: {exc}") from None
        return self._pack()

    def _checked(self, request_id: int | None = None) -> Self:
        """Validate decoded fields, raising the typed error of the rule broken."""
        try:
            self.validate()
        except ValueError as exc:
            error = _DECODE_ERRORS.get(type(exc), VduseFieldError)
            raise error(f"{type(self).__name__}: {exc}", request_id=request_id) from None
        return self


def encode_name(name: str) -> bytes:
    """Return ``name`` as a NUL-padded ``char[NAME_MAX]`` (VDUSE_DESTROY_DEV's argument).

    Raises :class:`VduseConfigError` for a name VDUSE cannot use: empty,
    longer than 255 bytes in UTF-8, or containing NUL or ``/`` (the kernel
    turns ``/`` into ``!`` in its device names, so ``/dev/vduse/NAME`` and
    the vDPA device would not be found under ``NAME``).
    """
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise VduseConfigError(f"device name {name!r} cannot be encoded as bytes") from None
    if not raw:
        raise VduseConfigError("device name is empty")
    if len(raw) >= NAME_MAX:
        raise VduseConfigError(
            f"device name is {len(raw)} bytes long, at most {NAME_MAX - 1} fit in VDUSE_NAME_MAX"
        )
    if b"\0" in raw:
        raise VduseConfigError(f"device name {name!r} contains a NUL byte")
    if b"/" in raw:
        raise VduseConfigError(
            f"device name {name!r} contains '/', which the kernel turns into '!' in device names"
        )
    return raw.ljust(NAME_MAX, b"\0")


def _decode_name(raw: bytes) -> str:
    name, nul, rest = raw.partition(b"\0")
    if not nul:
        raise ValueError("name is not NUL-terminated")
    if rest.strip(b"\0"):
        raise ValueError("name has bytes after its terminating NUL")
    return name.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class DeviceConfig(_Layout):
    """``struct vduse_dev_config``: VDUSE_CREATE_DEV's argument (336 bytes + ``config``).

    ``name`` becomes ``/dev/vduse/NAME`` and the vDPA device's name;
    ``features`` is the feature mask the device offers; ``vq_num`` the number
    of virtqueues, each set up later with VDUSE_VQ_SETUP; ``vq_align`` the
    alignment the driver uses for split rings; ``config`` the initial config
    space (its length is ``config_size``).
    """

    name: str
    vendor_id: int
    device_id: int
    features: int
    vq_num: int
    vq_align: int
    config: bytes = b""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=256sIIQII52sI")

    def validate(self) -> None:
        """Every field fits its C type; the name is representable."""
        try:
            encode_name(self.name)
        except VduseConfigError as exc:
            raise ValueError(str(exc)) from None
        _check_uint(self.vendor_id, 32, "vendor_id")
        _check_uint(self.device_id, 32, "device_id")
        _check_uint(self.features, 64, "features")
        _check_uint(self.vq_num, 32, "vq_num")
        _check_uint(self.vq_align, 32, "vq_align")
        _check_uint(len(self.config), 32, "config_size")

    def _pack(self) -> bytes:
        head = self.LAYOUT.pack(
            encode_name(self.name),
            self.vendor_id,
            self.device_id,
            self.features,
            self.vq_num,
            self.vq_align,
            bytes(52),
            len(self.config),
        )
        return head + bytes(self.config)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 336 bytes and ``config_size`` bytes of config space."""
        head = cls.LAYOUT.size
        if len(data) < head:
            raise VduseSizeError(f"device config is {len(data)} bytes, expected at least {head}")
        raw_name, vendor, device, features, vq_num, vq_align, reserved, size = (
            cls.LAYOUT.unpack_from(data)
        )
        if len(data) != head + size:
            raise VduseSizeError(
                f"device config is {len(data)} bytes, expected {head + size} for config_size {size}"
            )
        if any(reserved):
            raise VduseFieldError("DeviceConfig: reserved words are not zero")
        try:
            name = _decode_name(raw_name)
        except ValueError as exc:
            raise VduseFieldError(f"DeviceConfig: {exc}") from None
        return cls(name, vendor, device, features, vq_num, vq_align, data[head:])._checked()


def validate_device_config(config: DeviceConfig, *, page_size: int = mmap.PAGESIZE) -> None:
    """Refuse, one clear line each, what Linux 6.12 refuses in VDUSE_CREATE_DEV.

    The kernel answers all of these with a bare ``EINVAL``: a bad name, a
    device that is neither net nor block, no ACCESS_PLATFORM offered, a blk
    device offering CONFIG_WCE or a net device offering CTRL_VQ (VDUSE
    config spaces are read-only) or lacking VERSION_1, more than 65535
    virtqueues, or ``vq_align`` / ``config_size`` above a page.  Raises
    :class:`VduseConfigError`.
    """
    encode_name(config.name)
    try:
        config.validate()
    except ValueError as exc:
        raise VduseConfigError(f"VDUSE device {config.name!r}: {exc}") from None
    where = f"VDUSE device {config.name!r}"
    if config.device_id not in SUPPORTED_DEVICE_IDS:
        raise VduseConfigError(
            f"{where}: device id {config.device_id} is not net (1) or block (2), "
            "the only ones VDUSE creates"
        )
    features = config.features
    if not features & VirtioFeature.ACCESS_PLATFORM:
        raise VduseConfigError(f"{where}: VDUSE devices must offer ACCESS_PLATFORM (bit 33)")
    if config.device_id == DeviceId.BLOCK and features & BlkFeature.CONFIG_WCE:
        raise VduseConfigError(
            f"{where}: blk CONFIG_WCE (bit 11) needs a writable config space, "
            "which VDUSE does not have"
        )
    if config.device_id == DeviceId.NET and features & NetFeature.CTRL_VQ:
        raise VduseConfigError(
            f"{where}: net CTRL_VQ (bit 17) is not supported by VDUSE: offer one queue pair"
        )
    if config.device_id == DeviceId.NET and not features & VirtioFeature.VERSION_1:
        raise VduseConfigError(f"{where}: VDUSE net devices must offer VERSION_1 (bit 32)")
    if config.vq_num > _MAX_VQ_NUM:
        raise VduseConfigError(
            f"{where}: {config.vq_num} virtqueues, at most {_MAX_VQ_NUM} are allowed"
        )
    if config.vq_align > page_size:
        raise VduseConfigError(
            f"{where}: vq_align {config.vq_align} is above the page size {page_size}"
        )
    if len(config.config) > page_size:
        raise VduseConfigError(
            f"{where}: config space of {len(config.config)} bytes is above "
            f"the page size {page_size}"
        )


@dataclass(frozen=True, slots=True)
class VqConfig(_Layout):
    """``struct vduse_vq_config``: VDUSE_VQ_SETUP's argument (32 bytes).

    Every virtqueue must be set up, with a ``max_size`` above zero, before
    the device is added to the vDPA bus.
    """

    index: int
    max_size: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=IH26s")

    def validate(self) -> None:
        """A 32-bit index and a size of 1..32768."""
        _check_uint(self.index, 32, "vq index")
        if not 1 <= self.max_size <= MAX_QUEUE_SIZE:
            raise ValueError(f"max_size {self.max_size} is not 1..{MAX_QUEUE_SIZE}")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.index, self.max_size, b"")

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 32 bytes; the reserved words must be zero."""
        index, max_size, reserved = _unpack(cls.LAYOUT, data, "vq config")
        if any(reserved):
            raise VduseFieldError("VqConfig: reserved words are not zero")
        return cls(index, max_size)._checked()


@dataclass(frozen=True, slots=True)
class SplitState:
    """``struct vduse_vq_state_split``: where the device resumes a split ring."""

    avail_index: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=H6x")

    def validate(self) -> None:
        """The index is 16-bit."""
        _check_uint(self.avail_index, 16, "avail_index")

    def pack(self) -> bytes:
        """Return the 8 bytes of the state union."""
        return self.LAYOUT.pack(self.avail_index)

    @classmethod
    def unpack(cls, raw: bytes) -> Self:
        """Parse the 8 bytes of the state union (unchecked)."""
        (avail_index,) = cls.LAYOUT.unpack(raw)
        return cls(avail_index)


@dataclass(frozen=True, slots=True)
class PackedState:
    """``struct vduse_vq_state_packed``: where the device resumes a packed ring.

    Indexes are 15-bit ring positions and counters the 1-bit wrap counters.
    """

    last_avail_counter: int
    last_avail_idx: int
    last_used_counter: int
    last_used_idx: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=HHHH")

    def validate(self) -> None:
        """Counters are 0 or 1, indexes below 0x8000."""
        for name in ("last_avail_counter", "last_used_counter"):
            value = getattr(self, name)
            if value not in (0, 1):
                raise ValueError(f"{name} {value} is not a wrap counter (0 or 1)")
        for name in ("last_avail_idx", "last_used_idx"):
            value = getattr(self, name)
            if not 0 <= value < MAX_QUEUE_SIZE:
                raise ValueError(f"{name} {value} is not a packed ring position (< 0x8000)")

    def pack(self) -> bytes:
        """Return the 8 bytes of the state union."""
        return self.LAYOUT.pack(
            self.last_avail_counter,
            self.last_avail_idx,
            self.last_used_counter,
            self.last_used_idx,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Self:
        """Parse the 8 bytes of the state union (unchecked)."""
        return cls(*cls.LAYOUT.unpack(raw))


#: The state union of a virtqueue: which member is live depends on RING_PACKED.
VqRingState = SplitState | PackedState


def _unpack_state(raw: bytes, *, packed: bool) -> VqRingState:
    return PackedState.unpack(raw) if packed else SplitState.unpack(raw)


@dataclass(frozen=True, slots=True)
class VqInfo(_Layout):
    """``struct vduse_vq_info``: VDUSE_VQ_GET_INFO's answer (48 bytes).

    The ring as the driver configured it: size ``num``, the IOVAs of its
    three areas, the position to resume at (``state``: packed when
    RING_PACKED was negotiated, split otherwise) and whether it is ready.
    """

    index: int
    num: int
    desc_addr: int
    driver_addr: int
    device_addr: int
    state: VqRingState
    ready: bool

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=IIQQQ8sB7x")

    def validate(self) -> None:
        """Fields fit; ``num`` is at most 32768; the state is valid."""
        _check_uint(self.index, 32, "vq index")
        if not 0 <= self.num <= MAX_QUEUE_SIZE:
            raise ValueError(f"num {self.num} is above the largest queue size {MAX_QUEUE_SIZE}")
        _check_uint(self.desc_addr, 64, "desc_addr")
        _check_uint(self.driver_addr, 64, "driver_addr")
        _check_uint(self.device_addr, 64, "device_addr")
        self.state.validate()

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(
            self.index,
            self.num,
            self.desc_addr,
            self.driver_addr,
            self.device_addr,
            self.state.pack(),
            int(self.ready),
        )

    @classmethod
    def request(cls, index: int) -> bytearray:
        """Return VDUSE_VQ_GET_INFO's in-out buffer asking for queue ``index``."""
        _check_uint(index, 32, "vq index")
        return bytearray(cls.LAYOUT.pack(index, 0, 0, 0, 0, bytes(8), 0))

    @classmethod
    def decode(cls, data: bytes, *, packed: bool) -> Self:
        """Parse 48 bytes; ``packed`` says which member of the state union is live."""
        index, num, desc, driver, device, raw_state, ready = _unpack(cls.LAYOUT, data, "vq info")
        if ready not in (0, 1):
            raise VduseFieldError(f"VqInfo: ready is {ready}, not 0 or 1")
        state = _unpack_state(raw_state, packed=packed)
        return cls(index, num, desc, driver, device, state, bool(ready))._checked()


@dataclass(frozen=True, slots=True)
class VqEventfd(_Layout):
    """``struct vduse_vq_eventfd``: VDUSE_VQ_SETUP_KICKFD's argument (8 bytes).

    ``fd`` is the eventfd the kernel signals when the driver kicks queue
    ``index``, or :data:`EVENTFD_DEASSIGN` to remove it.
    """

    index: int
    fd: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=Ii")

    def validate(self) -> None:
        """A 32-bit index; an fd or -1."""
        _check_uint(self.index, 32, "vq index")
        if not EVENTFD_DEASSIGN <= self.fd < 1 << 31:
            raise ValueError(f"fd {self.fd} is neither a file descriptor nor -1")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.index, self.fd)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 8 bytes."""
        return cls(*_unpack(cls.LAYOUT, data, "vq eventfd"))._checked()


class IotlbAccess(IntFlag):
    """``VDUSE_ACCESS_*``: what the driver allows the device to do with an IOVA range."""

    RO = 0x1
    WO = 0x2
    RW = 0x3


@dataclass(frozen=True, slots=True)
class IotlbEntry(_Layout):
    """``struct vduse_iotlb_entry``: VDUSE_IOTLB_GET_FD's in-out argument (32 bytes).

    Asked with ``start`` and ``last`` (inclusive), answered with the first
    overlapping region ``[start, last]``, its access and the ``offset`` at
    which to map the returned fd.
    """

    offset: int
    start: int
    last: int
    perm: IotlbAccess

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQQB7x")

    @property
    def size(self) -> int:
        """Bytes in ``[start, last]``."""
        return self.last - self.start + 1

    def validate(self) -> None:
        """64-bit fields, ``start <= last``, a known access."""
        _check_uint(self.offset, 64, "offset")
        _check_range(self.start, self.last, "IOVA range")
        _check_uint(self.perm, 8, "perm")
        if self.perm not in (IotlbAccess.RO, IotlbAccess.WO, IotlbAccess.RW):
            raise ValueError(f"perm {int(self.perm)} is not RO (1), WO (2) or RW (3)")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.offset, self.start, self.last, self.perm)

    @classmethod
    def request(cls, start: int, last: int) -> bytearray:
        """Return VDUSE_IOTLB_GET_FD's in-out buffer asking for ``[start, last]``."""
        try:
            _check_range(start, last, "IOVA range")
        except ValueError as exc:
            raise VduseEncodeError(f"IotlbEntry: {exc}") from None
        return bytearray(cls.LAYOUT.pack(0, start, last, 0))

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 32 bytes."""
        offset, start, last, perm = _unpack(cls.LAYOUT, data, "IOTLB entry")
        return cls(offset, start, last, IotlbAccess(perm))._checked()


@dataclass(frozen=True, slots=True)
class ConfigData(_Layout):
    """``struct vduse_config_data``: VDUSE_DEV_SET_CONFIG's argument (8 bytes + ``data``).

    Writes ``data`` into the config space at ``offset``; the kernel refuses
    an empty write or one past the end of the space.
    """

    offset: int
    data: bytes

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II")

    def validate(self) -> None:
        """A 32-bit offset and 1..2**32-1 bytes."""
        _check_uint(self.offset, 32, "offset")
        if not self.data:
            raise ValueError("config write of 0 bytes")
        _check_uint(len(self.data), 32, "length")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.offset, len(self.data)) + bytes(self.data)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 8 bytes and ``length`` bytes of data."""
        head = cls.LAYOUT.size
        if len(data) < head:
            raise VduseSizeError(f"config data is {len(data)} bytes, expected at least {head}")
        offset, length = cls.LAYOUT.unpack_from(data)
        if len(data) != head + length:
            raise VduseSizeError(
                f"config data is {len(data)} bytes, expected {head + length} for length {length}"
            )
        return cls(offset, data[head:])._checked()


@dataclass(frozen=True, slots=True)
class IovaUmem(_Layout):
    """``struct vduse_iova_umem``: VDUSE_IOTLB_REG_UMEM / DEREG_UMEM's argument (48 bytes).

    Registers ``size`` bytes of this process's memory at ``uaddr`` (page
    aligned) as the bounce buffer at IOVA ``iova``.
    """

    uaddr: int
    iova: int
    size: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQQ24s")

    def validate(self) -> None:
        """64-bit fields."""
        _check_uint(self.uaddr, 64, "uaddr")
        _check_uint(self.iova, 64, "iova")
        _check_uint(self.size, 64, "size")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.uaddr, self.iova, self.size, b"")

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 48 bytes; the reserved words must be zero."""
        uaddr, iova, size, reserved = _unpack(cls.LAYOUT, data, "IOVA umem")
        if any(reserved):
            raise VduseFieldError("IovaUmem: reserved words are not zero")
        return cls(uaddr, iova, size)._checked()


class IovaCapability(IntFlag):
    """``VDUSE_IOVA_CAP_*``: what can be done with an IOVA region."""

    UMEM = 0x1  # user memory can be registered as its bounce buffer


@dataclass(frozen=True, slots=True)
class IovaInfo(_Layout):
    """``struct vduse_iova_info``: VDUSE_IOTLB_GET_INFO's in-out argument (48 bytes)."""

    start: int
    last: int
    capability: IovaCapability

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQQ24s")

    def validate(self) -> None:
        """``start <= last``; only known capability bits."""
        _check_range(self.start, self.last, "IOVA range")
        _check_uint(self.capability, 64, "capability")
        unknown = int(self.capability) & ~int(IovaCapability.UMEM)
        if unknown:
            raise ValueError(f"capability {int(self.capability):#x} sets unknown bits")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.start, self.last, self.capability, b"")

    @classmethod
    def request(cls, start: int, last: int) -> bytearray:
        """Return VDUSE_IOTLB_GET_INFO's in-out buffer asking for ``[start, last]``."""
        return bytearray(cls(start, last, IovaCapability(0)).encode())

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 48 bytes."""
        start, last, capability, _reserved = _unpack(cls.LAYOUT, data, "IOVA info")
        return cls(start, last, IovaCapability(capability))._checked()


def encode_u64(value: int) -> bytearray:
    """Return a ``__u64`` argument (VDUSE_SET_API_VERSION) as a mutable buffer."""
    try:
        _check_uint(value, 64, "value")
    except ValueError as exc:
        raise VduseEncodeError(str(exc)) from None
    return bytearray(_U64.pack(value))


def encode_u32(value: int) -> bytearray:
    """Return a ``__u32`` argument (VDUSE_VQ_INJECT_IRQ) as a mutable buffer."""
    try:
        _check_uint(value, 32, "value")
    except ValueError as exc:
        raise VduseEncodeError(str(exc)) from None
    return bytearray(_U32.pack(value))


def decode_u64(data: bytes) -> int:
    """Parse a ``__u64`` answer (API version, negotiated features)."""
    (value,) = _unpack(_U64, data, "u64 answer")
    return int(value)


class VduseIoctl(IntEnum):
    """The VDUSE ioctl numbers, from the sizes of the structs above."""

    # /dev/vduse/control
    GET_API_VERSION = ioctl_number(_R, 0x00, _U64.size)
    SET_API_VERSION = ioctl_number(_W, 0x01, _U64.size)
    CREATE_DEV = ioctl_number(_W, 0x02, DeviceConfig.LAYOUT.size)
    DESTROY_DEV = ioctl_number(_W, 0x03, NAME_MAX)
    # /dev/vduse/NAME
    IOTLB_GET_FD = ioctl_number(_RW, 0x10, IotlbEntry.LAYOUT.size)
    DEV_GET_FEATURES = ioctl_number(_R, 0x11, _U64.size)
    DEV_SET_CONFIG = ioctl_number(_W, 0x12, ConfigData.LAYOUT.size)
    DEV_INJECT_CONFIG_IRQ = ioctl_number(IoctlDirection.NONE, 0x13, 0)
    VQ_SETUP = ioctl_number(_W, 0x14, VqConfig.LAYOUT.size)
    VQ_GET_INFO = ioctl_number(_RW, 0x15, VqInfo.LAYOUT.size)
    VQ_SETUP_KICKFD = ioctl_number(_W, 0x16, VqEventfd.LAYOUT.size)
    VQ_INJECT_IRQ = ioctl_number(_W, 0x17, _U32.size)
    IOTLB_REG_UMEM = ioctl_number(_W, 0x18, IovaUmem.LAYOUT.size)
    IOTLB_DEREG_UMEM = ioctl_number(_W, 0x19, IovaUmem.LAYOUT.size)
    IOTLB_GET_INFO = ioctl_number(_RW, 0x1A, IovaInfo.LAYOUT.size)


# --- the message pair on /dev/vduse/NAME -----------------------------------


class RequestType(IntEnum):
    """``enum vduse_req_type`` (API version 0)."""

    GET_VQ_STATE = 0  # where should queue ``index`` resume? (answered with its state)
    SET_STATUS = 1  # the driver wrote the device status (0 resets the device)
    UPDATE_IOTLB = 2  # mappings in [start, last] changed: drop and map them again


class ResponseResult(IntEnum):
    """``VDUSE_REQ_RESULT_*``."""

    OK = 0
    FAILED = 1


#: ``type``, ``request_id`` and four reserved words before the 128-byte union.
_REQUEST_HEAD = struct.Struct("=II16x")
#: Size of ``struct vduse_dev_request`` and of ``struct vduse_dev_response``.
REQUEST_SIZE = _REQUEST_HEAD.size + 128
RESPONSE_SIZE = REQUEST_SIZE


@dataclass(frozen=True, slots=True)
class GetVqStateRequest(_Layout):
    """VDUSE_GET_VQ_STATE: answer with a :class:`Response` carrying queue ``index``'s state."""

    request_id: int
    index: int

    TYPE: ClassVar[RequestType] = RequestType.GET_VQ_STATE
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II16xI124x")

    def validate(self) -> None:
        """32-bit fields."""
        _check_uint(self.request_id, 32, "request_id")
        _check_uint(self.index, 32, "vq index")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.TYPE, self.request_id, self.index)

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        _type, request_id, index = cls.LAYOUT.unpack(data)
        return cls(request_id, index)


@dataclass(frozen=True, slots=True)
class SetStatusRequest(_Layout):
    """VDUSE_SET_STATUS: the driver wrote ``status``; 0 is a reset."""

    request_id: int
    status: DeviceStatus

    TYPE: ClassVar[RequestType] = RequestType.SET_STATUS
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II16xB127x")

    def validate(self) -> None:
        """Only the status bits virtio defines."""
        _check_uint(self.request_id, 32, "request_id")
        _check_status(int(self.status))

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.TYPE, self.request_id, self.status)

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        _type, request_id, status = cls.LAYOUT.unpack(data)
        return cls(request_id, DeviceStatus(status))


@dataclass(frozen=True, slots=True)
class UpdateIotlbRequest(_Layout):
    """VDUSE_UPDATE_IOTLB: mappings in ``[start, last]`` changed; map them again on demand."""

    request_id: int
    start: int
    last: int

    TYPE: ClassVar[RequestType] = RequestType.UPDATE_IOTLB
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II16xQQ112x")

    def validate(self) -> None:
        """``start <= last``."""
        _check_uint(self.request_id, 32, "request_id")
        _check_range(self.start, self.last, "IOVA range")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.TYPE, self.request_id, self.start, self.last)

    @classmethod
    def _parse(cls, data: bytes) -> Self:
        _type, request_id, start, last = cls.LAYOUT.unpack(data)
        return cls(request_id, start, last)


#: One request read from ``/dev/vduse/NAME``.
Request = GetVqStateRequest | SetStatusRequest | UpdateIotlbRequest

_REQUESTS: dict[
    int, type[GetVqStateRequest] | type[SetStatusRequest] | type[UpdateIotlbRequest]
] = {kind.TYPE: kind for kind in (GetVqStateRequest, SetStatusRequest, UpdateIotlbRequest)}


def decode_request(data: bytes, *, vq_num: int) -> Request:
    """Parse one ``struct vduse_dev_request`` read from a device with ``vq_num`` queues.

    Checked in order: the exact size (:class:`VduseSizeError`), a known type
    (:class:`VduseRequestTypeError`), then the fields: a queue index below
    ``vq_num`` (:class:`VduseVqIndexError`), a status without reserved bits
    (:class:`VduseStatusError`), an IOVA range with ``start <= last``
    (:class:`VduseIovaRangeError`).  Every error after the size check
    carries the request's ``request_id``.
    """
    if len(data) != REQUEST_SIZE:
        raise VduseSizeError(f"request is {len(data)} bytes, expected {REQUEST_SIZE}")
    kind, request_id = _REQUEST_HEAD.unpack_from(data)
    layout = _REQUESTS.get(kind)
    if layout is None:
        known = ", ".join(f"{t.value} ({t.name})" for t in RequestType)
        raise VduseRequestTypeError(
            f"request {request_id} has type {kind}, not one of {known}", request_id=request_id
        )
    request = layout._parse(data)._checked(request_id)
    if isinstance(request, GetVqStateRequest) and request.index >= vq_num:
        raise VduseVqIndexError(
            f"GET_VQ_STATE request {request_id} names queue {request.index}, "
            f"the device has {vq_num}",
            request_id=request_id,
        )
    return request


@dataclass(frozen=True, slots=True)
class VqState:
    """``struct vduse_vq_state``: a queue index and its resume position."""

    index: int
    state: VqRingState

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=I8s")

    def validate(self) -> None:
        """A 32-bit index and a valid state."""
        _check_uint(self.index, 32, "vq index")
        self.state.validate()


@dataclass(frozen=True, slots=True)
class Response(_Layout):
    """``struct vduse_dev_response``: the answer written for request ``request_id``.

    Only an OK answer to GET_VQ_STATE carries ``vq_state``; the kernel reads
    its split or packed member according to the negotiated RING_PACKED.
    """

    request_id: int
    result: ResponseResult = ResponseResult.OK
    vq_state: VqState | None = None

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II16sI8s116x")

    def validate(self) -> None:
        """A 32-bit id, a known result; a state only with OK."""
        _check_uint(self.request_id, 32, "request_id")
        if self.result not in (ResponseResult.OK, ResponseResult.FAILED):
            raise ValueError(f"result {self.result} is not OK (0) or FAILED (1)")
        if self.vq_state is not None:
            if self.result != ResponseResult.OK:
                raise ValueError("a FAILED response carries no vq state")
            self.vq_state.validate()

    def _pack(self) -> bytes:
        index, raw = 0, bytes(8)
        if self.vq_state is not None:
            index, raw = self.vq_state.index, self.vq_state.state.pack()
        return self.LAYOUT.pack(self.request_id, self.result, b"", index, raw)

    @classmethod
    def decode(cls, data: bytes, *, packed: bool) -> Self:
        """Parse 152 bytes as the kernel does: reserved words zero, a known result.

        The state union is returned as ``packed`` says; an all-zero union
        reads as no state.
        """
        request_id, result, reserved, index, raw = _unpack(cls.LAYOUT, data, "response")
        if any(reserved):
            raise VduseFieldError(
                f"response {request_id}: reserved words are not zero", request_id=request_id
            )
        if result not in (ResponseResult.OK, ResponseResult.FAILED):
            raise VduseFieldError(
                f"response {request_id}: result {result} is not OK (0) or FAILED (1)",
                request_id=request_id,
            )
        vq_state = None
        if index or any(raw):
            vq_state = VqState(index, _unpack_state(raw, packed=packed))
        return cls(request_id, ResponseResult(result), vq_state)._checked(request_id)
