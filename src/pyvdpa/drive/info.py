"""What a device offers, asked over vhost-vdpa or vhost-user (``pyvdpa info``).

Theory of operation: only questions, nothing configured.  Over vhost-vdpa
(:func:`vhost_vdpa_info`) the device answers ioctls without an owner:
device id, status, virtio features, back-end features, queue count
(VHOST_VDPA_GET_VQS_COUNT), largest ring (VHOST_VDPA_GET_VRING_NUM), config
space size and bytes, IOVA range.  Over vhost-user (:func:`vhost_user_info`)
the front-end asks GET_FEATURES and GET_PROTOCOL_FEATURES, acknowledges the
protocol features it needs for its other questions (MQ for GET_QUEUE_NUM,
CONFIG for GET_CONFIG, CONFIGURE_MEM_SLOTS for GET_MAX_MEM_SLOTS) and
asks them; vhost-user tells neither the device type nor the ring size:
the type is given by the caller or inferred from device-specific feature
bits only one type defines (:func:`infer_device_type`), and the ring size
is unknown.

The config space is decoded for net (mac, status, max_virtqueue_pairs,
mtu) and blk (capacity, blk_size, size_max, seg_max, num_queues); a field
beyond the bytes the device has is ``None``.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from enum import IntFlag

from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.vhost_vdpa.device import VhostVdpaDevice
from pyvdpa.vhost_vdpa.uapi import BackendFeature, VhostVdpaError
from pyvdpa.virtio.blk import SECTOR_SIZE
from pyvdpa.virtio.constants import (
    BlkFeature,
    DeviceId,
    NetFeature,
    NetStatus,
    VirtioFeature,
)
from pyvdpa.virtio.net import format_mac

__all__ = [
    "CONFIG_BYTES",
    "DEVICE_TYPES",
    "INFO_PROTOCOL_FEATURES",
    "DeviceInfo",
    "decode_config",
    "feature_list",
    "infer_device_type",
    "vhost_user_info",
    "vhost_vdpa_info",
]

#: Device types ``pyvdpa info`` decodes, by name.
DEVICE_TYPES = {"net": DeviceId.NET, "blk": DeviceId.BLOCK}

# Offsets and layouts of the decoded config fields (virtio 1.2, 5.1.4 and 5.2.4).
_NET_FIELDS = (
    ("mac", 0, struct.Struct("<6s")),
    ("status", 6, struct.Struct("<H")),
    ("max_virtqueue_pairs", 8, struct.Struct("<H")),
    ("mtu", 10, struct.Struct("<H")),
)
_BLK_FIELDS = (
    ("capacity", 0, struct.Struct("<Q")),
    ("size_max", 8, struct.Struct("<I")),
    ("seg_max", 12, struct.Struct("<I")),
    ("blk_size", 20, struct.Struct("<I")),
    ("num_queues", 34, struct.Struct("<H")),
)
#: Bytes of config space ``pyvdpa info`` reads at most, per device type.
CONFIG_BYTES = {DeviceId.NET: 12, DeviceId.BLOCK: 36}


def _config_bytes(device_id: int | None) -> int:
    for known, size in CONFIG_BYTES.items():
        if known == device_id:
            return size
    return 0


# Device-specific bits only one of the two types defines in virtio 1.2 (bits
# 15-17 are MRG_RXBUF, STATUS, CTRL_VQ for net and LIFETIME, SECURE_ERASE,
# ZONED for blk, so they tell nothing).
_ONLY_NET = NetFeature.CTRL_RX | NetFeature.CTRL_VLAN | NetFeature.GUEST_ANNOUNCE | NetFeature.MQ
_ONLY_BLK = BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX | BlkFeature.GEOMETRY


def infer_device_type(features: int) -> DeviceId | None:
    """The device type device-specific feature bits reveal, if they do.

    Bits that one type defines and the other leaves reserved: net's
    CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE and MQ (18, 19, 21, 22); blk's
    SIZE_MAX, SEG_MAX and GEOMETRY (1, 2, 4, which net calls GUEST_CSUM,
    CTRL_GUEST_OFFLOADS and a reserved bit: a net device with guest
    checksums but none of the net-only bits stays unknown).
    """
    net = bool(features & _ONLY_NET)
    blk = bool(features & _ONLY_BLK) and not features & NetFeature.CSUM
    if net and not blk:
        return DeviceId.NET
    if blk and not net:
        return DeviceId.BLOCK
    return None


def feature_list(features: int, device_id: int | None) -> list[str]:
    """Spec names of ``features``: generic, then the device type's; others as ``bit N``."""
    tables: list[type[IntFlag]] = [VirtioFeature]
    if device_id == DeviceId.NET:
        tables.append(NetFeature)
    elif device_id == DeviceId.BLOCK:
        tables.append(BlkFeature)
    names = []
    for number in range(64):
        mask = 1 << number
        if not features & mask:
            continue
        known = [table._value2member_map_.get(mask) for table in tables]
        # Flag arithmetic caches unnamed pseudo-members in the map: skip them.
        name = next((member.name for member in known if member is not None and member.name), None)
        names.append(name if name else f"bit {number}")
    return names


def decode_config(device_id: int | None, data: bytes) -> dict[str, object] | None:
    """The known fields of a net or blk config space (``None`` for other types)."""
    fields: tuple[tuple[str, int, struct.Struct], ...]
    if device_id == DeviceId.NET:
        fields = _NET_FIELDS
    elif device_id == DeviceId.BLOCK:
        fields = _BLK_FIELDS
    else:
        return None
    decoded: dict[str, object] = {}
    for name, offset, layout in fields:
        end = offset + layout.size
        decoded[name] = layout.unpack_from(data, offset)[0] if end <= len(data) else None
    if device_id == DeviceId.NET:
        mac = decoded["mac"]
        decoded["mac"] = format_mac(mac) if isinstance(mac, bytes) else None
        status = decoded["status"]
        if isinstance(status, int):
            decoded["status_names"] = [s.name for s in NetStatus if status & s]
    else:
        capacity = decoded["capacity"]
        if isinstance(capacity, int):
            decoded["capacity_bytes"] = capacity * SECTOR_SIZE
    return decoded


@dataclass
class DeviceInfo:
    """What ``pyvdpa info`` reports (``--json`` prints these keys)."""

    transport: str
    path: str
    device_id: int | None
    device_type: str | None
    #: ``device`` (the device said), ``given`` (--type), ``features`` (inferred), or None.
    device_type_source: str | None
    features: int
    feature_names: list[str]
    #: vhost-vdpa: the back-end features the kernel offers; vhost-user: protocol features.
    backend_features: int
    backend_feature_names: list[str]
    queues: int | None
    queue_size: int | None
    config_size: int | None
    config: dict[str, object] | None
    iova_first: int | None = None
    iova_last: int | None = None
    status: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """The report as a JSON-ready dict."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as aligned ``key value`` lines."""
        hexed = {"features", "backend_features", "iova_first", "iova_last", "status"}
        out = []
        for key, value in self.as_dict().items():
            if key == "extra":
                continue
            if key in hexed and isinstance(value, int):
                shown = f"{value:#x}"
            elif isinstance(value, list):
                shown = ", ".join(str(v) for v in value) or "-"
            elif isinstance(value, dict):
                shown = "  ".join(f"{k}={_show(v)}" for k, v in value.items())
            else:
                shown = "-" if value is None else str(value)
            out.append(f"  {key:<24} {shown}")
        out.extend(f"  {key:<24} {_show(value)}" for key, value in self.extra.items())
        return out


def _show(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value)


def _type_name(device_id: int | None) -> str | None:
    if device_id is None:
        return None
    for name, known in DEVICE_TYPES.items():
        if known == device_id:
            return name
    try:
        return DeviceId(device_id).name.lower()
    except ValueError:
        return None


def vhost_vdpa_info(path: str) -> DeviceInfo:
    """Ask the vhost-vdpa device at ``path`` what it is and offers."""
    with VhostVdpaDevice.open(path) as device:
        device_id = device.get_device_id()
        features = device.get_features()
        backend = device.get_backend_features()
        config_size = device.get_config_size()
        wanted = min(config_size, _config_bytes(device_id))
        raw = device.get_config(0, wanted) if wanted else b""
        iova = device.get_iova_range()
        extra: dict[str, object] = {}
        try:
            queues: int | None = device.get_vqs_count()
        except VhostVdpaError:
            queues = None
        asks = (("vq_groups", device.get_group_num), ("address_spaces", device.get_as_num))
        for name, ask in asks:
            try:
                extra[name] = ask()
            except VhostVdpaError:
                extra[name] = None
        return DeviceInfo(
            transport="vhost-vdpa",
            path=path,
            device_id=device_id,
            device_type=_type_name(device_id),
            device_type_source="device",
            features=features,
            feature_names=feature_list(features, device_id),
            backend_features=int(backend),
            backend_feature_names=[str(f.name) for f in BackendFeature if backend & f],
            queues=queues,
            queue_size=device.get_vring_num(),
            config_size=config_size,
            config=decode_config(device_id, raw),
            iova_first=iova.first,
            iova_last=iova.last,
            status=int(device.get_status()),
            extra=extra,
        )


#: Protocol features ``info`` acknowledges, to ask GET_QUEUE_NUM, GET_CONFIG, GET_MAX_MEM_SLOTS.
INFO_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ | ProtocolFeature.CONFIG | ProtocolFeature.CONFIGURE_MEM_SLOTS
)


def vhost_user_info(frontend: Frontend, path: str, device_type: str | None = None) -> DeviceInfo:
    """Ask the vhost-user back-end on ``frontend`` what it offers.

    ``device_type`` (``net`` or ``blk``) says what the device is; without
    it the type is inferred from the features, when they tell.
    """
    features = frontend.get_features()
    protocol = ProtocolFeature(0)
    extra: dict[str, object] = {}
    queues: int | None = None
    if features & VirtioFeature.PROTOCOL_FEATURES:
        protocol = frontend.get_protocol_features()
        frontend.set_protocol_features(protocol & INFO_PROTOCOL_FEATURES)
        if protocol & ProtocolFeature.MQ:
            queues = frontend.get_queue_num()
        if protocol & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            extra["max_mem_slots"] = frontend.get_max_mem_slots()
    if device_type is not None:
        if device_type not in DEVICE_TYPES:
            raise ConfigError(f"unknown device type {device_type!r} (net, blk)")
        device_id: int | None = DEVICE_TYPES[device_type]
        source: str | None = "given"
    else:
        device_id = infer_device_type(features)
        source = "features" if device_id is not None else None
    config = None
    config_size = None
    if protocol & ProtocolFeature.CONFIG and _config_bytes(device_id):
        try:
            raw = frontend.get_config(0, _config_bytes(device_id))
        except PyvdpaError as exc:
            extra["config_error"] = str(exc)
        else:
            config = decode_config(device_id, raw)
    return DeviceInfo(
        transport="vhost-user",
        path=path,
        device_id=device_id,
        device_type=_type_name(device_id),
        device_type_source=source,
        features=features,
        feature_names=feature_list(features, device_id),
        backend_features=int(protocol),
        backend_feature_names=[str(f.name) for f in ProtocolFeature if protocol & f],
        queues=queues,
        queue_size=None,
        config_size=config_size,
        config=config,
        extra=extra,
    )
