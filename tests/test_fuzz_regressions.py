"""Regression tests for what the fuzz targets (``fuzz/``) found, one test per finding.

Each test replays the fuzzer's input through its target and checks the
parser itself on the reduced case.  The inputs are in the committed corpus
too (``fuzz/corpus/<target>/regression-*``), so every bounded run starts
from them.
"""

from __future__ import annotations

import argparse
import os
import struct

import pytest

from fuzz_targets import chain, control, kernel, vdev
from pyvdpa.app import parse_cpus
from pyvdpa.dataplane.engine import EngineMode
from pyvdpa.devices.blk import BlkControl
from pyvdpa.errors import ConfigError
from pyvdpa.manage.methods import call
from pyvdpa.manage.mgmtdev import dev_add_request
from pyvdpa.manage.operations import Manager
from pyvdpa.manage.rpc import INVALID_PARAMS, RpcError, parse_request
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


def test_regression_dev_add_name_with_a_lone_surrogate_is_invalid_params() -> None:
    # JSON's "\ud800" decodes to a lone surrogate; measuring the name in
    # UTF-8 raised UnicodeEncodeError, which the control socket answered as
    # an internal error.
    params = b'{"name":"\\ud800","mgmtdev":"sim-net"}'
    line = b'{"jsonrpc":"2.0","id":1,"method":"dev_add","params":' + params + b"}"
    control.test_one_input(b"\x05" + line + b"\n")
    with pytest.raises(ConfigError, match="printable"):
        dev_add_request(
            {"name": "\ud800", "mgmtdev": "sim-net"}, engine=EngineMode.ADAPTIVE, cpus=None
        )
    with pytest.raises(RpcError) as info:
        call(Manager(log=lambda line: None), parse_request(line))
    assert info.value.code == INVALID_PARAMS


def _split_ring_past_2_64() -> bytes:
    """A split ring of 4 behind an identity-mapped IOMMU; its one buffer runs past 2**64."""
    image = bytearray(0x600)
    struct.pack_into("<QIHH", image, 0x0, 0xFFFF_FFFF_FFFF_F000, 0x2000, 2, 0)  # WRITE
    struct.pack_into("<HHH", image, 0x200, 0, 1, 0)  # avail: idx 1, ring[0] = 0
    iommu = bytes([0x10, 2, 0, 0]) + bytes([1, 0, 0, 3, 3])  # 4 pages one to one, RW
    return iommu + bytes(image)


@pytest.mark.parametrize(
    "data",
    [
        # The fuzzer's input, minimised: a packed ring of 8 whose first descriptor
        # is 0xff000707 bytes at 0xffffffffffffff00.
        bytes.fromhex("1f070080010000030300ffffffffffffff070700ff00008107"),
        _split_ring_past_2_64(),
    ],
    ids=["packed", "split"],
)
def test_regression_buffer_past_2_64_behind_an_iommu_breaks_the_ring(data: bytes) -> None:
    chain.check(data)


def test_regression_netlink_error_beyond_any_errno_is_a_protocol_error() -> None:
    # The fuzzer's input: an NLMSG_ERROR carrying -2**31, which os.strerror cannot name
    # (the parser's own case is in test_vdpa_netlink's hostile datagrams).
    kernel.test_one_input(bytes.fromhex("160c2400240000000200000105000000ff05ffff00000080"))
