"""Management devices and the device types they publish.

Theory of operation (Linux vDPA management devices, ``vdpa mgmtdev show``;
VFIO mediated devices, ``Documentation/driver-api/vfio-mediated-device.rst``:
a parent publishes ``mdev_supported_types/<type>/{name, available_instances,
device_api}``): each device kind pyvdpa can create is one management device,
named as the kind (``sim-net``, ``sim-blk``), publishing one supported type
with its name, device API, the virtio class, the most queues and the feature
bits a device of that type may offer, and the keys ``dev add`` takes for it.
``available_instances`` is what the bounded device table still has room for.

:func:`dev_add_request` validates ``dev add`` parameters as they arrive
from a socket (every value's JSON type and shape) and turns them into the
``--vdev`` specification the drivers probe, so range checks and defaults
stay with the drivers.  Nothing here touches a device.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from typing import Final

from pyvdpa.dataplane.engine import EngineMode
from pyvdpa.devices.blk import BLK_FEATURES
from pyvdpa.devices.net import NET_FEATURES
from pyvdpa.errors import ConfigError
from pyvdpa.vdev import BUSES, SIM_NET_MODES, VdevSpec, parse_vdev
from pyvdpa.vdpa.registry import NAME_MAX
from pyvdpa.virtio.constants import BlkFeature, DeviceId, NetFeature, VirtioFeature

__all__ = [
    "MGMTDEVS",
    "DevAddRequest",
    "Key",
    "MgmtDev",
    "dev_add_request",
]

#: JSON kinds of a key's value, as ``mgmtdev show`` names them.
KINDS: Final = ("string", "integer", "boolean", "mac", "path", "size", "uuid", "choice")


@dataclass(frozen=True, slots=True)
class Key:
    """A ``dev add`` key: its JSON kind, what it means, and the ``--vdev`` option it sets."""

    name: str
    kind: str
    help: str
    #: The ``--vdev`` option it becomes (``None``: the manager's own: socket, client, bus, uuid).
    option: str | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        """The key as ``mgmtdev show`` publishes it."""
        entry: dict[str, object] = {"kind": self.kind, "help": self.help}
        if self.choices:
            entry["choices"] = list(self.choices)
        return entry


#: Keys every type takes.
COMMON_KEYS: Final = (
    Key("uuid", "uuid", "optional UUID of the device (as an mdev's)"),
    Key("bus", "choice", "where the device is served", choices=BUSES),
    Key("socket", "path", "vhost-user socket (default: NAME.sock beside the control socket)"),
    Key("client", "boolean", "connect to the socket instead of listening on it"),
)


@dataclass(frozen=True, slots=True)
class MgmtDev:
    """A management device: one device kind and its supported type."""

    name: str
    #: The mdev ``device_api`` of its type.
    device_api: str
    #: The virtio class, as ``vdpa mgmtdev show`` names it.
    device_class: str
    device_id: DeviceId
    max_supported_vqs: int
    dev_features: int
    keys: tuple[Key, ...]

    def key(self, name: str) -> Key | None:
        """The key called ``name``, common or of this type."""
        return next((key for key in (*COMMON_KEYS, *self.keys) if key.name == name), None)

    def describe(self, available_instances: int, devices: list[str]) -> dict[str, object]:
        """The management device as ``mgmtdev show`` reports it (before feature names).

        ``devices`` are the devices of its type, as an mdev type's ``devices/``.
        """
        return {
            "supported_classes": [self.device_class],
            "max_supported_vqs": self.max_supported_vqs,
            "dev_features": self.dev_features,
            "supported_types": {
                self.name: {
                    "name": self.name,
                    "device_api": self.device_api,
                    "available_instances": available_instances,
                    "devices": devices,
                    "keys": {key.name: key.describe() for key in (*COMMON_KEYS, *self.keys)},
                }
            },
        }


#: The management devices, by name: one per ``--vdev`` kind.
MGMTDEVS: Final = {
    "sim-net": MgmtDev(
        name="sim-net",
        device_api="virtio-net",
        device_class="net",
        device_id=DeviceId.NET,
        max_supported_vqs=2 * 128,
        dev_features=int(NET_FEATURES | NetFeature.MQ | VirtioFeature.PROTOCOL_FEATURES),
        keys=(
            Key("mac", "mac", "MAC address (default 52:54:00:12:34:56)", "mac"),
            Key("mtu", "integer", "MTU, 68..65535 (default 1500)", "mtu"),
            Key("max_vqp", "integer", "queue pairs, 1..128 (default 1)", "queues"),
            Key("mode", "choice", "data path (default loopback)", "mode", SIM_NET_MODES),
            Key("ifname", "string", "TAP interface name (mode tap)", "ifname"),
            Key("frame_size", "integer", "generated frame size, 60..9000 (mode gen)", "frame-size"),
        ),
    ),
    "sim-blk": MgmtDev(
        name="sim-blk",
        device_api="virtio-blk",
        device_class="block",
        device_id=DeviceId.BLOCK,
        max_supported_vqs=64,
        dev_features=int(
            BLK_FEATURES | BlkFeature.RO | BlkFeature.MQ | VirtioFeature.PROTOCOL_FEATURES
        ),
        keys=(
            Key("path", "path", "disk image file (or size)", "path"),
            Key("size", "size", "RAM disk size: bytes, or 64K, 128M, 2G (or path)", "size"),
            Key("readonly", "boolean", "refuse writes (VIRTIO_BLK_F_RO)", "readonly"),
            Key("queues", "integer", "request queues, 1..64 (default 1)", "queues"),
            Key("serial", "string", "GET_ID serial (default the device name)", "serial"),
        ),
    ),
}


@dataclass(frozen=True, slots=True)
class DevAddRequest:
    """A validated ``dev add``: the device's spec and where it is served."""

    mgmtdev: MgmtDev
    spec: VdevSpec
    uuid: str | None
    #: vhost-user socket path (``None``: the manager picks one; always ``None`` for VDUSE).
    socket: str | None
    client: bool

    @property
    def name(self) -> str:
        """The device name."""
        return self.spec.name

    @property
    def bus(self) -> str:
        """``vhost-user`` or ``vduse``."""
        return self.spec.bus


def _value(key: Key, value: object) -> str:
    """``value`` of ``key`` checked against its kind, as its ``--vdev`` text."""
    if key.kind == "boolean":
        if not isinstance(value, bool):
            raise ConfigError(f"{key.name} must be true or false, not {value!r}")
        return "on" if value else "off"
    if key.kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key.name} must be an integer, not {value!r}")
        return str(value)
    if key.kind == "size" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key.name} must be a string, not {value!r}")
    if not value or len(value) > 4096 or not value.isprintable() or any(c in value for c in ",="):
        raise ConfigError(f"{key.name}: {value!r} is empty, too long or has ',', '=' or controls")
    if key.kind == "path" and not os.path.isabs(value):
        raise ConfigError(f"{key.name} must be an absolute path, not {value!r}")
    if key.kind == "choice" and value not in key.choices:
        raise ConfigError(f"{key.name} must be one of {', '.join(key.choices)}, not {value!r}")
    if key.kind == "uuid":
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise ConfigError(f"uuid: {value!r} is not a UUID") from None
    return value


def dev_add_request(
    params: dict[str, object], *, engine: EngineMode, cpus: tuple[int, ...] | None
) -> DevAddRequest:
    """Validate ``dev add`` parameters (``name``, ``mgmtdev`` and the type's keys)."""
    name, mgmtdev_name = params.get("name"), params.get("mgmtdev")
    if not isinstance(mgmtdev_name, str) or mgmtdev_name not in MGMTDEVS:
        known = ", ".join(MGMTDEVS)
        raise ConfigError(f"mgmtdev must be one of {known}, not {mgmtdev_name!r}")
    mgmtdev = MGMTDEVS[mgmtdev_name]
    # JSON may carry lone surrogates: counted here, refused as unprintable below.
    if not isinstance(name, str) or not name or len(name.encode(errors="surrogatepass")) > NAME_MAX:
        raise ConfigError(f"name must be a string of 1..{NAME_MAX} bytes, not {name!r}")
    if not name.isprintable() or any(c in name for c in " ,=/"):
        raise ConfigError(f"name {name!r}: printable, without spaces, ',', '=' or '/'")
    options = [f"name={name}"]
    extras: dict[str, str] = {}
    for key_name, value in params.items():
        if key_name in ("name", "mgmtdev"):
            continue
        key = mgmtdev.key(key_name)
        if key is None:
            known = ", ".join(k.name for k in (*COMMON_KEYS, *mgmtdev.keys))
            raise ConfigError(f"{mgmtdev.name} takes no key {key_name!r} ({known})")
        text = _value(key, value)
        if key.option is not None:
            options.append(f"{key.option}={text}")
        else:
            extras[key.name] = text
    if "bus" in extras:
        options.append(f"bus={extras['bus']}")
    spec = parse_vdev(",".join([mgmtdev.name, *options]))
    spec = replace(spec, engine=engine, cpus=cpus)
    if spec.bus == "vduse" and ("socket" in extras or "client" in extras):
        raise ConfigError("socket and client apply to bus vhost-user, not vduse")
    return DevAddRequest(
        mgmtdev=mgmtdev,
        spec=spec,
        uuid=extras.get("uuid"),
        socket=extras.get("socket"),
        client=extras.get("client") == "on",
    )
