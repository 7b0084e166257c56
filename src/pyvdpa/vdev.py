"""``--vdev`` device specifications: ``kind,key=value,...``.

The syntax is DPDK's ``--vdev`` devargs.  Each kind lists the keys it
accepts; anything else is a :class:`~pyvdpa.errors.ConfigError` naming the
offending key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvdpa.dataplane.engine import EngineMode
from pyvdpa.dataplane.net import ENGINE_NET_MODES
from pyvdpa.errors import ConfigError

__all__ = [
    "BUSES",
    "SIM_NET_MODES",
    "VDEV_KEYS",
    "VdevSpec",
    "parse_bool",
    "parse_int",
    "parse_size",
    "parse_vdev",
]

VDEV_KEYS: dict[str, frozenset[str]] = {
    "sim-net": frozenset(
        {"name", "mode", "ifname", "mac", "mtu", "queues", "frame-size", "burst", "bus"}
    ),
    "sim-blk": frozenset({"name", "path", "size", "readonly", "queues", "serial", "bus"}),
}

#: Where a device is served: a vhost-user socket (the default) or the kernel's
#: vDPA bus through VDUSE.
BUSES = ("vhost-user", "vduse")

#: sim-net modes, all on the compiled engine.
SIM_NET_MODES = ENGINE_NET_MODES

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``128M``, ``2G`` -> bytes."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    number, suffix = value, ""
    if value and value[-1] in _SUFFIXES:
        number, suffix = value[:-1], value[-1]
    try:
        result = int(number) * _SUFFIXES[suffix]
    except ValueError:
        raise ConfigError(f"invalid size {text!r} (e.g. 4096, 64K, 128M, 2G)") from None
    if result <= 0:
        raise ConfigError(f"size must be positive: {text!r}")
    return result


def parse_int(spec: str, key: str, text: str, low: int, high: int) -> int:
    """``key=text`` of ``--vdev spec`` as an integer in ``low..high``."""
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"{spec}: {key}={text!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{spec}: {key}={value} out of range {low}..{high}")
    return value


def parse_bool(spec: str, key: str, text: str) -> bool:
    """``key=text`` of ``--vdev spec`` as on/off."""
    lowered = text.lower()
    if lowered in ("on", "1", "yes", "true"):
        return True
    if lowered in ("off", "0", "no", "false"):
        return False
    raise ConfigError(f"{spec}: {key}={text!r} is not on/off")


@dataclass(frozen=True, slots=True)
class VdevSpec:
    """A parsed ``--vdev`` argument."""

    kind: str
    name: str
    options: dict[str, str]
    text: str

    @property
    def bus(self) -> str:
        """``vhost-user`` or ``vduse``."""
        return self.options.get("bus", BUSES[0])

    #: How the compiled data path's worker waits for work (``pyvdpa run --engine``).
    engine: EngineMode = EngineMode.ADAPTIVE
    #: CPUs the data path's workers are pinned to, one worker each (``pyvdpa run --cpus``).
    cpus: tuple[int, ...] | None = None


def parse_vdev(text: str, index: int = 0) -> VdevSpec:
    """Parse ``kind,key=value,...``; ``index`` names unnamed devices (``net0``, ``blk1``)."""
    kind, _, rest = text.partition(",")
    kind = kind.strip()
    if kind not in VDEV_KEYS:
        raise ConfigError(f"unknown device kind {kind!r} in --vdev {text!r} (sim-net, sim-blk)")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--vdev {text!r}: expected key=value, got {item!r}")
        if key not in VDEV_KEYS[kind]:
            allowed = ", ".join(sorted(VDEV_KEYS[kind]))
            raise ConfigError(f"--vdev {text!r}: unknown key {key!r} for {kind} ({allowed})")
        if key in options:
            raise ConfigError(f"--vdev {text!r}: key {key!r} given twice")
        options[key] = value
    if options.get("bus", BUSES[0]) not in BUSES:
        raise ConfigError(f"--vdev {text!r}: bus={options['bus']} is not one of {', '.join(BUSES)}")
    if kind == "sim-blk" and ("path" in options) == ("size" in options):
        raise ConfigError(f"--vdev {text!r}: sim-blk needs exactly one of path= or size=")
    default_name = ("net" if kind == "sim-net" else "blk") + str(index)
    return VdevSpec(kind, options.get("name", default_name), options, text)
