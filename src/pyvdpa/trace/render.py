"""What a traced message says, as named fields, and how a record is printed.

Theory of operation: the codec (:mod:`pyvdpa.vhost_user.codec`) turns bytes
into typed payloads; this module turns a payload into a dictionary of the
spec's field names (QEMU ``docs/interop/vhost-user.rst``, "Message
Specification" > "Payload"), giving the meaning a bare ``u64`` or vring
state has for the request that carries it: feature words with the name of
every bit, a vring index and its NOFD flag, a device status, a MAC address.
Nothing here touches a socket: the proxy hands in payloads and the readlink
text of the fds it received, and gets back printable records.

Two output forms: one line of text per record (:func:`format_text`), or one
JSON object per line (:func:`format_json`) with the same fields.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntFlag
from typing import Any
from uuid import UUID

from pyvdpa.vhost_user.messages import U64, Payload, VringFile, VringState
from pyvdpa.vhost_user.protocol import BackendRequest, HeaderFlags, ProtocolFeature, Request
from pyvdpa.virtio.constants import (
    BlkFeature,
    DeviceId,
    DeviceStatus,
    NetFeature,
    VirtioFeature,
)
from pyvdpa.virtio.net import format_mac

__all__ = [
    "ChannelKind",
    "ConnectionRecord",
    "MessageRecord",
    "Side",
    "describe_fd",
    "flag_names",
    "format_json",
    "format_text",
    "payload_fields",
]


class Side(Enum):
    """Which peer sent a message."""

    FRONTEND = "front-end"
    BACKEND = "back-end"

    @property
    def other(self) -> Side:
        """The peer that receives what this side sends."""
        return Side.BACKEND if self is Side.FRONTEND else Side.FRONTEND


class ChannelKind(Enum):
    """The socket a message travelled on."""

    #: The vhost-user socket: front-end requests, back-end replies.
    MAIN = "main"
    #: The SET_BACKEND_REQ_FD socket: back-end requests, front-end replies.
    BACKEND = "backend"


_ARROW = {Side.FRONTEND: "F>B", Side.BACKEND: "B>F"}


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One message seen by the proxy, decoded for display.

    ``seq`` numbers the messages of one connection pair, both channels and
    both directions together; a reply names the ``seq`` of the request it
    answers in ``reply_to`` and the time since it in ``latency``.
    ``malformed`` is why the message does not decode (``None`` when it
    does); ``raw`` then holds its payload bytes.  ``note`` says what the
    proxy did to the message beyond forwarding it.
    """

    time: float
    connection: int
    seq: int
    channel: ChannelKind
    sender: Side
    is_reply: bool
    request: str
    code: int
    flags: int
    size: int
    fields: Mapping[str, Any] = field(default_factory=dict)
    fds: tuple[str, ...] = ()
    reply_to: int | None = None
    latency: float | None = None
    malformed: str | None = None
    raw: bytes | None = None
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values."""
        out: dict[str, Any] = {
            "time": round(self.time, 6),
            "connection": self.connection,
            "seq": self.seq,
            "channel": self.channel.value,
            "direction": f"{self.sender.value} -> {self.sender.other.value}",
            "kind": "reply" if self.is_reply else "request",
            "request": self.request,
            "code": self.code,
            "flags": flag_names(self.flags),
            "size": self.size,
            "payload": dict(self.fields),
            "fds": list(self.fds),
        }
        if self.reply_to is not None:
            out["reply_to"] = self.reply_to
        if self.latency is not None:
            out["latency_us"] = round(self.latency * 1e6, 1)
        if self.malformed is not None:
            out["malformed"] = self.malformed
        if self.raw is not None:
            out["raw"] = self.raw.hex()
        if self.note is not None:
            out["note"] = self.note
        return out


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """A connection pair starting or ending (``event`` is ``open`` or ``close``)."""

    time: float
    connection: int
    event: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values."""
        return {
            "time": round(self.time, 6),
            "connection": self.connection,
            "event": self.event,
            "detail": self.detail,
        }


def flag_names(flags: int) -> list[str]:
    """Names of the header flags set in ``flags``; unknown bits as hex."""
    names = [str(flag.name) for flag in HeaderFlags if flags & flag]
    unknown = flags & ~sum(HeaderFlags)
    if flags & 0x3 not in (0, int(HeaderFlags.VERSION)):
        names.append(f"version={flags & 0x3}")
        unknown &= ~0x3
    if unknown:
        names.append(hex(unknown))
    return names


def _bit_names(value: int, *tables: type[IntFlag]) -> list[str]:
    """Names of the bits set in ``value``, from the first table naming each; others ``bit N``."""
    # Canonical members only: IntFlag caches unnamed pseudo-members for values it has seen.
    names: dict[int, str] = {}
    for table in reversed(tables):
        names.update({int(member): str(member.name) for member in table})
    return [names.get(1 << n, f"bit {n}") for n in range(64) if value >> n & 1]


def _feature_names(features: int, device_id: int | None) -> list[str]:
    """Feature bit names; with the device type unknown, a device-specific bit as ``NET/BLK``."""
    net = _bit_names(features, VirtioFeature, NetFeature)
    blk = _bit_names(features, VirtioFeature, BlkFeature)
    if device_id == DeviceId.NET:
        return net
    if device_id == DeviceId.BLOCK:
        return blk
    if device_id is not None:
        return _bit_names(features, VirtioFeature)
    return [a if a == b else f"{a}/{b}" for a, b in zip(net, blk, strict=True)]


def _plain(value: Any) -> Any:
    """A payload field as a JSON value: nested dataclasses as dicts, enums by name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.name if value.name is not None else int(value.value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def _u64_fields(
    request: Request | BackendRequest, value: int, device_id: int | None
) -> dict[str, Any]:
    """What the u64 of ``request`` (or of its reply) means."""
    if isinstance(request, Request):
        match request:
            case Request.GET_FEATURES | Request.SET_FEATURES:
                return {"features": value, "features_names": _feature_names(value, device_id)}
            case Request.GET_PROTOCOL_FEATURES | Request.SET_PROTOCOL_FEATURES:
                return {
                    "protocol_features": value,
                    "protocol_features_names": _bit_names(value, ProtocolFeature),
                }
            case Request.SET_VRING_KICK | Request.SET_VRING_CALL | Request.SET_VRING_ERR:
                vring = VringFile.from_u64(value)
                return {"index": vring.index, "nofd": vring.nofd}
            case Request.GET_QUEUE_NUM:
                return {"queue_num": value}
            case Request.GET_MAX_MEM_SLOTS:
                return {"max_mem_slots": value}
            case Request.SET_STATUS | Request.GET_STATUS:
                return {"status": value, "status_names": _bit_names(value, DeviceStatus)}
            case Request.NET_SET_MTU:
                return {"mtu": value}
            case Request.SEND_RARP:
                return {"mac": format_mac(value.to_bytes(8, "little")[:6])}
            case Request.CLOSE_CRYPTO_SESSION:
                return {"session_id": value}
    return {"u64": value}


def payload_fields(
    request: Request | BackendRequest,
    payload: Payload,
    *,
    is_reply: bool,
    device_id: int | None = None,
    packed: bool = False,
) -> dict[str, Any]:
    """The fields of ``payload`` by their spec names, as ``request`` gives them meaning.

    ``is_reply`` tells a REPLY_ACK (a u64 status) from the request's own
    payload; ``device_id`` selects the device-specific feature names (both
    net's and blk's, ``NET/BLK``, where they differ and it is ``None``);
    ``packed`` splits ring bases into the packed ring's index and wrap
    counter fields.
    """
    if isinstance(payload, U64):
        if is_reply and not _own_u64_reply(request):
            return {"u64": payload.value, "result": "success" if payload.value == 0 else "failure"}
        return _u64_fields(request, payload.value, device_id)
    fields = _plain(payload)
    assert isinstance(fields, dict)
    if isinstance(payload, VringState) and packed and request in _RING_BASE:
        num = payload.num
        fields["last_avail_idx"] = num & 0x7FFF
        fields["avail_wrap_counter"] = (num >> 15) & 1
        if is_reply:
            fields["last_used_idx"] = (num >> 16) & 0x7FFF
            fields["used_wrap_counter"] = (num >> 31) & 1
    return fields


_RING_BASE = (Request.SET_VRING_BASE, Request.GET_VRING_BASE)
#: Requests whose reply is a u64 of their own rather than a success status.
_OWN_U64_REPLY = (
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
)


def _own_u64_reply(request: Request | BackendRequest) -> bool:
    return isinstance(request, Request) and request in _OWN_U64_REPLY


def describe_fd(link: str) -> str:
    """A short name for an fd from its ``/proc/PID/fd`` link text.

    ``anon_inode:[eventfd]`` becomes ``eventfd``, ``/memfd:NAME (deleted)``
    ``memfd:NAME``, ``socket:[INODE]`` ``socket``; a path stays a path.
    """
    if link.startswith("anon_inode:"):
        return link.removeprefix("anon_inode:").strip("[]")
    if link.startswith("/memfd:"):
        return link.removeprefix("/").removesuffix(" (deleted)")
    if link.startswith("socket:"):
        return "socket"
    return link


# Fields printed in hex in text form: addresses, sizes, offsets, feature words.
_HEX_SUFFIXES = ("addr", "size", "offset", "iova", "features", "u64")


def _text_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return hex(value) if name.endswith(_HEX_SUFFIXES) else str(value)
    if isinstance(value, dict):
        return "{" + " ".join(f"{k}={_text_value(k, v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        if name.endswith("_names"):
            return "(" + ",".join(str(item) for item in value) + ")"
        return "[" + " ".join(_text_value(name, item) for item in value) + "]"
    return str(value)


def _text_fields(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{name}={_text_value(name, value)}" for name, value in fields.items())


def format_text(record: MessageRecord | ConnectionRecord) -> str:
    """One line of text for ``record``."""
    if isinstance(record, ConnectionRecord):
        return f"{record.time:12.6f} c{record.connection} --- {record.event} {record.detail}"
    parts = [
        f"{record.time:12.6f}",
        f"c{record.connection}",
        f"#{record.seq}",
        "main" if record.channel is ChannelKind.MAIN else "back",
        _ARROW[record.sender],
        ("reply " if record.is_reply else "") + record.request,
        "[" + "|".join(flag_names(record.flags)) + "]",
        f"size={record.size}",
    ]
    if record.fields:
        parts.append(_text_fields(record.fields))
    if record.fds:
        parts.append("fds=[" + " ".join(record.fds) + "]")
    if record.reply_to is not None:
        parts.append(f"reply-to=#{record.reply_to}")
    if record.latency is not None:
        parts.append(f"latency={record.latency * 1e6:.0f}us")
    if record.note is not None:
        parts.append(f"({record.note})")
    if record.malformed is not None:
        parts.append(f"MALFORMED: {record.malformed}")
    if record.raw is not None:
        parts.append(f"raw={record.raw.hex()}")
    return " ".join(parts)


def format_json(record: MessageRecord | ConnectionRecord) -> str:
    """One JSON object (one line) for ``record``."""
    return json.dumps(record.as_dict(), separators=(",", ":"))
