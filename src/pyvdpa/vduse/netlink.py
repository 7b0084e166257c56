"""A minimal generic-netlink client for the kernel's ``vdpa`` family.

Theory of operation (Linux ``include/uapi/linux/vdpa.h``, ``netlink.h`` and
``genetlink.h``; iproute2's ``vdpa`` tool speaks the same): a vDPA device is
created on a *management device* (``vduse`` for VDUSE devices, which have no
bus name; others are named ``bus/device``) with VDPA_CMD_DEV_NEW, removed
with VDPA_CMD_DEV_DEL, and listed with dumps of VDPA_CMD_DEV_GET and
VDPA_CMD_MGMTDEV_GET.  Each message is a 16-byte ``nlmsghdr``, a 4-byte
``genlmsghdr`` (command, version) and attributes (``nlattr``: length, type,
payload padded to 4 bytes).  The family's message type is looked up first
with the controller's CTRL_CMD_GETFAMILY.

The sans-I/O half builds requests (:class:`NetlinkRequest`) and checks what
comes back (:class:`ReplyCollector`): datagrams split into messages, every
length bounds-checked, attributes parsed once, NLMSG_ERROR and NLMSG_DONE
turned into typed errors with their errno and the kernel's extended-ack
message.  Bytes that break the format raise :class:`NetlinkProtocolError`.
errno values, from an error message or from the socket, are mapped once,
by :func:`vdpa_error`, into the :class:`VdpaNetlinkError` family.

The socket half, :class:`VdpaNetlink`, sends one request at a time and
reads until its exchange completes.  The vdpa family lives in the initial
network namespace only (the lookup fails with ENOENT elsewhere), and adding
or deleting a VDUSE device blocks in the kernel until the bound virtio
driver has probed or released it: the VDUSE daemon must be answering its
requests meanwhile, from another thread or process.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag
from types import TracebackType
from typing import Self, TypeVar

from pyvdpa.errors import ConfigError, RemoteProtocolError, TransportError

__all__ = [
    "GENL_HEADER",
    "GENL_ID_CTRL",
    "NETLINK_GENERIC",
    "NLA_HEADER",
    "NLMSG_HEADER",
    "VDPA_GENL_NAME",
    "VDPA_GENL_VERSION",
    "Attributes",
    "CtrlAttr",
    "CtrlCommand",
    "GenericMessage",
    "MgmtDev",
    "NetlinkFlag",
    "NetlinkMessage",
    "NetlinkProtocolError",
    "NetlinkRequest",
    "NlmsgType",
    "Operation",
    "ReplyCollector",
    "VdpaAttr",
    "VdpaCommand",
    "VdpaDevice",
    "VdpaDeviceConfig",
    "VdpaExistsError",
    "VdpaFamilyMissingError",
    "VdpaNetlink",
    "VdpaNetlinkError",
    "VdpaNoDeviceError",
    "VdpaPermissionError",
    "add_device",
    "add_device_request",
    "decode_family_id",
    "decode_messages",
    "delete_device",
    "delete_device_request",
    "encode_attribute",
    "family_request",
    "get_config_request",
    "get_device_request",
    "get_mgmtdev_request",
    "list_devices",
    "list_mgmtdevs",
    "parse_attributes",
    "split_handle",
    "vdpa_error",
]

#: ``NETLINK_GENERIC``: the generic netlink protocol of ``AF_NETLINK``.
NETLINK_GENERIC = 16
#: The generic netlink controller's fixed message type.
GENL_ID_CTRL = 0x10
#: The vdpa family's name and version.
VDPA_GENL_NAME = "vdpa"
VDPA_GENL_VERSION = 1

_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
#: Acknowledgement flags (they reuse the bits of ROOT and MATCH).
_NLM_F_CAPPED = 0x100
_NLM_F_ACK_TLVS = 0x200
#: ``NLMSGERR_ATTR_MSG``: the extended ack's text.
_NLMSGERR_ATTR_MSG = 1
#: The low 14 bits of ``nla_type`` are the type; the top two are flags.
_NLA_TYPE_MASK = 0x3FFF
#: Attribute type 0 is padding (VDPA_ATTR_PAD, CTRL_ATTR_UNSPEC).
_NLA_PAD = 0
#: Largest datagram read at once (a dump's datagrams are at most 32 KiB).
_RECV_SIZE = 1 << 16

#: ``struct nlmsghdr``: length, type, flags, sequence number, port id.
NLMSG_HEADER = struct.Struct("=IHHII")
#: ``struct genlmsghdr``: command, version, reserved.
GENL_HEADER = struct.Struct("=BBH")
#: ``struct nlattr``: length (header included), type.
NLA_HEADER = struct.Struct("=HH")
_ERROR_FIELD = struct.Struct("=i")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

_T = TypeVar("_T", int, str)


def _align(length: int) -> int:
    return (length + 3) & ~3


class NlmsgType(IntEnum):
    """Netlink's own message types (below 0x10)."""

    NOOP = 1
    ERROR = 2
    DONE = 3
    OVERRUN = 4


class NetlinkFlag(IntFlag):
    """``NLM_F_*`` request flags."""

    REQUEST = 0x1
    MULTI = 0x2
    ACK = 0x4
    ECHO = 0x8
    DUMP_INTR = 0x10
    ROOT = 0x100
    MATCH = 0x200
    DUMP = 0x300


class CtrlCommand(IntEnum):
    """Generic netlink controller commands used here."""

    NEWFAMILY = 1
    GETFAMILY = 3


class CtrlAttr(IntEnum):
    """Generic netlink controller attributes used here."""

    FAMILY_ID = 1  # u16
    FAMILY_NAME = 2  # string


class VdpaCommand(IntEnum):
    """``enum vdpa_command``."""

    UNSPEC = 0
    MGMTDEV_NEW = 1  # the command of MGMTDEV_GET's answers
    MGMTDEV_GET = 2
    DEV_NEW = 3  # also the command of DEV_GET's answers
    DEV_DEL = 4
    DEV_GET = 5
    DEV_CONFIG_GET = 6
    DEV_VSTATS_GET = 7


class VdpaAttr(IntEnum):
    """``enum vdpa_attr`` (the kernel's payload type in the comments)."""

    PAD = 0
    MGMTDEV_BUS_NAME = 1  # string
    MGMTDEV_DEV_NAME = 2  # string
    MGMTDEV_SUPPORTED_CLASSES = 3  # u64: bit n set for virtio device id n
    DEV_NAME = 4  # string
    DEV_ID = 5  # u32
    DEV_VENDOR_ID = 6  # u32
    DEV_MAX_VQS = 7  # u32
    DEV_MAX_VQ_SIZE = 8  # u16
    DEV_MIN_VQ_SIZE = 9  # u16
    DEV_NET_CFG_MACADDR = 10  # 6 bytes
    DEV_NET_STATUS = 11  # u16
    DEV_NET_CFG_MAX_VQP = 12  # u16
    DEV_NET_CFG_MTU = 13  # u16
    DEV_NEGOTIATED_FEATURES = 14  # u64
    DEV_MGMTDEV_MAX_VQS = 15  # u32
    DEV_SUPPORTED_FEATURES = 16  # u64
    DEV_QUEUE_INDEX = 17  # u32
    DEV_VENDOR_ATTR_NAME = 18  # string
    DEV_VENDOR_ATTR_VALUE = 19  # u64
    DEV_FEATURES = 20  # u64
    VDPA_DEV_SUPPORTED_FEATURES = 21  # u64


# --- errors ----------------------------------------------------------------


class NetlinkProtocolError(RemoteProtocolError):
    """A netlink datagram or attribute breaks the format (hostile or corrupt bytes)."""


class VdpaNetlinkError(TransportError):
    """The kernel (or the socket) refused a vdpa request.

    ``errno`` is the error number and ``extack`` the kernel's extended-ack
    text, when it sent one.
    """

    def __init__(self, message: str, *, errno_value: int, extack: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value
        self.extack = extack


class VdpaFamilyMissingError(VdpaNetlinkError):
    """The kernel has no vdpa generic netlink family (here)."""


class VdpaExistsError(VdpaNetlinkError):
    """A vDPA device of that name exists already."""


class VdpaNoDeviceError(VdpaNetlinkError):
    """No vDPA device, or management device, of that name."""


class VdpaPermissionError(VdpaNetlinkError):
    """The request needs CAP_NET_ADMIN."""


class Operation(Enum):
    """What a request does, phrased for error messages (formatted with the request)."""

    OPEN = "opening a generic netlink socket"
    RESOLVE_FAMILY = "looking up the vdpa netlink family"
    ADD_DEVICE = "adding vDPA device {name!r} on management device {mgmtdev!r}"
    DELETE_DEVICE = "deleting vDPA device {name!r}"
    GET_DEVICE = "reading vDPA device {name!r}"
    LIST_DEVICES = "listing vDPA devices"
    GET_MGMTDEV = "reading vDPA management device {mgmtdev!r}"
    LIST_MGMTDEVS = "listing vDPA management devices"
    GET_CONFIG = "reading the config of vDPA device {name!r}"


_NO_DEVICE = (VdpaNoDeviceError, "no vDPA device named {name!r}")

#: ``(operation, errno) -> (error class, message)``; ``None`` matches any operation.
_ERRNO: dict[tuple[Operation | None, int], tuple[type[VdpaNetlinkError], str]] = {
    (Operation.RESOLVE_FAMILY, errno.ENOENT): (
        VdpaFamilyMissingError,
        "the kernel has no vdpa netlink family: load the vdpa module "
        "(the family is not visible outside the initial network namespace)",
    ),
    (Operation.ADD_DEVICE, errno.EEXIST): (
        VdpaExistsError,
        "a vDPA device named {name!r} exists already",
    ),
    (Operation.ADD_DEVICE, errno.ENODEV): (
        VdpaNoDeviceError,
        "no vDPA management device {mgmtdev!r} (for 'vduse', load the vduse module)",
    ),
    (Operation.ADD_DEVICE, errno.EINVAL): (
        VdpaNetlinkError,
        "management device {mgmtdev!r} refused vDPA device {name!r} (for 'vduse': "
        "no VDUSE device of that name, or a virtqueue not set up with VDUSE_VQ_SETUP)",
    ),
    (Operation.DELETE_DEVICE, errno.ENODEV): _NO_DEVICE,
    (Operation.GET_DEVICE, errno.ENODEV): _NO_DEVICE,
    (Operation.GET_CONFIG, errno.ENODEV): _NO_DEVICE,
    (Operation.GET_CONFIG, errno.EAGAIN): (
        VdpaNetlinkError,
        "vDPA device {name!r} has not finished feature negotiation",
    ),
    (Operation.GET_MGMTDEV, errno.ENODEV): (
        VdpaNoDeviceError,
        "no vDPA management device {mgmtdev!r}",
    ),
    (None, errno.EPERM): (VdpaPermissionError, "{action} needs CAP_NET_ADMIN (run as root)"),
    (None, errno.EACCES): (VdpaPermissionError, "{action} needs CAP_NET_ADMIN (run as root)"),
}


def vdpa_error(
    operation: Operation,
    code: int,
    *,
    name: str = "",
    mgmtdev: str = "",
    extack: str | None = None,
) -> VdpaNetlinkError:
    """Map errno ``code`` met during ``operation`` to its typed error, one line."""
    action = operation.value.format(name=name, mgmtdev=mgmtdev)
    found = _ERRNO.get((operation, code)) or _ERRNO.get((None, code))
    if found is None:
        cls, line = VdpaNetlinkError, f"{action} failed: {os.strerror(code)}"
        if extack:
            line = f"{line}: {extack}"
    else:
        cls, template = found
        line = template.format(action=action, name=name, mgmtdev=mgmtdev)
    label = errno.errorcode.get(code, str(code))
    return cls(f"{line} ({label})", errno_value=code, extack=extack)


# --- messages and attributes -----------------------------------------------


@dataclass(frozen=True, slots=True)
class NetlinkMessage:
    """One netlink message: header fields and the payload after the header."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes

    def encode(self) -> bytes:
        """Return the message with its header, padded to 4 bytes."""
        length = NLMSG_HEADER.size + len(self.payload)
        head = NLMSG_HEADER.pack(length, self.type, self.flags, self.seq, self.pid)
        return (head + self.payload).ljust(_align(length), b"\0")


def decode_messages(datagram: bytes) -> list[NetlinkMessage]:
    """Split one datagram into messages, checking every length against the bytes left."""
    messages: list[NetlinkMessage] = []
    offset = 0
    while offset < len(datagram):
        left = len(datagram) - offset
        if left < NLMSG_HEADER.size:
            raise NetlinkProtocolError(
                f"{left} bytes at offset {offset} are too short for a netlink header"
            )
        length, kind, flags, seq, pid = NLMSG_HEADER.unpack_from(datagram, offset)
        if not NLMSG_HEADER.size <= length <= left:
            raise NetlinkProtocolError(
                f"netlink message at offset {offset} claims {length} bytes, {left} are left"
            )
        payload = datagram[offset + NLMSG_HEADER.size : offset + length]
        messages.append(NetlinkMessage(kind, flags, seq, pid, payload))
        offset += _align(length)
    return messages


def encode_attribute(kind: int, payload: bytes) -> bytes:
    """Return one attribute: header, payload, padding to 4 bytes."""
    length = NLA_HEADER.size + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"attribute {kind} of {len(payload)} bytes does not fit in nla_len")
    return (NLA_HEADER.pack(length, kind) + payload).ljust(_align(length), b"\0")


def _string(text: str) -> bytes:
    return text.encode() + b"\0"


@dataclass(frozen=True, slots=True)
class Attributes:
    """A message's attributes by type, with checked typed getters.

    Getters return None for an absent attribute and raise
    :class:`NetlinkProtocolError` for one whose payload has the wrong size
    or is not a NUL-terminated UTF-8 string.
    """

    values: Mapping[int, bytes]

    def raw(self, kind: int) -> bytes | None:
        """The payload of ``kind``, or None."""
        return self.values.get(kind)

    def _fixed(self, kind: int, layout: struct.Struct) -> int | None:
        payload = self.values.get(kind)
        if payload is None:
            return None
        if len(payload) != layout.size:
            raise NetlinkProtocolError(
                f"attribute {_attr_name(kind)} has {len(payload)} bytes, expected {layout.size}"
            )
        (value,) = layout.unpack(payload)
        return int(value)

    def u16(self, kind: int) -> int | None:
        """A ``u16`` attribute."""
        return self._fixed(kind, _U16)

    def u32(self, kind: int) -> int | None:
        """A ``u32`` attribute."""
        return self._fixed(kind, _U32)

    def u64(self, kind: int) -> int | None:
        """A ``u64`` attribute."""
        return self._fixed(kind, _U64)

    def string(self, kind: int) -> str | None:
        """A NUL-terminated string attribute."""
        payload = self.values.get(kind)
        if payload is None:
            return None
        text, nul, rest = payload.partition(b"\0")
        if not nul or rest.strip(b"\0"):
            raise NetlinkProtocolError(
                f"attribute {_attr_name(kind)} is not a NUL-terminated string"
            )
        try:
            return text.decode()
        except UnicodeDecodeError:
            raise NetlinkProtocolError(f"attribute {_attr_name(kind)} is not UTF-8") from None

    def required(self, value: _T | None, kind: int) -> _T:
        """``value`` (from a getter) when present; a reply lacking it is refused."""
        if value is None:
            raise NetlinkProtocolError(f"reply lacks attribute {_attr_name(kind)}")
        return value


def _attr_name(kind: int) -> str:
    try:
        return VdpaAttr(kind).name
    except ValueError:
        return str(kind)


def parse_attributes(data: bytes) -> Attributes:
    """Parse a run of attributes; padding (type 0) is skipped, a repeated type refused."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        left = len(data) - offset
        if left < NLA_HEADER.size:
            raise NetlinkProtocolError(f"{left} stray bytes after the last attribute")
        length, kind = NLA_HEADER.unpack_from(data, offset)
        if not NLA_HEADER.size <= length <= left:
            raise NetlinkProtocolError(
                f"attribute at offset {offset} claims {length} bytes, {left} are left"
            )
        kind &= _NLA_TYPE_MASK
        if kind != _NLA_PAD:
            if kind in values:
                raise NetlinkProtocolError(f"attribute {_attr_name(kind)} appears twice")
            values[kind] = data[offset + NLA_HEADER.size : offset + length]
        offset += _align(length)
    return Attributes(values)


@dataclass(frozen=True, slots=True)
class GenericMessage:
    """A generic netlink message: command, version and attributes."""

    command: int
    version: int
    attrs: Attributes

    @classmethod
    def decode(cls, message: NetlinkMessage) -> Self:
        """Parse the generic header and the attributes after it."""
        if len(message.payload) < GENL_HEADER.size:
            raise NetlinkProtocolError(
                f"generic netlink payload of {len(message.payload)} bytes has no genlmsghdr"
            )
        command, version, _reserved = GENL_HEADER.unpack_from(message.payload)
        return cls(command, version, parse_attributes(message.payload[GENL_HEADER.size :]))


# --- requests --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetlinkRequest:
    """One request to send: family, command, attributes, and what answers it.

    ``reply_command`` is the command of the data messages that answer it
    (None when only an acknowledgement comes back); ``name`` and
    ``mgmtdev`` are the device and management device it is about, for
    error messages.
    """

    operation: Operation
    family: int
    command: int
    attrs: tuple[tuple[int, bytes], ...] = ()
    dump: bool = False
    reply_command: int | None = None
    version: int = VDPA_GENL_VERSION
    name: str = ""
    mgmtdev: str = ""

    def encode(self, seq: int, pid: int = 0) -> bytes:
        """Return the datagram: a dump asks for NLMSG_DONE, anything else for an ack."""
        flags = NetlinkFlag.REQUEST | (NetlinkFlag.DUMP if self.dump else NetlinkFlag.ACK)
        payload = GENL_HEADER.pack(self.command, self.version, 0) + b"".join(
            encode_attribute(kind, value) for kind, value in self.attrs
        )
        return NetlinkMessage(self.family, flags, seq, pid, payload).encode()


def _check_name(name: str, what: str) -> None:
    if not name or "\0" in name:
        raise ConfigError(f"{what} {name!r} must be non-empty and free of NUL")


def split_handle(mgmtdev: str) -> tuple[str | None, str]:
    """Split a management device handle, ``bus/device`` or ``device``, as the vdpa tool does."""
    parts = mgmtdev.split("/")
    if len(parts) > 2:
        raise ConfigError(f"management device {mgmtdev!r} is neither 'bus/device' nor 'device'")
    for part in parts:
        _check_name(part, "management device")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def _handle_attrs(mgmtdev: str) -> tuple[tuple[int, bytes], ...]:
    bus, device = split_handle(mgmtdev)
    attrs = [] if bus is None else [(int(VdpaAttr.MGMTDEV_BUS_NAME), _string(bus))]
    attrs.append((int(VdpaAttr.MGMTDEV_DEV_NAME), _string(device)))
    return tuple(attrs)


def family_request() -> NetlinkRequest:
    """CTRL_CMD_GETFAMILY for the vdpa family."""
    return NetlinkRequest(
        Operation.RESOLVE_FAMILY,
        GENL_ID_CTRL,
        CtrlCommand.GETFAMILY,
        ((CtrlAttr.FAMILY_NAME, _string(VDPA_GENL_NAME)),),
        reply_command=CtrlCommand.NEWFAMILY,
        version=1,
    )


def add_device_request(family: int, name: str, mgmtdev: str = "vduse") -> NetlinkRequest:
    """VDPA_CMD_DEV_NEW: create vDPA device ``name`` on ``mgmtdev``."""
    _check_name(name, "vDPA device name")
    attrs = (*_handle_attrs(mgmtdev), (int(VdpaAttr.DEV_NAME), _string(name)))
    return NetlinkRequest(
        Operation.ADD_DEVICE, family, VdpaCommand.DEV_NEW, attrs, name=name, mgmtdev=mgmtdev
    )


def delete_device_request(family: int, name: str) -> NetlinkRequest:
    """VDPA_CMD_DEV_DEL: remove vDPA device ``name``."""
    _check_name(name, "vDPA device name")
    attrs = ((int(VdpaAttr.DEV_NAME), _string(name)),)
    return NetlinkRequest(Operation.DELETE_DEVICE, family, VdpaCommand.DEV_DEL, attrs, name=name)


def get_device_request(family: int, name: str | None = None) -> NetlinkRequest:
    """VDPA_CMD_DEV_GET for ``name``, or a dump of every device."""
    if name is None:
        return NetlinkRequest(
            Operation.LIST_DEVICES,
            family,
            VdpaCommand.DEV_GET,
            dump=True,
            reply_command=VdpaCommand.DEV_NEW,
        )
    _check_name(name, "vDPA device name")
    return NetlinkRequest(
        Operation.GET_DEVICE,
        family,
        VdpaCommand.DEV_GET,
        ((int(VdpaAttr.DEV_NAME), _string(name)),),
        reply_command=VdpaCommand.DEV_NEW,
        name=name,
    )


def get_mgmtdev_request(family: int, mgmtdev: str | None = None) -> NetlinkRequest:
    """VDPA_CMD_MGMTDEV_GET for one handle, or a dump of every management device."""
    if mgmtdev is None:
        return NetlinkRequest(
            Operation.LIST_MGMTDEVS,
            family,
            VdpaCommand.MGMTDEV_GET,
            dump=True,
            reply_command=VdpaCommand.MGMTDEV_NEW,
        )
    return NetlinkRequest(
        Operation.GET_MGMTDEV,
        family,
        VdpaCommand.MGMTDEV_GET,
        _handle_attrs(mgmtdev),
        reply_command=VdpaCommand.MGMTDEV_NEW,
        mgmtdev=mgmtdev,
    )


def get_config_request(family: int, name: str) -> NetlinkRequest:
    """VDPA_CMD_DEV_CONFIG_GET: the config space of ``name`` as the kernel reads it."""
    _check_name(name, "vDPA device name")
    return NetlinkRequest(
        Operation.GET_CONFIG,
        family,
        VdpaCommand.DEV_CONFIG_GET,
        ((int(VdpaAttr.DEV_NAME), _string(name)),),
        reply_command=VdpaCommand.DEV_CONFIG_GET,
        name=name,
    )


# --- replies ---------------------------------------------------------------


#: The largest errno the kernel returns (``MAX_ERRNO``, include/linux/err.h).
_MAX_ERRNO = 4095


def _error_payload(message: NetlinkMessage) -> tuple[int, str | None]:
    """The errno and extended-ack text of an NLMSG_ERROR or NLMSG_DONE message."""
    payload = message.payload
    if len(payload) < _ERROR_FIELD.size:
        raise NetlinkProtocolError(f"{NlmsgType(message.type).name} message without an error code")
    (error,) = _ERROR_FIELD.unpack_from(payload)
    if error > 0:
        raise NetlinkProtocolError(f"{NlmsgType(message.type).name} carries positive error {error}")
    if -error > _MAX_ERRNO:
        raise NetlinkProtocolError(
            f"{NlmsgType(message.type).name} carries error {error}, beyond any errno"
        )
    if not message.flags & _NLM_F_ACK_TLVS:
        return -error, None
    start = _ERROR_FIELD.size
    if message.type == NlmsgType.ERROR:
        # The request's header (and, unless capped, its payload) comes back first.
        if len(payload) < start + NLMSG_HEADER.size:
            raise NetlinkProtocolError("error message too short for the request it answers")
        (echoed,) = _U32.unpack_from(payload, start)
        if message.flags & _NLM_F_CAPPED:
            echoed = NLMSG_HEADER.size
        if echoed < NLMSG_HEADER.size or start + echoed > len(payload):
            raise NetlinkProtocolError(f"error message echoes a request of {echoed} bytes")
        start += _align(echoed)
    return -error, parse_attributes(payload[start:]).string(_NLMSGERR_ATTR_MSG)


class ReplyCollector:
    """The answers to one request, fed datagram by datagram (sans-I/O).

    Messages with another sequence number are stale and skipped.  An error
    from the kernel raises its :class:`VdpaNetlinkError` (from
    :func:`vdpa_error`); anything malformed or out of place raises
    :class:`NetlinkProtocolError`.
    """

    def __init__(self, request: NetlinkRequest, seq: int) -> None:
        self.request = request
        self.seq = seq
        self.replies: list[GenericMessage] = []
        self.done = False

    def feed(self, datagram: bytes) -> bool:
        """Take one datagram; True once the exchange is complete."""
        for message in decode_messages(datagram):
            if self.done:
                break
            if message.seq == self.seq:
                self._take(message)
        return self.done

    def _take(self, message: NetlinkMessage) -> None:
        request = self.request
        if message.type in (NlmsgType.ERROR, NlmsgType.DONE):
            if message.type == NlmsgType.DONE and not request.dump:
                raise NetlinkProtocolError("NLMSG_DONE answers a request that was not a dump")
            code, extack = _error_payload(message)
            if code:
                raise vdpa_error(
                    request.operation,
                    code,
                    name=request.name,
                    mgmtdev=request.mgmtdev,
                    extack=extack,
                )
            self.done = True
        elif message.type == NlmsgType.NOOP:
            return
        elif message.type == request.family:
            self._take_data(message)
        else:
            raise NetlinkProtocolError(f"unexpected netlink message type {message.type:#x}")

    def _take_data(self, message: NetlinkMessage) -> None:
        request = self.request
        if request.reply_command is None:
            raise NetlinkProtocolError(f"{request.operation.name} takes no data reply")
        if request.dump and not message.flags & NetlinkFlag.MULTI:
            raise NetlinkProtocolError("a dump reply lacks NLM_F_MULTI")
        reply = GenericMessage.decode(message)
        if reply.command != request.reply_command:
            raise NetlinkProtocolError(
                f"reply command {reply.command}, expected {request.reply_command}"
            )
        self.replies.append(reply)


def decode_family_id(reply: GenericMessage) -> int:
    """The vdpa family's message type from the controller's answer."""
    attrs = reply.attrs
    name = attrs.required(attrs.string(CtrlAttr.FAMILY_NAME), CtrlAttr.FAMILY_NAME)
    if name != VDPA_GENL_NAME:
        raise NetlinkProtocolError(f"the controller answered for family {name!r}")
    family = attrs.required(attrs.u16(CtrlAttr.FAMILY_ID), CtrlAttr.FAMILY_ID)
    if family < GENL_ID_CTRL:
        raise NetlinkProtocolError(f"family id {family} is a reserved message type")
    return family


def _handle(bus: str | None, device: str) -> str:
    return device if bus is None else f"{bus}/{device}"


@dataclass(frozen=True, slots=True)
class MgmtDev:
    """A vDPA management device (``vdpa mgmtdev show``)."""

    bus_name: str | None
    dev_name: str
    supported_classes: int
    max_supported_vqs: int | None
    supported_features: int | None

    @property
    def handle(self) -> str:
        """``bus/device``, or ``device`` without a bus (``vduse``)."""
        return _handle(self.bus_name, self.dev_name)

    @property
    def classes(self) -> tuple[int, ...]:
        """The virtio device ids it can create."""
        return tuple(i for i in range(64) if self.supported_classes >> i & 1)

    @classmethod
    def from_reply(cls, reply: GenericMessage) -> Self:
        """Read a MGMTDEV_GET answer."""
        a = reply.attrs
        return cls(
            bus_name=a.string(VdpaAttr.MGMTDEV_BUS_NAME),
            dev_name=a.required(a.string(VdpaAttr.MGMTDEV_DEV_NAME), VdpaAttr.MGMTDEV_DEV_NAME),
            supported_classes=a.u64(VdpaAttr.MGMTDEV_SUPPORTED_CLASSES) or 0,
            max_supported_vqs=a.u32(VdpaAttr.DEV_MGMTDEV_MAX_VQS),
            supported_features=a.u64(VdpaAttr.DEV_SUPPORTED_FEATURES),
        )


@dataclass(frozen=True, slots=True)
class VdpaDevice:
    """A vDPA device on the bus (``vdpa dev show``)."""

    name: str
    mgmtdev: str
    device_id: int
    vendor_id: int
    max_vqs: int
    max_vq_size: int
    min_vq_size: int | None

    @classmethod
    def from_reply(cls, reply: GenericMessage) -> Self:
        """Read a DEV_GET answer."""
        a = reply.attrs
        bus = a.string(VdpaAttr.MGMTDEV_BUS_NAME)
        device = a.required(a.string(VdpaAttr.MGMTDEV_DEV_NAME), VdpaAttr.MGMTDEV_DEV_NAME)
        return cls(
            name=a.required(a.string(VdpaAttr.DEV_NAME), VdpaAttr.DEV_NAME),
            mgmtdev=_handle(bus, device),
            device_id=a.required(a.u32(VdpaAttr.DEV_ID), VdpaAttr.DEV_ID),
            vendor_id=a.required(a.u32(VdpaAttr.DEV_VENDOR_ID), VdpaAttr.DEV_VENDOR_ID),
            max_vqs=a.required(a.u32(VdpaAttr.DEV_MAX_VQS), VdpaAttr.DEV_MAX_VQS),
            max_vq_size=a.required(a.u16(VdpaAttr.DEV_MAX_VQ_SIZE), VdpaAttr.DEV_MAX_VQ_SIZE),
            min_vq_size=a.u16(VdpaAttr.DEV_MIN_VQ_SIZE),
        )


_MAC_SIZE = 6


@dataclass(frozen=True, slots=True)
class VdpaDeviceConfig:
    """A device's config as the kernel reads it (``vdpa dev config show``; net fields only)."""

    name: str
    device_id: int
    mac: bytes | None
    status: int | None
    mtu: int | None
    max_vq_pairs: int | None
    negotiated_features: int | None

    @classmethod
    def from_reply(cls, reply: GenericMessage) -> Self:
        """Read a DEV_CONFIG_GET answer."""
        a = reply.attrs
        mac = a.raw(VdpaAttr.DEV_NET_CFG_MACADDR)
        if mac is not None and len(mac) != _MAC_SIZE:
            raise NetlinkProtocolError(f"MAC address attribute has {len(mac)} bytes")
        return cls(
            name=a.required(a.string(VdpaAttr.DEV_NAME), VdpaAttr.DEV_NAME),
            device_id=a.required(a.u32(VdpaAttr.DEV_ID), VdpaAttr.DEV_ID),
            mac=mac,
            status=a.u16(VdpaAttr.DEV_NET_STATUS),
            mtu=a.u16(VdpaAttr.DEV_NET_CFG_MTU),
            max_vq_pairs=a.u16(VdpaAttr.DEV_NET_CFG_MAX_VQP),
            negotiated_features=a.u64(VdpaAttr.DEV_NEGOTIATED_FEATURES),
        )


# --- the socket ------------------------------------------------------------


class VdpaNetlink:
    """A generic netlink socket talking to the vdpa family.

    Opening resolves the family (:class:`VdpaFamilyMissingError` when the
    kernel has none here).  ``timeout`` bounds each wait for an answer; the
    default waits forever, since adding a VDUSE device waits for its daemon.
    """

    def __init__(self, *, timeout: float | None = None) -> None:
        try:
            self._sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC
            )
        except OSError as exc:
            raise vdpa_error(Operation.OPEN, exc.errno or errno.EIO) from None
        try:
            self._sock.settimeout(timeout)
            self._sock.bind((0, 0))
            for option in (_NETLINK_CAP_ACK, _NETLINK_EXT_ACK):
                # Older kernels lack them: plain acks, no error text.
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(_SOL_NETLINK, option, 1)
            self._seq = itertools.count(1)
            self.family = decode_family_id(self._one(family_request()))
        except OSError as exc:
            self._sock.close()
            raise vdpa_error(Operation.OPEN, exc.errno or errno.EIO) from None
        except BaseException:
            self._sock.close()
            raise

    def _exchange(self, request: NetlinkRequest) -> list[GenericMessage]:
        seq = next(self._seq)
        collector = ReplyCollector(request, seq)
        try:
            self._sock.sendto(request.encode(seq), (0, 0))
            while True:
                datagram, _anc, flags, sender = self._sock.recvmsg(_RECV_SIZE)
                if flags & socket.MSG_TRUNC:
                    raise NetlinkProtocolError(f"a datagram exceeded {_RECV_SIZE} bytes")
                if sender[0] == 0 and collector.feed(datagram):
                    return collector.replies
        except TimeoutError:
            code = errno.ETIMEDOUT
        except OSError as exc:
            code = exc.errno or errno.EIO
        raise vdpa_error(request.operation, code, name=request.name, mgmtdev=request.mgmtdev)

    def _one(self, request: NetlinkRequest) -> GenericMessage:
        replies = self._exchange(request)
        if len(replies) != 1:
            raise NetlinkProtocolError(
                f"{request.operation.name} got {len(replies)} replies, expected one"
            )
        return replies[0]

    def add_device(self, name: str, mgmtdev: str = "vduse") -> None:
        """``vdpa dev add name NAME mgmtdev MGMTDEV``."""
        self._exchange(add_device_request(self.family, name, mgmtdev))

    def delete_device(self, name: str) -> None:
        """``vdpa dev del NAME``."""
        self._exchange(delete_device_request(self.family, name))

    def get_device(self, name: str) -> VdpaDevice:
        """``vdpa dev show NAME``."""
        return VdpaDevice.from_reply(self._one(get_device_request(self.family, name)))

    def list_devices(self) -> list[VdpaDevice]:
        """``vdpa dev show``: every device created through a management device."""
        replies = self._exchange(get_device_request(self.family))
        return [VdpaDevice.from_reply(reply) for reply in replies]

    def get_mgmtdev(self, mgmtdev: str) -> MgmtDev:
        """``vdpa mgmtdev show MGMTDEV``."""
        return MgmtDev.from_reply(self._one(get_mgmtdev_request(self.family, mgmtdev)))

    def list_mgmtdevs(self) -> list[MgmtDev]:
        """``vdpa mgmtdev show``."""
        replies = self._exchange(get_mgmtdev_request(self.family))
        return [MgmtDev.from_reply(reply) for reply in replies]

    def device_config(self, name: str) -> VdpaDeviceConfig:
        """``vdpa dev config show NAME`` (net devices, after feature negotiation)."""
        return VdpaDeviceConfig.from_reply(self._one(get_config_request(self.family, name)))

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def add_device(name: str, mgmtdev: str = "vduse") -> None:
    """Put device ``name`` on the vDPA bus through management device ``mgmtdev``."""
    with VdpaNetlink() as nl:
        nl.add_device(name, mgmtdev)


def delete_device(name: str) -> None:
    """Take vDPA device ``name`` off the bus."""
    with VdpaNetlink() as nl:
        nl.delete_device(name)


def list_mgmtdevs() -> list[MgmtDev]:
    """Every vDPA management device."""
    with VdpaNetlink() as nl:
        return nl.list_mgmtdevs()


def list_devices() -> list[VdpaDevice]:
    """Every vDPA device created through a management device."""
    with VdpaNetlink() as nl:
        return nl.list_devices()
