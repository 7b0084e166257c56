"""``--vdev``, ``--cpus``, ``--metrics``: what a user types on ``pyvdpa run``'s command line.

Input: a byte naming the device index, then the ``--vdev`` text, then,
after a NUL byte, the ``--cpus`` text and, after another, the
``--metrics`` address; each is decoded as the command line is (UTF-8,
undecodable bytes kept as surrogates).

The text is parsed by :func:`~pyvdpa.vdev.parse_vdev`, the kind's driver
names its data path program (checking ``mode=``), and the driver builds
the simulated hardware and releases it again, parsing every value on the
way, as ``pyvdpa run`` does.  Devices that would touch the host are left
unbuilt: a disk image (``path=``) and a TAP interface (``mode=tap``).
``--cpus`` goes to :func:`~pyvdpa.app.parse_cpus`, ``--metrics`` to
:func:`~pyvdpa.manage.metrics.parse_address`.

Verdict: each step returns or raises
:class:`~pyvdpa.errors.ConfigError` (``--cpus`` and ``--metrics``: the
:class:`argparse.ArgumentTypeError` argparse turns into a usage error).
"""

from __future__ import annotations

import argparse

from fuzz_targets.reader import Reader
from pyvdpa.app import parse_cpus
from pyvdpa.errors import ConfigError
from pyvdpa.manage.metrics import parse_address
from pyvdpa.vdev import VdevSpec, parse_vdev
from pyvdpa.vdpa.driver import DRIVERS

__all__ = ["test_one_input"]


def _touches_host(spec: VdevSpec) -> bool:
    return "path" in spec.options or spec.options.get("mode") == "tap"


def test_one_input(data: bytes) -> None:
    """Parse ``--vdev``, ``--cpus`` and ``--metrics`` as ``pyvdpa run`` does."""
    reader = Reader(data)
    index = reader.u8()
    vdev_text, _, rest = reader.rest().partition(b"\0")
    cpus_text, _, metrics_text = rest.partition(b"\0")
    try:
        spec = parse_vdev(vdev_text.decode("utf-8", "surrogateescape"), index)
        assert spec.kind in DRIVERS and spec.name, spec
        driver = DRIVERS[spec.kind]()
        driver.program(spec)
        if not _touches_host(spec):
            driver.build(spec).close()
    except ConfigError:
        pass
    try:
        cpus = parse_cpus(cpus_text.decode("utf-8", "surrogateescape"))
        assert cpus and all(cpu >= 0 for cpu in cpus), cpus
    except argparse.ArgumentTypeError:
        pass
    try:
        host, port = parse_address(metrics_text.decode("utf-8", "surrogateescape"))
        assert host and 0 <= port <= 0xFFFF, (host, port)
    except argparse.ArgumentTypeError:
        pass
