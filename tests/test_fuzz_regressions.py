"""Regression tests for what the fuzz targets (``fuzz/``) found, one test per finding.

Each test replays the fuzzer's input through its target and checks the
parser itself on the reduced case.  The inputs are in the committed corpus
too (``fuzz/corpus/<target>/regression-*``), so every bounded run starts
from them.
"""

from __future__ import annotations

import argparse
import os

import pytest

from fuzz_targets import vdev
from pyvdpa.app import parse_cpus
from pyvdpa.devices.blk import BlkControl
from pyvdpa.errors import ConfigError
from pyvdpa.vdev import parse_size

CPUS = os.cpu_count() or 1


def test_regression_cpu_range_refused_before_it_is_expanded() -> None:
    # "0-100010001" built a list of a hundred million CPUs before checking
    # any of them against the machine: gigabytes, then a refusal.
    vdev.test_one_input(b"\x02sim-net,name=0\x000-100010001")
    with pytest.raises(argparse.ArgumentTypeError, match="this machine has CPUs"):
        parse_cpus("0-100010001")
    with pytest.raises(argparse.ArgumentTypeError, match="this machine has CPUs"):
        parse_cpus(f"0,{CPUS}-{10**30}")
    assert parse_cpus(f"0-{CPUS - 1}") == tuple(range(CPUS))


def test_regression_ram_disk_larger_than_any_file_is_a_config_error() -> None:
    # os.ftruncate raised OverflowError (and the memfd leaked) for a size
    # past 2**63: a traceback for a typo on the command line.
    vdev.test_one_input(b"\x00sim-blk,size=99999999999999999999T")
    with pytest.raises(ConfigError, match="RAM disk that large"):
        BlkControl(size=parse_size("99999999999999999999T"))


def test_regression_serial_with_undecodable_bytes_is_a_config_error() -> None:
    # A command line's bytes that are not UTF-8 reach Python as surrogates;
    # encoding the serial raised UnicodeEncodeError.
    vdev.test_one_input(b"\x04sim-blk,size=64M,readonly=on,serial=\x92\x96sk0,queues=2\x001-1")
    serial = b"\x92\x96sk0".decode("utf-8", "surrogateescape")
    with pytest.raises(ConfigError, match="serial is not valid UTF-8"):
        BlkControl(size=1 << 20, serial=serial)
