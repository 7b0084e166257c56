"""The sans-I/O vhost-user codec: bytes and fds in, typed messages out, and back.

Theory of operation (QEMU ``docs/interop/vhost-user.rst``: "Message
Specification", "Communication", "Front-end message types", "Back-end
message types", "REPLY_ACK"):

A message is a 12-byte header (``request``, ``flags``, ``size``, native byte
order) followed by ``size`` payload bytes; fds travel as SCM_RIGHTS with the
header.  The codec knows nothing of sockets.  The transport reads a header
and hands it to :func:`decode_header`; once it has read ``size`` more bytes
and collected the fds, one of the ``decode_*`` functions turns them into a
:class:`Message`.  :func:`encode` goes the other way.

Every request is described once, in :data:`REQUESTS` (front-end requests)
and :data:`BACKEND_REQUESTS` (back-end requests, on the SET_BACKEND_REQ_FD
channel): payload types, the fds it may carry (:class:`FdRule`), whether
and how it is answered (:class:`ReplyRule`), and the protocol features that
must have been negotiated before it may be sent.

A request is validated in a fixed order, so that a given malformed message
always fails the same way:

1. the header (:func:`decode_header`: version 1, no reserved flag, size
   capped) and the body length it announces;
2. the request code is known;
3. the REPLY flag is clear;
4. the number of fds is within what the request allows;
5. the payload has the exact size of one of the request's payload types;
6. the payload is valid, and agrees with the fds (one per memory region,
   none when NOFD is set...).

Feature gates depend on connection state, so they are a separate step
(:func:`check_gate`) that the back-end's dispatcher calls after decoding.

Errors in the header or the body length desynchronise the stream and carry
``drop_connection=True``, and so does the REPLY flag on a request: a peer
that answers where it should ask has lost track of the conversation, and
neither a reply to it nor silence would bring the two sides back in step.
Any later error leaves the framing intact, so the request can be refused
(with a non-zero REPLY_ACK) and the connection go on.
A reply that does not match its request is fatal, as in QEMU.

fd ownership: the codec never closes or duplicates an fd.  The ``fds``
given to a ``decode_*`` function stay owned by the caller, who must close
them when decoding raises, and who keeps them (as ``Message.fds``)
otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from pyvdpa.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pyvdpa.vhost_user.messages import (
    MAX_CONFIG_SIZE,
    U64,
    AsymSessionSetup,
    ConfigSpace,
    ConfigType,
    CryptoSession,
    CryptoSessionOp,
    DeviceStateTransfer,
    Inflight,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    LegacyCryptoSession,
    LogArea,
    MemTable,
    MigrationPhase,
    NoPayload,
    Payload,
    PayloadSizeError,
    SharedObject,
    SingleMemRegion,
    SymSessionSetup,
    TransferDirection,
    VringAddr,
    VringAddrFlags,
    VringArea,
    VringFile,
    VringState,
)
from pyvdpa.vhost_user.protocol import (
    HEADER_SIZE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    VRING_NOFD_MASK,
    BackendRequest,
    HeaderFlags,
    ProtocolFeature,
    Request,
)

__all__ = [
    "BACKEND_REQUESTS",
    "HEADER",
    "MAX_CONFIG_SIZE",
    "REQUESTS",
    "U64",
    "AsymSessionSetup",
    "ConfigSpace",
    "ConfigType",
    "CryptoSession",
    "CryptoSessionOp",
    "DeviceStateTransfer",
    "FdRule",
    "Header",
    "Inflight",
    "IotlbMsg",
    "IotlbPerm",
    "IotlbType",
    "LegacyCryptoSession",
    "LogArea",
    "MemTable",
    "Message",
    "MigrationPhase",
    "NoPayload",
    "Payload",
    "PayloadSizeError",
    "ReplyRule",
    "RequestSpec",
    "SharedObject",
    "SingleMemRegion",
    "SymSessionSetup",
    "TransferDirection",
    "VringAddr",
    "VringAddrFlags",
    "VringArea",
    "VringFile",
    "VringState",
    "check_gate",
    "decode_backend_reply",
    "decode_backend_request",
    "decode_header",
    "decode_reply",
    "decode_reply_ack",
    "decode_request",
    "encode",
    "encode_ack_failure",
    "encode_backend_reply",
    "encode_reply",
    "has_reply",
]

#: The header: request, flags, size.
HEADER = struct.Struct("=III")

# Masks are plain ints: inverting an IntFlag keeps only its defined bits,
# which would hide exactly the unknown bits these masks exist to find.
_VERSION_MASK = 0x3
_VERSION = int(HeaderFlags.VERSION)
_KNOWN_FLAGS = _VERSION_MASK | int(HeaderFlags.REPLY) | int(HeaderFlags.NEED_REPLY)
_NEED_REPLY = int(HeaderFlags.NEED_REPLY)
_REPLY_FLAGS = HeaderFlags.VERSION | HeaderFlags.REPLY
_NO_GATE = ProtocolFeature(0)
#: Bits of SET_DEVICE_STATE_FD's reply: an error code and NOFD.
_STATE_FD_ERROR_MASK = 0xFF

_AnyRequest = Request | BackendRequest


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded message header."""

    request: int
    flags: HeaderFlags
    size: int


@dataclass(frozen=True, slots=True)
class Message:
    """One vhost-user message: a request or a reply, its payload and its fds."""

    request: Request | BackendRequest
    payload: Payload
    flags: HeaderFlags = HeaderFlags.VERSION
    fds: tuple[int, ...] = ()


class FdRule(Enum):
    """How many fds a message may carry (``(min, max, description)``)."""

    NONE = (0, 0, "no fds")
    ONE = (1, 1, "exactly one fd")
    #: REM_MEM_REG: none should come, but one is tolerated; the caller closes it unused.
    UNUSED = (0, 1, "at most one fd, left unused")
    #: SET_VRING_KICK/CALL/ERR, host notifiers, SET_DEVICE_STATE_FD's reply.
    UNLESS_NOFD = (0, 1, "one fd unless the NOFD bit is set")
    #: The lower bound is 0 so that an empty table is refused for what it is.
    PER_REGION = (0, MAX_MEM_REGIONS, "one fd per memory region")
    #: GET_INFLIGHT_FD's reply: an empty area (a refusal) comes without one.
    IF_MAPPED = (0, 1, "one fd unless the area is empty")
    #: GET_SHARED_OBJECT's reply: the dma-buf fd comes with a zero status only.
    IF_SUCCESS = (0, 1, "one fd on success, none on failure")

    @property
    def min(self) -> int:
        """Fewest fds allowed."""
        return int(self.value[0])

    @property
    def max(self) -> int:
        """Most fds allowed."""
        return int(self.value[1])

    @property
    def description(self) -> str:
        """The rule in words, for error messages."""
        return str(self.value[2])


class ReplyRule(Enum):
    """When the receiver of a request answers."""

    #: Only with REPLY_ACK negotiated and NEED_REPLY set: a u64, 0 on success.
    ACK = "u64 acknowledgement when NEED_REPLY is set"
    #: Always, with the request's own reply payload, whatever the flags.
    ALWAYS = "its own reply, always"
    #: Its own reply once POSTCOPY_LISTEN was received; otherwise as ACK.
    POSTCOPY = "its own reply in postcopy mode, otherwise as ACK"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """Everything the protocol says about one request.

    ``payloads`` are the request's payload types, told apart by size;
    ``reply_payloads`` those of its own reply (for :attr:`ReplyRule.ALWAYS`
    and :attr:`ReplyRule.POSTCOPY`).  ``gate`` holds the protocol features
    that must all have been negotiated.  ``check`` and ``reply_check`` add
    rules that belong to the request rather than to the payload type.
    """

    payloads: tuple[type[Payload], ...]
    fds: FdRule = FdRule.NONE
    reply: ReplyRule = ReplyRule.ACK
    reply_payloads: tuple[type[Payload], ...] = ()
    reply_fds: FdRule = FdRule.NONE
    gate: ProtocolFeature = _NO_GATE
    check: Callable[[Payload], None] | None = None
    reply_check: Callable[[Payload], None] | None = None


def _vring_file(payload: Payload) -> None:
    if isinstance(payload, U64):
        VringFile.from_u64(payload.value)


def _zero_or_one(payload: Payload) -> None:
    if isinstance(payload, VringState) and payload.num not in (0, 1):
        raise ValueError(f"num {payload.num} is not 0 or 1")


def _reserved_num(payload: Payload) -> None:
    if isinstance(payload, VringState) and payload.num != 0:
        raise ValueError(f"reserved num is {payload.num}, expected 0")


def _frontend_iotlb(payload: Payload) -> None:
    if isinstance(payload, IotlbMsg) and payload.type not in (
        IotlbType.UPDATE,
        IotlbType.INVALIDATE,
    ):
        raise ValueError(f"the front-end sends UPDATE or INVALIDATE, not {payload.type.name}")


def _backend_iotlb(payload: Payload) -> None:
    if isinstance(payload, IotlbMsg) and payload.type not in (
        IotlbType.MISS,
        IotlbType.ACCESS_FAIL,
    ):
        raise ValueError(f"the back-end sends MISS or ACCESS_FAIL, not {payload.type.name}")


def _device_status(payload: Payload) -> None:
    # The virtio device status field is one byte.
    if isinstance(payload, U64) and payload.value > 0xFF:
        raise ValueError(f"device status {payload.value:#x} does not fit in 8 bits")


def _state_fd_result(payload: Payload) -> None:
    if not isinstance(payload, U64):
        return
    extra = payload.value & ~(_STATE_FD_ERROR_MASK | VRING_NOFD_MASK)
    if extra:
        raise ValueError(f"result {payload.value:#x} sets reserved bits {extra:#x}")
    if payload.value & _STATE_FD_ERROR_MASK and not payload.value & VRING_NOFD_MASK:
        raise ValueError("an error result must not come with an fd")


_PF = ProtocolFeature
_R = Request
_B = BackendRequest
_NONE = (NoPayload,)
_U64 = (U64,)
_STATE = (VringState,)
_CRYPTO = (CryptoSession, LegacyCryptoSession)

#: Front-end requests (vhost-user spec, "Front-end message types").
REQUESTS: Mapping[Request, RequestSpec] = MappingProxyType(
    {
        _R.GET_FEATURES: RequestSpec(_NONE, reply=ReplyRule.ALWAYS, reply_payloads=_U64),
        _R.SET_FEATURES: RequestSpec(_U64),
        _R.SET_OWNER: RequestSpec(_NONE),
        _R.RESET_OWNER: RequestSpec(_NONE),
        # QEMU acknowledges a postcopy reply with an 8-byte SET_MEM_TABLE, byte for
        # byte an empty table; telling them apart takes connection state, so both fail.
        _R.SET_MEM_TABLE: RequestSpec(
            (MemTable,),
            FdRule.PER_REGION,
            ReplyRule.POSTCOPY,
            reply_payloads=(MemTable,),
        ),
        # Implementations reply with an empty payload (DPDK) or a u64 0 (libvhost-user).
        _R.SET_LOG_BASE: RequestSpec(
            (LogArea,),
            FdRule.ONE,
            ReplyRule.ALWAYS,
            reply_payloads=(U64, NoPayload),
            gate=_PF.LOG_SHMFD,
        ),
        _R.SET_LOG_FD: RequestSpec(_NONE, FdRule.ONE),
        _R.SET_VRING_NUM: RequestSpec(_STATE),
        _R.SET_VRING_ADDR: RequestSpec((VringAddr,)),
        _R.SET_VRING_BASE: RequestSpec(_STATE),
        # num is reserved, but not every front-end zeroes it: not checked.
        _R.GET_VRING_BASE: RequestSpec(_STATE, reply=ReplyRule.ALWAYS, reply_payloads=_STATE),
        _R.SET_VRING_KICK: RequestSpec(_U64, FdRule.UNLESS_NOFD, check=_vring_file),
        _R.SET_VRING_CALL: RequestSpec(_U64, FdRule.UNLESS_NOFD, check=_vring_file),
        _R.SET_VRING_ERR: RequestSpec(_U64, FdRule.UNLESS_NOFD, check=_vring_file),
        _R.GET_PROTOCOL_FEATURES: RequestSpec(_NONE, reply=ReplyRule.ALWAYS, reply_payloads=_U64),
        _R.SET_PROTOCOL_FEATURES: RequestSpec(_U64),
        _R.GET_QUEUE_NUM: RequestSpec(
            _NONE, reply=ReplyRule.ALWAYS, reply_payloads=_U64, gate=_PF.MQ
        ),
        _R.SET_VRING_ENABLE: RequestSpec(_STATE, check=_zero_or_one),
        _R.SEND_RARP: RequestSpec(_U64, gate=_PF.RARP),
        _R.NET_SET_MTU: RequestSpec(_U64, gate=_PF.NET_MTU),
        _R.SET_BACKEND_REQ_FD: RequestSpec(_NONE, FdRule.ONE, gate=_PF.BACKEND_REQ),
        # QEMU requires BACKEND_REQ (to report misses) and REPLY_ACK with an IOMMU.
        _R.IOTLB_MSG: RequestSpec(
            (IotlbMsg,),
            reply=ReplyRule.ALWAYS,
            reply_payloads=_U64,
            gate=_PF.BACKEND_REQ | _PF.REPLY_ACK,
            check=_frontend_iotlb,
        ),
        _R.SET_VRING_ENDIAN: RequestSpec(_STATE, gate=_PF.CROSS_ENDIAN, check=_zero_or_one),
        # An empty reply is the back-end's way to report failure.
        _R.GET_CONFIG: RequestSpec(
            (ConfigSpace,),
            reply=ReplyRule.ALWAYS,
            reply_payloads=(ConfigSpace, NoPayload),
            gate=_PF.CONFIG,
        ),
        _R.SET_CONFIG: RequestSpec((ConfigSpace,), gate=_PF.CONFIG),
        _R.CREATE_CRYPTO_SESSION: RequestSpec(
            _CRYPTO,
            reply=ReplyRule.ALWAYS,
            reply_payloads=_CRYPTO,
            gate=_PF.CRYPTO_SESSION,
        ),
        _R.CLOSE_CRYPTO_SESSION: RequestSpec(_U64, gate=_PF.CRYPTO_SESSION),
        _R.POSTCOPY_ADVISE: RequestSpec(
            _NONE,
            reply=ReplyRule.ALWAYS,
            reply_payloads=_NONE,
            reply_fds=FdRule.ONE,
            gate=_PF.PAGEFAULT,
        ),
        _R.POSTCOPY_LISTEN: RequestSpec(_NONE, gate=_PF.PAGEFAULT),
        _R.POSTCOPY_END: RequestSpec(
            _NONE, reply=ReplyRule.ALWAYS, reply_payloads=_U64, gate=_PF.PAGEFAULT
        ),
        _R.GET_INFLIGHT_FD: RequestSpec(
            (Inflight,),
            reply=ReplyRule.ALWAYS,
            reply_payloads=(Inflight,),
            reply_fds=FdRule.IF_MAPPED,
            gate=_PF.INFLIGHT_SHMFD,
        ),
        _R.SET_INFLIGHT_FD: RequestSpec((Inflight,), FdRule.ONE, gate=_PF.INFLIGHT_SHMFD),
        _R.GPU_SET_SOCKET: RequestSpec(_NONE, FdRule.ONE),
        _R.RESET_DEVICE: RequestSpec(_NONE, gate=_PF.RESET_DEVICE),
        _R.VRING_KICK: RequestSpec(_STATE, gate=_PF.INBAND_NOTIFICATIONS, check=_reserved_num),
        _R.GET_MAX_MEM_SLOTS: RequestSpec(
            _NONE,
            reply=ReplyRule.ALWAYS,
            reply_payloads=_U64,
            gate=_PF.CONFIGURE_MEM_SLOTS,
        ),
        _R.ADD_MEM_REG: RequestSpec(
            (SingleMemRegion,),
            FdRule.ONE,
            ReplyRule.POSTCOPY,
            reply_payloads=(SingleMemRegion,),
            gate=_PF.CONFIGURE_MEM_SLOTS,
        ),
        _R.REM_MEM_REG: RequestSpec(
            (SingleMemRegion,), FdRule.UNUSED, gate=_PF.CONFIGURE_MEM_SLOTS
        ),
        _R.SET_STATUS: RequestSpec(_U64, gate=_PF.STATUS, check=_device_status),
        _R.GET_STATUS: RequestSpec(
            _NONE, reply=ReplyRule.ALWAYS, reply_payloads=_U64, gate=_PF.STATUS
        ),
        _R.GET_SHARED_OBJECT: RequestSpec(
            (SharedObject,),
            reply=ReplyRule.ALWAYS,
            reply_payloads=_U64,
            reply_fds=FdRule.IF_SUCCESS,
            gate=_PF.SHARED_OBJECT,
        ),
        # The reply's bits 0-7 are an error code and bit 8 is NOFD.
        _R.SET_DEVICE_STATE_FD: RequestSpec(
            (DeviceStateTransfer,),
            FdRule.ONE,
            ReplyRule.ALWAYS,
            reply_payloads=_U64,
            reply_fds=FdRule.UNLESS_NOFD,
            gate=_PF.DEVICE_STATE,
            reply_check=_state_fd_result,
        ),
        _R.CHECK_DEVICE_STATE: RequestSpec(
            _NONE, reply=ReplyRule.ALWAYS, reply_payloads=_U64, gate=_PF.DEVICE_STATE
        ),
    }
)

#: Back-end requests (vhost-user spec, "Back-end message types").
BACKEND_REQUESTS: Mapping[BackendRequest, RequestSpec] = MappingProxyType(
    {
        _B.IOTLB_MSG: RequestSpec((IotlbMsg,), gate=_PF.BACKEND_REQ, check=_backend_iotlb),
        _B.CONFIG_CHANGE_MSG: RequestSpec(_NONE, gate=_PF.BACKEND_REQ | _PF.CONFIG),
        # The fd is a mapping of the notify area; sending fds needs BACKEND_SEND_FD.
        _B.VRING_HOST_NOTIFIER_MSG: RequestSpec(
            (VringArea,),
            FdRule.UNLESS_NOFD,
            gate=_PF.BACKEND_REQ | _PF.BACKEND_SEND_FD | _PF.HOST_NOTIFIER,
        ),
        _B.VRING_CALL: RequestSpec(
            _STATE, gate=_PF.BACKEND_REQ | _PF.INBAND_NOTIFICATIONS, check=_reserved_num
        ),
        _B.VRING_ERR: RequestSpec(
            _STATE, gate=_PF.BACKEND_REQ | _PF.INBAND_NOTIFICATIONS, check=_reserved_num
        ),
    }
)


def _spec(request: _AnyRequest) -> RequestSpec:
    # Both enums are IntEnums sharing values: look up by type, never by value alone.
    if isinstance(request, BackendRequest):
        return BACKEND_REQUESTS[request]
    return REQUESTS[request]


def _name(request: _AnyRequest) -> str:
    if isinstance(request, BackendRequest):
        return f"BACKEND_{request.name}"
    return request.name


def has_reply(request: Request | BackendRequest) -> bool:
    """Whether ``request`` is always answered with a reply of its own.

    Other requests are answered only with a REPLY_ACK u64, when NEED_REPLY
    is set (SET_MEM_TABLE and ADD_MEM_REG also answer with their own reply
    in postcopy mode, which the caller tracks).
    """
    return _spec(request).reply is ReplyRule.ALWAYS


def check_gate(request: Request | BackendRequest, protocol_features: ProtocolFeature) -> None:
    """Raise :class:`RemoteProtocolError` unless ``request``'s protocol features were negotiated."""
    missing = int(_spec(request).gate) & ~int(protocol_features)
    if missing:
        raise RemoteProtocolError(
            f"{_name(request)}: needs protocol feature {ProtocolFeature(missing).name}, "
            "which was not negotiated"
        )


def decode_header(data: bytes) -> Header:
    """Decode a 12-byte header.

    Version bits must be 1, reserved flags clear and ``size`` at most
    ``MAX_PAYLOAD_SIZE``; any failure raises :class:`RemoteProtocolError`
    with ``drop_connection=True``, since the stream cannot be resynchronised.
    """
    if len(data) != HEADER_SIZE:
        raise RemoteProtocolError(
            f"header is {len(data)} bytes, expected {HEADER_SIZE}", drop_connection=True
        )
    request, flags, size = HEADER.unpack(data)
    if flags & _VERSION_MASK != _VERSION:
        raise RemoteProtocolError(
            f"request {request}: header version {flags & _VERSION_MASK}, expected 1",
            drop_connection=True,
        )
    reserved = flags & ~_KNOWN_FLAGS
    if reserved:
        raise RemoteProtocolError(
            f"request {request}: reserved header flags {reserved:#x} set", drop_connection=True
        )
    if size > MAX_PAYLOAD_SIZE:
        raise RemoteProtocolError(
            f"request {request}: payload size {size} exceeds {MAX_PAYLOAD_SIZE}",
            drop_connection=True,
        )
    return Header(request, HeaderFlags(flags), size)


def _check_body(header: Header, body: bytes) -> None:
    if len(body) != header.size:
        raise RemoteProtocolError(
            f"request {header.request}: body is {len(body)} bytes, header announced {header.size}",
            drop_connection=True,
        )


def _check_fd_bounds(
    name: str, rule: FdRule, count: int, error: type[ProtocolError], drop: bool
) -> None:
    if rule.max == 0 and count:
        raise error(f"{name}: takes no fds, got {count}", drop_connection=drop)
    if count > rule.max:
        raise error(f"{name}: takes {rule.description}, got {count} fds", drop_connection=drop)
    if count < rule.min:
        raise error(f"{name}: needs {rule.description}, got {count} fds", drop_connection=drop)


def _expected_fds(rule: FdRule, payload: Payload) -> int | None:
    """The exact fd count a payload calls for, where the rule ties the two."""
    match rule, payload:
        case FdRule.UNLESS_NOFD, VringArea(nofd=nofd):
            return 0 if nofd else 1
        case FdRule.UNLESS_NOFD, U64(value=value):
            return 0 if value & VRING_NOFD_MASK else 1
        case FdRule.PER_REGION, MemTable(regions=regions):
            return len(regions)
        case FdRule.IF_MAPPED, Inflight(mmap_size=size):
            return 1 if size else 0
        case FdRule.IF_SUCCESS, U64(value=value):
            return 0 if value else 1
    return None


def _check_coherence(
    name: str,
    rule: FdRule,
    payload: Payload,
    count: int,
    error: type[ProtocolError],
    drop: bool,
) -> None:
    expected = _expected_fds(rule, payload)
    if expected is not None and expected != count:
        raise error(
            f"{name}: got {count} fds, expected {expected} ({rule.description})",
            drop_connection=drop,
        )


def _decode_payload(
    name: str, types: tuple[type[Payload], ...], body: bytes, drop: bool
) -> Payload:
    expected: list[str] = []
    for kind in types:
        try:
            return kind.decode(body)
        except PayloadSizeError as exc:
            expected.append(exc.expected)
        except ValueError as exc:
            raise RemoteProtocolError(f"{name}: {exc}", drop_connection=drop) from exc
    raise RemoteProtocolError(
        f"{name}: payload is {len(body)} bytes, expected {' or '.join(expected)}",
        drop_connection=drop,
    )


def _run_check(
    name: str,
    check: Callable[[Payload], None] | None,
    payload: Payload,
    error: type[ProtocolError],
    drop: bool,
) -> None:
    if check is None:
        return
    try:
        check(payload)
    except ValueError as exc:
        raise error(f"{name}: {exc}", drop_connection=drop) from exc


def _decode_request(
    request: _AnyRequest, header: Header, body: bytes, fds: Sequence[int]
) -> Message:
    spec = _spec(request)
    name = _name(request)
    if header.flags & HeaderFlags.REPLY:
        raise RemoteProtocolError(f"{name}: REPLY flag set on a request", drop_connection=True)
    _check_fd_bounds(name, spec.fds, len(fds), RemoteProtocolError, False)
    payload = _decode_payload(name, spec.payloads, body, False)
    _check_coherence(name, spec.fds, payload, len(fds), RemoteProtocolError, False)
    _run_check(name, spec.check, payload, RemoteProtocolError, False)
    return Message(request, payload, header.flags, tuple(fds))


def decode_request(header: Header, body: bytes, fds: Sequence[int]) -> Message:
    """Decode a front-end request (the back-end's side of the main socket).

    Checks, in order: body length against the header (fatal), known request,
    REPLY flag clear, fd count, exact payload size, payload validity and
    fd/payload agreement.  Raises :class:`RemoteProtocolError`; the caller
    still owns ``fds`` and must close them.
    """
    _check_body(header, body)
    try:
        request = Request(header.request)
    except ValueError:
        raise RemoteProtocolError(f"unknown request {header.request}") from None
    return _decode_request(request, header, body, fds)


def decode_backend_request(header: Header, body: bytes, fds: Sequence[int]) -> Message:
    """Decode a back-end request (the front-end's side of the back-end channel).

    Same checks and fd ownership as :func:`decode_request`.
    """
    _check_body(header, body)
    try:
        request = BackendRequest(header.request)
    except ValueError:
        raise RemoteProtocolError(f"unknown back-end request {header.request}") from None
    return _decode_request(request, header, body, fds)


def _reply_forms(spec: RequestSpec) -> tuple[tuple[type[Payload], ...], FdRule]:
    match spec.reply:
        case ReplyRule.ALWAYS:
            return spec.reply_payloads, spec.reply_fds
        case ReplyRule.POSTCOPY:
            # An 8-byte reply is the acknowledgement, not an (invalid) empty table.
            return (U64, *spec.reply_payloads), spec.reply_fds
    return _U64, FdRule.NONE


def _decode_reply(
    sent: _AnyRequest,
    header: Header,
    body: bytes,
    fds: Sequence[int],
    forms: tuple[tuple[type[Payload], ...], FdRule],
    check: Callable[[Payload], None] | None,
) -> Message:
    name = _name(sent)
    _check_body(header, body)
    if header.request != sent:
        raise RemoteProtocolError(
            f"{name}: reply is for request {header.request}", drop_connection=True
        )
    if header.flags != _REPLY_FLAGS:
        raise RemoteProtocolError(
            f"{name}: reply flags {int(header.flags):#x}, expected {int(_REPLY_FLAGS):#x}",
            drop_connection=True,
        )
    types, rule = forms
    _check_fd_bounds(name, rule, len(fds), RemoteProtocolError, True)
    payload = _decode_payload(name, types, body, True)
    _check_coherence(name, rule, payload, len(fds), RemoteProtocolError, True)
    _run_check(name, check, payload, RemoteProtocolError, True)
    return Message(sent, payload, header.flags, tuple(fds))


def decode_reply(sent: Request, header: Header, body: bytes, fds: Sequence[int]) -> Message:
    """Decode the back-end's reply to front-end request ``sent``.

    Flags must be exactly VERSION|REPLY, the request code the one sent, the
    payload one of the reply types (the request's own, or a u64 acknowledgement
    for requests without one) at its exact size, and fds only where the reply
    carries one.  GET_CONFIG's reply must also match the size asked for,
    which the caller knows; an empty GET_CONFIG reply is the back-end's
    refusal.  Failures raise :class:`RemoteProtocolError` with
    ``drop_connection=True``; the caller owns ``fds``.
    """
    spec = _spec(sent)
    return _decode_reply(sent, header, body, fds, _reply_forms(spec), spec.reply_check)


def decode_reply_ack(sent: Request, header: Header, body: bytes, fds: Sequence[int]) -> int:
    """Decode a REPLY_ACK to ``sent`` and return its u64 (0 means success).

    Same checks and failures as :func:`decode_reply`, with a u64 payload and no fds.
    """
    message = _decode_reply(sent, header, body, fds, (_U64, FdRule.NONE), None)
    assert isinstance(message.payload, U64)
    return message.payload.value


def decode_backend_reply(
    sent: BackendRequest, header: Header, body: bytes, fds: Sequence[int]
) -> Message:
    """Decode the front-end's acknowledgement of back-end request ``sent`` (a u64, no fds)."""
    spec = _spec(sent)
    return _decode_reply(sent, header, body, fds, _reply_forms(spec), spec.reply_check)


def _encode_body(
    name: str,
    payload: Payload,
    types: tuple[type[Payload], ...],
    check: Callable[[Payload], None] | None,
) -> bytes:
    if not isinstance(payload, types):
        wanted = " or ".join(kind.__name__ for kind in types)
        raise LocalProtocolError(f"{name}: payload is {type(payload).__name__}, expected {wanted}")
    try:
        body = payload.encode()
    except ValueError as exc:
        raise LocalProtocolError(f"{name}: {exc}") from exc
    _run_check(name, check, payload, LocalProtocolError, False)
    return body


def encode(message: Message) -> tuple[bytes, tuple[int, ...]]:
    """Encode a request or (with the REPLY flag) a reply; return the bytes and the fds.

    Raises :class:`LocalProtocolError` for anything :func:`decode_request`
    or :func:`decode_reply` would refuse: wrong payload type, invalid
    payload, bad flags, fds where none belong.
    """
    request = message.request
    spec = _spec(request)
    name = _name(request)
    flags = message.flags
    if flags & HeaderFlags.REPLY:
        if flags != _REPLY_FLAGS:
            raise LocalProtocolError(f"{name}: reply flags {int(flags):#x}, expected 0x5")
        types, rule = _reply_forms(spec)
        check = spec.reply_check
    else:
        if int(flags) & ~_NEED_REPLY != _VERSION:
            raise LocalProtocolError(f"{name}: request flags {int(flags):#x} are not allowed")
        types, rule, check = spec.payloads, spec.fds, spec.check
    fds = message.fds
    negative = [fd for fd in fds if fd < 0]
    if negative:
        raise LocalProtocolError(f"{name}: {negative[0]} is not an fd")
    _check_fd_bounds(name, rule, len(fds), LocalProtocolError, False)
    body = _encode_body(name, message.payload, types, check)
    _check_coherence(name, rule, message.payload, len(fds), LocalProtocolError, False)
    return HEADER.pack(request, flags, len(body)) + body, fds


def encode_reply(request: Request | BackendRequest, payload: Payload) -> bytes:
    """Encode a reply to ``request`` (flags VERSION|REPLY).

    ``payload`` must be one of the request's reply types (a :class:`U64`
    acknowledgement for requests without a reply of their own).  Fds the
    reply carries (GET_INFLIGHT_FD, POSTCOPY_ADVISE...) are sent with the
    returned bytes by the caller; use :func:`encode` to have them checked.
    """
    types, _ = _reply_forms(_spec(request))
    body = _encode_body(_name(request), payload, types, _spec(request).reply_check)
    return HEADER.pack(request, _REPLY_FLAGS, len(body)) + body


def encode_backend_reply(request: BackendRequest, value: int) -> bytes:
    """Encode the front-end's u64 acknowledgement of back-end request ``request``."""
    return encode_reply(request, U64(value))


def encode_ack_failure(request: int) -> bytes:
    """A REPLY_ACK of 1 (failure) for request code ``request``, known or not.

    A refused request still owes the acknowledgement its sender waits for,
    even when its code names no request this side knows.
    """
    body = U64(1).encode()
    return HEADER.pack(request, _REPLY_FLAGS, len(body)) + body
