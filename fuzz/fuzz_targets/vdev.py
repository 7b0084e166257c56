"""``--vdev`` and ``--cpus``: what a user (or a script) types on ``pyvdpa run``'s command line.

Input: a byte naming the device index, then the ``--vdev`` text, then,
after a NUL byte, the ``--cpus`` text; both are decoded as the command
line is (UTF-8, undecodable bytes kept as surrogates).

The text is parsed by :func:`~pyvdpa.vdev.parse_vdev`; the kind's driver
names its data path program (checking ``mode=``), and every value is
parsed with the parser the drivers use for it.  ``--cpus`` goes to
:func:`~pyvdpa.app.parse_cpus`.

Verdict: each step returns or raises
:class:`~pyvdpa.errors.ConfigError` (``--cpus``: the
:class:`argparse.ArgumentTypeError` argparse turns into a usage error).
"""

from __future__ import annotations

import argparse

from fuzz_targets.reader import Reader
from pyvdpa.app import parse_cpus
from pyvdpa.errors import ConfigError
from pyvdpa.vdev import parse_bool, parse_int, parse_size, parse_vdev
from pyvdpa.vdpa.driver import DRIVERS
from pyvdpa.virtio.net import parse_mac

__all__ = ["test_one_input"]

#: Keys whose values are numbers, with the widest range any driver allows.
_NUMBERS = {"mtu": (68, 65535), "queues": (1, 128), "frame-size": (60, 9000)}


def _values(kind: str, text: str, options: dict[str, str]) -> None:
    for key, value in options.items():
        if key in _NUMBERS:
            parse_int(text, key, value, *_NUMBERS[key])
        elif key == "mac":
            parse_mac(value)
        elif key == "size":
            parse_size(value)
        elif key == "readonly":
            parse_bool(text, key, value)


def test_one_input(data: bytes) -> None:
    """Parse ``--vdev`` and ``--cpus`` as ``pyvdpa run`` does."""
    reader = Reader(data)
    index = reader.u8()
    vdev_text, _, cpus_text = reader.rest().partition(b"\0")
    vdev = vdev_text.decode("utf-8", "surrogateescape")
    try:
        spec = parse_vdev(vdev, index)
        assert spec.kind in DRIVERS and spec.name, spec
        DRIVERS[spec.kind]().program(spec)
        _values(spec.kind, spec.text, spec.options)
    except ConfigError:
        pass
    try:
        cpus = parse_cpus(cpus_text.decode("utf-8", "surrogateescape"))
        assert cpus and all(cpu >= 0 for cpu in cpus), cpus
    except argparse.ArgumentTypeError:
        pass
