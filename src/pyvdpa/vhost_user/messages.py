"""vhost-user payloads: layouts, encoding, decoding and validity.

Theory of operation (QEMU ``docs/interop/vhost-user.rst``, "Message
Specification" > "Payload", and the C structs of QEMU's
``hw/virtio/vhost-user.c``): after the 12-byte header every message carries
one packed C struct in native byte order.  Each struct is a frozen, slotted
dataclass here, with a precompiled :class:`struct.Struct` using ``=`` (native
order, no implicit alignment) and explicit ``x`` padding wherever the C
compiler pads.

Every payload type offers three operations:

* ``decode(data)`` checks the exact size first (raising
  :class:`PayloadSizeError`), then unpacks, then validates;
* ``validate()`` raises :class:`ValueError` naming the field that breaks a
  rule of the spec (a value out of range, a reserved bit set, a count that
  does not match);
* ``encode()`` validates, then packs.

Padding is written as zeros and ignored when read; pointers that QEMU copies
into crypto session structs are meaningless in another process and are
likewise ignored.  Errors here are plain :class:`ValueError` without a
request name: :mod:`pyvdpa.vhost_user.codec` turns them into
:class:`~pyvdpa.errors.RemoteProtocolError` or
:class:`~pyvdpa.errors.LocalProtocolError` naming the request.
"""

from __future__ import annotations

import abc
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, Self, TypeVar
from uuid import UUID

from pyvdpa.memory import MemoryRegion
from pyvdpa.vhost_user.protocol import (
    MAX_MEM_REGIONS,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    IotlbPerm,
    IotlbType,
)

__all__ = [
    "MAX_CONFIG_SIZE",
    "U64",
    "AsymSessionSetup",
    "ConfigSpace",
    "ConfigType",
    "CryptoSession",
    "CryptoSessionOp",
    "DeviceStateTransfer",
    "Inflight",
    "IotlbMsg",
    "IotlbPerm",
    "IotlbType",
    "LegacyCryptoSession",
    "LogArea",
    "MemTable",
    "MigrationPhase",
    "NoPayload",
    "Payload",
    "PayloadSizeError",
    "SharedObject",
    "SingleMemRegion",
    "SymSessionSetup",
    "TransferDirection",
    "VringAddr",
    "VringAddrFlags",
    "VringArea",
    "VringFile",
    "VringState",
]

#: Largest config space access (QEMU's ``VHOST_USER_MAX_CONFIG_SIZE``).
MAX_CONFIG_SIZE = 256

#: Key buffers of the crypto session structs (QEMU ``VHOST_CRYPTO_*_MAX_KEY_LEN``).
_SYM_CIPHER_KEY_MAX = 64
_SYM_AUTH_KEY_MAX = 512
_ASYM_KEY_MAX = 1024

_E = TypeVar("_E", bound=IntEnum)


class PayloadSizeError(ValueError):
    """A payload's length does not match its layout."""

    def __init__(self, actual: int, expected: str) -> None:
        super().__init__(f"payload is {actual} bytes, expected {expected}")
        self.actual = actual
        self.expected = expected


def _check_uint(value: int, bits: int, what: str) -> None:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value} does not fit in {bits} unsigned bits")


def _check_span(start: int, length: int, what: str) -> None:
    # An area that wraps past 2**64 cannot be mapped and would make every
    # later bounds check meaningless.
    if start + length > 1 << 64:
        raise ValueError(f"{what} {start:#x} + size {length:#x} wraps past 2**64")


def _member(enum: type[_E], value: int, what: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(f"{m.value} ({m.name})" for m in enum)
        raise ValueError(f"{what} {value} is not one of {allowed}") from None


def _unpack(layout: struct.Struct, data: bytes) -> tuple[Any, ...]:
    if len(data) != layout.size:
        raise PayloadSizeError(len(data), str(layout.size))
    return layout.unpack(data)


def _check_region(region: MemoryRegion) -> None:
    _check_uint(region.guest_phys_addr, 64, "guest_phys_addr")
    _check_uint(region.memory_size, 64, "memory_size")
    _check_uint(region.userspace_addr, 64, "userspace_addr")
    _check_uint(region.mmap_offset, 64, "mmap_offset")
    if region.memory_size == 0:
        raise ValueError(f"memory region at guest address {region.guest_phys_addr:#x} is empty")
    _check_span(region.guest_phys_addr, region.memory_size, "guest_phys_addr")
    _check_span(region.userspace_addr, region.memory_size, "userspace_addr")
    _check_span(region.mmap_offset, region.memory_size, "mmap_offset")


class Payload(abc.ABC):
    """A message body: decoded from bytes, validated, encoded back."""

    __slots__ = ()

    @abc.abstractmethod
    def validate(self) -> None:
        """Raise :class:`ValueError` if a field breaks a rule of the spec."""

    @abc.abstractmethod
    def _pack(self) -> bytes:
        """Pack fields already validated."""

    def encode(self) -> bytes:
        """Validate and return the wire bytes."""
        self.validate()
        return self._pack()

    @classmethod
    @abc.abstractmethod
    def decode(cls, data: bytes) -> Self:
        """Parse ``data``: exact size (:class:`PayloadSizeError`), then validity."""


@dataclass(frozen=True, slots=True)
class NoPayload(Payload):
    """The empty payload of requests marked "N/A"."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=")

    def validate(self) -> None:
        """Nothing to check."""

    def _pack(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Accept only zero bytes."""
        _unpack(cls.LAYOUT, data)
        return cls()


@dataclass(frozen=True, slots=True)
class U64(Payload):
    """A single 64-bit integer (features, acknowledgements, SEND_RARP's MAC...)."""

    value: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def validate(self) -> None:
        """The value must fit in 64 bits."""
        _check_uint(self.value, 64, "value")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.value)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 8 bytes."""
        (value,) = _unpack(cls.LAYOUT, data)
        return cls(value)


@dataclass(frozen=True, slots=True)
class VringState(Payload):
    """A vring state description: ``index`` and a 32-bit ``num``.

    ``num`` is the ring size (SET_VRING_NUM), the ring base (SET/GET_VRING_BASE:
    for packed rings bits 0-14 are the avail index, bit 15 its wrap counter,
    bits 16-30 the used index and bit 31 its wrap counter), 0/1 for
    SET_VRING_ENABLE and SET_VRING_ENDIAN, or reserved.
    """

    index: int
    num: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II")

    def validate(self) -> None:
        """Both fields are 32-bit."""
        _check_uint(self.index, 32, "vring index")
        _check_uint(self.num, 32, "num")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.index, self.num)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 8 bytes."""
        index, num = _unpack(cls.LAYOUT, data)
        return cls(index, num)


class VringAddrFlags(IntFlag):
    """Flags of a vring address description."""

    LOG = 0x1  # VHOST_VRING_F_LOG: log used-ring writes at log_guest_addr


@dataclass(frozen=True, slots=True)
class VringAddr(Payload):
    """A vring address description (SET_VRING_ADDR).

    Ring addresses are front-end virtual addresses, or IOVAs once
    ACCESS_PLATFORM is negotiated; ``log_guest_addr`` is guest-physical.
    For packed rings ``avail_user_addr`` is the driver event area and
    ``used_user_addr`` the device event area.
    """

    index: int
    flags: VringAddrFlags
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")

    def validate(self) -> None:
        """Only the LOG flag may be set; addresses are 64-bit."""
        _check_uint(self.index, 32, "vring index")
        _check_uint(self.flags, 32, "flags")
        # Plain ints: inverting the IntFlag would drop the unknown bits.
        unknown = int(self.flags) & ~int(VringAddrFlags.LOG)
        if unknown:
            raise ValueError(f"vring address flags {int(self.flags):#x} set unknown bits")
        _check_uint(self.desc_user_addr, 64, "desc_user_addr")
        _check_uint(self.used_user_addr, 64, "used_user_addr")
        _check_uint(self.avail_user_addr, 64, "avail_user_addr")
        _check_uint(self.log_guest_addr, 64, "log_guest_addr")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 40 bytes."""
        index, flags, desc, used, avail, log = _unpack(cls.LAYOUT, data)
        addr = cls(index, VringAddrFlags(flags), desc, used, avail, log)
        addr.validate()
        return addr


@dataclass(frozen=True, slots=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: a vring index and the NOFD flag.

    Bits 0-7 are the index; bit 8 (``VRING_NOFD_MASK``) says no fd comes
    with the message (the back-end polls); every other bit is zero.  The
    same encoding fills the ``u64`` of a vring area description.
    """

    index: int
    nofd: bool = False

    def validate(self) -> None:
        """The index must fit in bits 0-7."""
        if not 0 <= self.index <= VRING_IDX_MASK:
            raise ValueError(f"vring index {self.index} does not fit in bits 0-7")

    def to_u64(self) -> int:
        """Return the wire value."""
        self.validate()
        return self.index | (VRING_NOFD_MASK if self.nofd else 0)

    @classmethod
    def from_u64(cls, value: int) -> VringFile:
        """Split a wire value, refusing bits beyond the index and NOFD."""
        _check_uint(value, 64, "vring file value")
        extra = value & ~(VRING_IDX_MASK | VRING_NOFD_MASK)
        if extra:
            raise ValueError(f"vring file value {value:#x} sets reserved bits {extra:#x}")
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))


@dataclass(frozen=True, slots=True)
class MemTable(Payload):
    """A multiple memory regions description (SET_MEM_TABLE).

    ``nregions`` (u32) and 32 bits of padding, then ``nregions`` regions of
    ``guest_phys_addr, memory_size, userspace_addr, mmap_offset``; one fd per
    region travels with the message, in the same order.
    """

    regions: tuple[MemoryRegion, ...]

    HEAD: ClassVar[struct.Struct] = struct.Struct("=I4x")
    REGION: ClassVar[struct.Struct] = struct.Struct("=QQQQ")

    def validate(self) -> None:
        """1..MAX_MEM_REGIONS non-empty regions that do not wrap."""
        if not 1 <= len(self.regions) <= MAX_MEM_REGIONS:
            raise ValueError(
                f"memory table has {len(self.regions)} regions, expected 1..{MAX_MEM_REGIONS}"
            )
        for region in self.regions:
            _check_region(region)

    def _pack(self) -> bytes:
        parts = [self.HEAD.pack(len(self.regions))]
        parts.extend(
            self.REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in self.regions
        )
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse ``8 + 32 * nregions`` bytes."""
        if len(data) < cls.HEAD.size:
            raise PayloadSizeError(len(data), f"at least {cls.HEAD.size}")
        (nregions,) = cls.HEAD.unpack_from(data)
        expected = cls.HEAD.size + cls.REGION.size * nregions
        if len(data) != expected:
            raise PayloadSizeError(len(data), f"{expected} for {nregions} regions")
        regions = tuple(
            MemoryRegion(*fields) for fields in cls.REGION.iter_unpack(data[cls.HEAD.size :])
        )
        table = cls(regions)
        table.validate()
        return table


@dataclass(frozen=True, slots=True)
class SingleMemRegion(Payload):
    """A single memory region description (ADD_MEM_REG, REM_MEM_REG): u64 padding + region."""

    region: MemoryRegion

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=8xQQQQ")

    def validate(self) -> None:
        """The region is non-empty and does not wrap."""
        _check_region(self.region)

    def _pack(self) -> bytes:
        r = self.region
        return self.LAYOUT.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 40 bytes."""
        single = cls(MemoryRegion(*_unpack(cls.LAYOUT, data)))
        single.validate()
        return single


@dataclass(frozen=True, slots=True)
class LogArea(Payload):
    """A log description (SET_LOG_BASE): the dirty log's size and offset in its fd."""

    mmap_size: int
    mmap_offset: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQ")

    def validate(self) -> None:
        """The area must not wrap."""
        _check_uint(self.mmap_size, 64, "mmap_size")
        _check_uint(self.mmap_offset, 64, "mmap_offset")
        _check_span(self.mmap_offset, self.mmap_size, "mmap_offset")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 16 bytes."""
        area = cls(*_unpack(cls.LAYOUT, data))
        area.validate()
        return area


@dataclass(frozen=True, slots=True)
class IotlbMsg(Payload):
    """``struct vhost_iotlb_msg``: ``QQQBB`` and 6 bytes of padding (32 bytes).

    UPDATE maps ``[iova, iova + size)`` to ``uaddr`` with ``perm``;
    INVALIDATE drops ``[iova, iova + size)``; MISS and ACCESS_FAIL (from the
    back-end) report ``iova`` and the access wanted.
    """

    iova: int
    size: int
    uaddr: int
    perm: IotlbPerm
    type: IotlbType

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")

    def validate(self) -> None:
        """Known type and permission; every type but INVALIDATE needs an access."""
        _check_uint(self.iova, 64, "iova")
        _check_uint(self.size, 64, "size")
        _check_uint(self.uaddr, 64, "uaddr")
        kind = _member(IotlbType, self.type, "IOTLB type")
        perm = _member(IotlbPerm, self.perm, "IOTLB permission")
        if kind is not IotlbType.INVALIDATE and perm is IotlbPerm.NONE:
            raise ValueError(f"IOTLB {kind.name} without an access permission")
        _check_span(self.iova, self.size, "iova")
        if kind is IotlbType.UPDATE:
            _check_span(self.uaddr, self.size, "uaddr")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 32 bytes.

        An INVALIDATE means only its ``iova`` and ``size``: its permission
        byte is read as NONE whatever it holds, because QEMU (7.2 at least)
        sends it uninitialised; refusing it would leave the translation in
        place, and the device would go on writing to a page the guest has
        given to something else.
        """
        iova, size, uaddr, perm, kind = _unpack(cls.LAYOUT, data)
        kind = _member(IotlbType, kind, "IOTLB type")
        msg = cls(
            iova,
            size,
            uaddr,
            (
                IotlbPerm.NONE
                if kind is IotlbType.INVALIDATE
                else _member(IotlbPerm, perm, "IOTLB permission")
            ),
            kind,
        )
        msg.validate()
        return msg


class ConfigType(IntEnum):
    """The ``flags`` of a config space access (QEMU ``VHOST_SET_CONFIG_TYPE_*``)."""

    FRONTEND = 0  # the guest writes a writable field
    MIGRATION = 1  # live migration restores the whole space, read-only fields too


@dataclass(frozen=True, slots=True)
class ConfigSpace(Payload):
    """A virtio device config space access (GET_CONFIG, SET_CONFIG).

    ``offset, size, flags`` (u32 each) then ``size`` bytes; GET_CONFIG sends
    ``size`` placeholder bytes and the reply carries as many.
    """

    offset: int
    size: int
    flags: ConfigType
    data: bytes

    HEAD: ClassVar[struct.Struct] = struct.Struct("=III")

    def validate(self) -> None:
        """At most MAX_CONFIG_SIZE bytes, ``size == len(data)``, known flags."""
        _check_uint(self.offset, 32, "config offset")
        _check_uint(self.size, 32, "config size")
        if self.size > MAX_CONFIG_SIZE:
            raise ValueError(f"config size {self.size} exceeds {MAX_CONFIG_SIZE}")
        if len(self.data) != self.size:
            raise ValueError(f"config size {self.size} but {len(self.data)} bytes of data")
        _member(ConfigType, self.flags, "config flags")

    def _pack(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + bytes(self.data)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse ``12 + size`` bytes."""
        if len(data) < cls.HEAD.size:
            raise PayloadSizeError(len(data), f"at least {cls.HEAD.size}")
        offset, size, flags = cls.HEAD.unpack_from(data)
        expected = cls.HEAD.size + size
        if len(data) != expected:
            raise PayloadSizeError(len(data), f"{expected} for {size} bytes of config space")
        config = cls(
            offset, size, _member(ConfigType, flags, "config flags"), bytes(data[cls.HEAD.size :])
        )
        config.validate()
        return config


@dataclass(frozen=True, slots=True)
class VringArea(Payload):
    """A vring area description (back-end VRING_HOST_NOTIFIER_MSG).

    The ``u64`` holds the vring index and NOFD (as :class:`VringFile`); with
    NOFD the front-end drops the queue's host notifier, otherwise it maps
    ``size`` bytes at ``offset`` of the fd sent with the message.
    """

    index: int
    nofd: bool
    size: int
    offset: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQQ")

    def validate(self) -> None:
        """Index in bits 0-7; the area must not wrap."""
        VringFile(self.index, self.nofd).validate()
        _check_uint(self.size, 64, "size")
        _check_uint(self.offset, 64, "offset")
        _check_span(self.offset, self.size, "offset")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(VringFile(self.index, self.nofd).to_u64(), self.size, self.offset)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 24 bytes."""
        value, size, offset = _unpack(cls.LAYOUT, data)
        vring = VringFile.from_u64(value)
        area = cls(vring.index, vring.nofd, size, offset)
        area.validate()
        return area


@dataclass(frozen=True, slots=True)
class Inflight(Payload):
    """An inflight description (GET/SET_INFLIGHT_FD): ``QQHH`` and 4 bytes of padding."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")

    def validate(self) -> None:
        """Field widths; the area must not wrap."""
        _check_uint(self.mmap_size, 64, "mmap_size")
        _check_uint(self.mmap_offset, 64, "mmap_offset")
        _check_uint(self.num_queues, 16, "num_queues")
        _check_uint(self.queue_size, 16, "queue_size")
        _check_span(self.mmap_offset, self.mmap_size, "mmap_offset")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 24 bytes."""
        inflight = cls(*_unpack(cls.LAYOUT, data))
        inflight.validate()
        return inflight


class TransferDirection(IntEnum):
    """Direction of a back-end state transfer."""

    SAVE = 0  # back-end to front-end, on the migration source
    LOAD = 1  # front-end to back-end, on the destination


class MigrationPhase(IntEnum):
    """Migration phase of a back-end state transfer."""

    STOPPED = 0  # guest stopped, device suspended


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(Payload):
    """Device state transfer parameters (SET_DEVICE_STATE_FD): direction and phase, u32 each."""

    direction: TransferDirection
    phase: MigrationPhase

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=II")

    def validate(self) -> None:
        """Both fields must be known values."""
        _member(TransferDirection, self.direction, "transfer direction")
        _member(MigrationPhase, self.phase, "migration phase")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.direction, self.phase)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 8 bytes."""
        direction, phase = _unpack(cls.LAYOUT, data)
        return cls(
            _member(TransferDirection, direction, "transfer direction"),
            _member(MigrationPhase, phase, "migration phase"),
        )


@dataclass(frozen=True, slots=True)
class SharedObject(Payload):
    """``VhostUserShared``: a 16-byte UUID in RFC 4122 byte order (GET_SHARED_OBJECT)."""

    uuid: UUID

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=16s")

    def validate(self) -> None:
        """The field must be a :class:`uuid.UUID`."""
        if not isinstance(self.uuid, UUID):
            raise ValueError(f"shared object uuid {self.uuid!r} is not a UUID")

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.uuid.bytes)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 16 bytes."""
        (raw,) = _unpack(cls.LAYOUT, data)
        return cls(UUID(bytes=raw))


class CryptoSessionOp(IntEnum):
    """virtio-crypto opcodes that create a session (``VIRTIO_CRYPTO_*_CREATE_SESSION``)."""

    CIPHER_CREATE_SESSION = 0x0002
    HASH_CREATE_SESSION = 0x0102
    MAC_CREATE_SESSION = 0x0202
    AEAD_CREATE_SESSION = 0x0302
    AKCIPHER_CREATE_SESSION = 0x0404


@dataclass(frozen=True, slots=True)
class SymSessionSetup:
    """Symmetric session parameters (QEMU ``CryptoDevBackendSymSessionInfo`` and keys).

    The key lengths of the C struct are ``len(cipher_key)`` and
    ``len(auth_key)``; the algorithm numbers are virtio-crypto's.
    """

    cipher_alg: int
    hash_alg: int
    hash_result_len: int
    add_len: int
    op_type: int
    direction: int
    hash_mode: int
    alg_chain_order: int
    cipher_key: bytes = b""
    auth_key: bytes = b""

    def validate(self) -> None:
        """Field widths; keys fit their buffers."""
        for what, value in (
            ("cipher_alg", self.cipher_alg),
            ("hash_alg", self.hash_alg),
            ("hash_result_len", self.hash_result_len),
            ("add_len", self.add_len),
        ):
            _check_uint(value, 32, what)
        for what, value in (
            ("op_type", self.op_type),
            ("direction", self.direction),
            ("hash_mode", self.hash_mode),
            ("alg_chain_order", self.alg_chain_order),
        ):
            _check_uint(value, 8, what)
        _check_key_len(len(self.cipher_key), _SYM_CIPHER_KEY_MAX, "cipher key")
        _check_key_len(len(self.auth_key), _SYM_AUTH_KEY_MAX, "auth key")

    def fields(self) -> tuple[Any, ...]:
        """Values in wire order, key lengths included, keys last."""
        return (
            self.cipher_alg,
            len(self.cipher_key),
            self.hash_alg,
            self.hash_result_len,
            len(self.auth_key),
            self.add_len,
            self.op_type,
            self.direction,
            self.hash_mode,
            self.alg_chain_order,
            bytes(self.cipher_key),
            bytes(self.auth_key),
        )

    @classmethod
    def from_fields(cls, fields: tuple[Any, ...]) -> SymSessionSetup:
        """Inverse of :meth:`fields`: cut the key buffers to their announced lengths."""
        (
            cipher_alg,
            key_len,
            hash_alg,
            hash_result_len,
            auth_key_len,
            add_len,
            op_type,
            direction,
            hash_mode,
            alg_chain_order,
            key_buf,
            auth_buf,
        ) = fields
        _check_key_len(key_len, _SYM_CIPHER_KEY_MAX, "cipher key")
        _check_key_len(auth_key_len, _SYM_AUTH_KEY_MAX, "auth key")
        return cls(
            cipher_alg,
            hash_alg,
            hash_result_len,
            add_len,
            op_type,
            direction,
            hash_mode,
            alg_chain_order,
            key_buf[:key_len],
            auth_buf[:auth_key_len],
        )


@dataclass(frozen=True, slots=True)
class AsymSessionSetup:
    """Asymmetric session parameters (QEMU ``CryptoDevBackendAsymSessionInfo`` and key).

    ``padding_algo`` and ``hash_algo`` are the RSA parameters; for ECDSA the
    first word of the same union is the curve id, carried in ``padding_algo``.
    """

    algo: int
    keytype: int
    padding_algo: int
    hash_algo: int
    key: bytes = b""

    def validate(self) -> None:
        """Field widths; the key fits its buffer."""
        for what, value in (
            ("algo", self.algo),
            ("keytype", self.keytype),
            ("padding_algo", self.padding_algo),
            ("hash_algo", self.hash_algo),
        ):
            _check_uint(value, 32, what)
        _check_key_len(len(self.key), _ASYM_KEY_MAX, "asymmetric key")


def _check_key_len(length: int, limit: int, what: str) -> None:
    if length > limit:
        raise ValueError(f"{what} of {length} bytes exceeds {limit}")


def _check_session_id(session_id: int) -> None:
    if not -(1 << 63) <= session_id < 1 << 63:
        raise ValueError(f"session_id {session_id} does not fit in 64 signed bits")


@dataclass(frozen=True, slots=True)
class CryptoSession(Payload):
    """``VhostUserCryptoSession`` as QEMU sends it since asymmetric sessions (1072 bytes).

    ``u64 op_code``, then a 1056-byte union (symmetric: 48 bytes of session
    info, 64-byte cipher key, 512-byte auth key; asymmetric: 32 bytes of
    session info, 1024-byte key), then ``i64 session_id``, which the
    back-end's reply sets (>= 0 on success, negative on failure).
    """

    op_code: CryptoSessionOp
    session_id: int
    setup: SymSessionSetup | AsymSessionSetup

    SYM: ClassVar[struct.Struct] = struct.Struct("=Q6I4B20x64s512s432xq")
    ASYM: ClassVar[struct.Struct] = struct.Struct("=Q3I12x2I1024sq")

    def validate(self) -> None:
        """A create-session opcode that matches the kind of setup; keys fit."""
        op = _member(CryptoSessionOp, self.op_code, "crypto op_code")
        asym = op is CryptoSessionOp.AKCIPHER_CREATE_SESSION
        if asym != isinstance(self.setup, AsymSessionSetup):
            raise ValueError(f"crypto op_code {op.name} with {type(self.setup).__name__}")
        _check_session_id(self.session_id)
        self.setup.validate()

    def _pack(self) -> bytes:
        setup = self.setup
        if isinstance(setup, AsymSessionSetup):
            return self.ASYM.pack(
                self.op_code,
                setup.algo,
                setup.keytype,
                len(setup.key),
                setup.padding_algo,
                setup.hash_algo,
                bytes(setup.key),
                self.session_id,
            )
        return self.SYM.pack(self.op_code, *setup.fields(), self.session_id)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 1072 bytes; the opcode selects the union member."""
        if len(data) != cls.SYM.size:
            raise PayloadSizeError(len(data), str(cls.SYM.size))
        (raw_op,) = U64.LAYOUT.unpack_from(data)
        op = _member(CryptoSessionOp, raw_op, "crypto op_code")
        setup: SymSessionSetup | AsymSessionSetup
        if op is CryptoSessionOp.AKCIPHER_CREATE_SESSION:
            _, algo, keytype, keylen, padding, hash_algo, key, session_id = cls.ASYM.unpack(data)
            _check_key_len(keylen, _ASYM_KEY_MAX, "asymmetric key")
            setup = AsymSessionSetup(algo, keytype, padding, hash_algo, key[:keylen])
        else:
            fields = cls.SYM.unpack(data)
            setup = SymSessionSetup.from_fields(fields[1:-1])
            session_id = fields[-1]
        session = cls(op, session_id, setup)
        session.validate()
        return session


@dataclass(frozen=True, slots=True)
class LegacyCryptoSession(Payload):
    """``VhostUserCryptoSession`` before asymmetric sessions (632 bytes).

    Sent by older QEMU and read by DPDK's vhost-crypto: ``i64 session_id``,
    then 48 bytes of symmetric session info starting with a u32 ``op_code``,
    a 64-byte cipher key and a 512-byte auth key.
    """

    op_code: CryptoSessionOp
    session_id: int
    setup: SymSessionSetup

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("=qI6I4B16x64s512s")

    def validate(self) -> None:
        """A symmetric create-session opcode; keys fit."""
        op = _member(CryptoSessionOp, self.op_code, "crypto op_code")
        if op is CryptoSessionOp.AKCIPHER_CREATE_SESSION or not isinstance(
            self.setup, SymSessionSetup
        ):
            raise ValueError("the legacy crypto session layout carries symmetric sessions only")
        _check_session_id(self.session_id)
        self.setup.validate()

    def _pack(self) -> bytes:
        return self.LAYOUT.pack(self.session_id, self.op_code, *self.setup.fields())

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse 632 bytes."""
        if len(data) != cls.LAYOUT.size:
            raise PayloadSizeError(len(data), str(cls.LAYOUT.size))
        session_id, raw_op, *fields = cls.LAYOUT.unpack(data)
        session = cls(
            _member(CryptoSessionOp, raw_op, "crypto op_code"),
            session_id,
            SymSessionSetup.from_fields(tuple(fields)),
        )
        session.validate()
        return session
