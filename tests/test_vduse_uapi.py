"""The VDUSE kernel interface: layouts, ioctl numbers, config refusals, hostile input.

Sizes and offsets are the kernel's ``sizeof`` / ``offsetof`` for
``include/uapi/linux/vduse.h`` (API version 0, Linux 6.12) on a 64-bit
machine; ioctl numbers are ``dir << 30 | size << 16 | 0x81 << 8 | nr``
worked out by hand.  Every decoder is fed garbage and must raise only
:class:`VduseProtocolError`.  The system-call layer is exercised on what
this host has: no ``/dev/vduse``, and ordinary files standing in for a
device.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.errors import ConfigError, GuestMemoryError, LocalProtocolError, RemoteProtocolError
from pyvdpa.vduse import kernel
from pyvdpa.vduse.kernel import (
    IotlbMapping,
    VduseBusyError,
    VduseControl,
    VduseDevice,
    VduseKernelError,
    VduseNameInUseError,
    VduseNoDeviceError,
    VdusePermissionError,
    VduseUnavailableError,
    map_iotlb_entry,
)
from pyvdpa.vduse.uapi import (
    REQUEST_SIZE,
    RESPONSE_SIZE,
    ConfigData,
    DeviceConfig,
    GetVqStateRequest,
    IoctlDirection,
    IotlbAccess,
    IotlbEntry,
    IovaCapability,
    IovaInfo,
    IovaUmem,
    PackedState,
    RequestType,
    Response,
    ResponseResult,
    SetStatusRequest,
    SplitState,
    UpdateIotlbRequest,
    VduseConfigError,
    VduseEncodeError,
    VduseFieldError,
    VduseIoctl,
    VduseIovaRangeError,
    VduseProtocolError,
    VduseRequestTypeError,
    VduseSizeError,
    VduseStatusError,
    VduseVqIndexError,
    VqConfig,
    VqEventfd,
    VqInfo,
    VqState,
    decode_request,
    decode_u64,
    encode_name,
    ioctl_number,
    validate_device_config,
)
from pyvdpa.virtio.constants import BlkFeature, DeviceId, DeviceStatus, NetFeature, VirtioFeature

pytestmark = pytest.mark.usefixtures("no_fd_leak")

NET_FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM | NetFeature.MAC
BLK_FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM | BlkFeature.FLUSH


def u(value: int, size: int) -> bytes:
    """``value`` as a native-order unsigned field of ``size`` bytes."""
    return value.to_bytes(size, sys.byteorder)


# --- sizes and ioctl numbers -------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (DeviceConfig.LAYOUT, 336),
        (VqConfig.LAYOUT, 32),
        (VqInfo.LAYOUT, 48),
        (VqEventfd.LAYOUT, 8),
        (IotlbEntry.LAYOUT, 32),
        (ConfigData.LAYOUT, 8),
        (IovaUmem.LAYOUT, 48),
        (IovaInfo.LAYOUT, 48),
        (VqState.LAYOUT, 12),
        (SplitState.LAYOUT, 8),
        (PackedState.LAYOUT, 8),
        (GetVqStateRequest.LAYOUT, 152),
        (SetStatusRequest.LAYOUT, 152),
        (UpdateIotlbRequest.LAYOUT, 152),
        (Response.LAYOUT, 152),
    ],
)
def test_layout_sizes_match_the_kernel(layout: struct.Struct, size: int) -> None:
    assert layout.size == size


def test_request_and_response_sizes() -> None:
    assert REQUEST_SIZE == RESPONSE_SIZE == 152


#: Worked out by hand from the header: _IOC(dir, 0x81, nr, sizeof(arg)).
IOCTLS = {
    "GET_API_VERSION": 0x80088100,  # _IOR(0x00, __u64)
    "SET_API_VERSION": 0x40088101,  # _IOW(0x01, __u64)
    "CREATE_DEV": 0x41508102,  # _IOW(0x02, 336)
    "DESTROY_DEV": 0x41008103,  # _IOW(0x03, char[256])
    "IOTLB_GET_FD": 0xC0208110,  # _IOWR(0x10, 32)
    "DEV_GET_FEATURES": 0x80088111,  # _IOR(0x11, __u64)
    "DEV_SET_CONFIG": 0x40088112,  # _IOW(0x12, 8)
    "DEV_INJECT_CONFIG_IRQ": 0x00008113,  # _IO(0x13)
    "VQ_SETUP": 0x40208114,  # _IOW(0x14, 32)
    "VQ_GET_INFO": 0xC0308115,  # _IOWR(0x15, 48)
    "VQ_SETUP_KICKFD": 0x40088116,  # _IOW(0x16, 8)
    "VQ_INJECT_IRQ": 0x40048117,  # _IOW(0x17, __u32)
    "IOTLB_REG_UMEM": 0x40308118,  # _IOW(0x18, 48)
    "IOTLB_DEREG_UMEM": 0x40308119,  # _IOW(0x19, 48)
    "IOTLB_GET_INFO": 0xC030811A,  # _IOWR(0x1a, 48)
}


def test_ioctl_numbers_match_the_header() -> None:
    assert {m.name: m.value for m in VduseIoctl} == IOCTLS


def test_ioctl_number_refuses_oversized_arguments() -> None:
    with pytest.raises(ValueError, match="14 bits"):
        ioctl_number(IoctlDirection.WRITE, 0, 1 << 14)


# --- exact byte layouts ------------------------------------------------------


def test_device_config_bytes() -> None:
    config = DeviceConfig("blk0", 0x1AF4, 2, BLK_FEATURES, 1, 4096, b"\x01\x02\x03")
    data = config.encode()
    assert len(data) == 336 + 3
    assert data[:256] == b"blk0" + bytes(252)
    assert data[256:260] == u(0x1AF4, 4)
    assert data[260:264] == u(2, 4)
    assert data[264:272] == u(int(BLK_FEATURES), 8)
    assert data[272:276] == u(1, 4)
    assert data[276:280] == u(4096, 4)
    assert data[280:332] == bytes(52)
    assert data[332:336] == u(3, 4)
    assert data[336:] == b"\x01\x02\x03"
    assert DeviceConfig.decode(data) == config


def test_vq_config_and_eventfd_bytes() -> None:
    assert VqConfig(3, 256).encode() == u(3, 4) + u(256, 2) + bytes(26)
    assert VqEventfd(1, 7).encode() == u(1, 4) + u(7, 4)
    assert VqEventfd(1, -1).encode() == u(1, 4) + b"\xff" * 4


def test_vq_info_bytes_split_and_packed() -> None:
    head = u(2, 4) + u(256, 4) + u(0x1000, 8) + u(0x2000, 8) + u(0x3000, 8)
    split = head + u(0x1234, 2) + bytes(6) + b"\x01" + bytes(7)
    info = VqInfo.decode(split, packed=False)
    assert info == VqInfo(2, 256, 0x1000, 0x2000, 0x3000, SplitState(0x1234), True)
    assert info.encode() == split
    packed = head + u(1, 2) + u(5, 2) + u(0, 2) + u(0x7FFF, 2) + b"\x00" + bytes(7)
    info = VqInfo.decode(packed, packed=True)
    assert info.state == PackedState(1, 5, 0, 0x7FFF)
    assert info.ready is False
    assert info.encode() == packed
    assert VqInfo.request(9) == bytearray(u(9, 4) + bytes(44))


def test_iotlb_entry_bytes() -> None:
    data = u(0x1000, 8) + u(0x4000, 8) + u(0x4FFF, 8) + b"\x03" + bytes(7)
    entry = IotlbEntry.decode(data)
    assert entry == IotlbEntry(0x1000, 0x4000, 0x4FFF, IotlbAccess.RW)
    assert entry.size == 0x1000
    assert entry.encode() == data
    assert IotlbEntry.request(5, 5) == bytearray(u(0, 8) + u(5, 8) + u(5, 8) + bytes(8))


def test_config_data_umem_and_info_bytes() -> None:
    assert ConfigData(4, b"ab").encode() == u(4, 4) + u(2, 4) + b"ab"
    assert IovaUmem(0x7F00_0000, 0, 1 << 26).encode() == (
        u(0x7F00_0000, 8) + u(0, 8) + u(1 << 26, 8) + bytes(24)
    )
    data = u(0, 8) + u((1 << 26) - 1, 8) + u(1, 8) + bytes(24)
    assert IovaInfo.decode(data) == IovaInfo(0, (1 << 26) - 1, IovaCapability.UMEM)
    assert IovaInfo.request(0, 10) == bytearray(u(0, 8) + u(10, 8) + bytes(32))


def request_bytes(kind: int, request_id: int, union: bytes) -> bytes:
    """A request as the kernel lays it out: type, id, 4 reserved words, 128-byte union."""
    return u(kind, 4) + u(request_id, 4) + bytes(16) + union.ljust(128, b"\0")


def test_decode_each_request_type() -> None:
    get = decode_request(request_bytes(0, 7, u(1, 4)), vq_num=2)
    assert get == GetVqStateRequest(7, 1)
    status = decode_request(request_bytes(1, 8, b"\x0f"), vq_num=2)
    assert status == SetStatusRequest(8, DeviceStatus(0x0F))
    iotlb = decode_request(request_bytes(2, 9, u(0, 8) + u(2**64 - 1, 8)), vq_num=2)
    assert iotlb == UpdateIotlbRequest(9, 0, 2**64 - 1)
    for request in (get, status, iotlb):
        assert request.encode() == request_bytes(request.TYPE, request.request_id, _union(request))


def _union(request: GetVqStateRequest | SetStatusRequest | UpdateIotlbRequest) -> bytes:
    if isinstance(request, GetVqStateRequest):
        return u(request.index, 4)
    if isinstance(request, SetStatusRequest):
        return bytes([request.status])
    return u(request.start, 8) + u(request.last, 8)


def test_response_bytes() -> None:
    assert Response(5).encode() == u(5, 4) + u(0, 4) + bytes(144)
    assert Response(6, ResponseResult.FAILED).encode() == u(6, 4) + u(1, 4) + bytes(144)
    split = Response(7, vq_state=VqState(3, SplitState(0xBEEF)))
    data = split.encode()
    assert data == u(7, 4) + u(0, 4) + bytes(16) + u(3, 4) + u(0xBEEF, 2) + bytes(122)
    assert Response.decode(data, packed=False) == split
    packed = Response(8, vq_state=VqState(1, PackedState(1, 0x10, 1, 0x20)))
    data = packed.encode()
    assert data[24:36] == u(1, 4) + u(1, 2) + u(0x10, 2) + u(1, 2) + u(0x20, 2)
    assert len(data) == RESPONSE_SIZE
    assert Response.decode(data, packed=True) == packed


def test_u64_and_name() -> None:
    assert decode_u64(u(2**63 + 5, 8)) == 2**63 + 5
    assert encode_name("x") == b"x" + bytes(255)
    assert len(encode_name("a" * 255)) == 256


# --- round trips -------------------------------------------------------------

u16s = st.integers(0, 0xFFFF)
u32s = st.integers(0, 2**32 - 1)
u64s = st.integers(0, 2**64 - 1)
split_states = st.builds(SplitState, u16s)
packed_states = st.builds(
    PackedState,
    st.integers(0, 1),
    st.integers(0, 0x7FFF),
    st.integers(0, 1),
    st.integers(0, 0x7FFF),
)
names = st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=60)


@given(names, u32s, u32s, u64s, u32s, u32s, st.binary(max_size=64))
def test_device_config_round_trip(
    name: str, vendor: int, device: int, features: int, vq_num: int, align: int, config: bytes
) -> None:
    cfg = DeviceConfig(name, vendor, device, features, vq_num, align, config)
    assert DeviceConfig.decode(cfg.encode()) == cfg


@given(
    u32s,
    st.integers(0, 32768),
    u64s,
    u64s,
    u64s,
    st.one_of(split_states, packed_states),
    st.booleans(),
)
def test_vq_info_round_trip(
    index: int,
    num: int,
    desc: int,
    driver: int,
    device: int,
    state: SplitState | PackedState,
    ready: bool,
) -> None:
    info = VqInfo(index, num, desc, driver, device, state, ready)
    assert VqInfo.decode(info.encode(), packed=isinstance(state, PackedState)) == info


@given(u32s, st.integers(0, 7), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_request_round_trip(request_id: int, index: int, a: int, b: int) -> None:
    start, last = min(a, b), max(a, b)
    status = DeviceStatus(a & 0xCF)
    for request in (
        GetVqStateRequest(request_id, index),
        SetStatusRequest(request_id, status),
        UpdateIotlbRequest(request_id, start, last),
    ):
        assert decode_request(request.encode(), vq_num=8) == request


@given(u32s, st.integers(1, 2**32 - 1), st.one_of(split_states, packed_states))
def test_response_round_trip(request_id: int, index: int, state: SplitState | PackedState) -> None:
    response = Response(request_id, vq_state=VqState(index, state))
    assert Response.decode(response.encode(), packed=isinstance(state, PackedState)) == response


@given(u32s, st.integers(1, 32768), st.integers(-1, 2**31 - 1), u32s, st.binary(min_size=1))
def test_small_structs_round_trip(index: int, size: int, fd: int, offset: int, data: bytes) -> None:
    assert VqConfig.decode(VqConfig(index, size).encode()) == VqConfig(index, size)
    assert VqEventfd.decode(VqEventfd(index, fd).encode()) == VqEventfd(index, fd)
    assert ConfigData.decode(ConfigData(offset, data).encode()) == ConfigData(offset, data)
    umem = IovaUmem(offset, index, size)
    assert IovaUmem.decode(umem.encode()) == umem


# --- the device config refusals ---------------------------------------------


NET = DeviceConfig("net0", 0, DeviceId.NET, int(NET_FEATURES), 2, 4096, bytes(12))
BLK = DeviceConfig("blk0", 0, DeviceId.BLOCK, int(BLK_FEATURES), 1, 4096, bytes(60))


def net(**changes: Any) -> DeviceConfig:
    """A net config the kernel accepts, with ``changes``."""
    return dataclasses.replace(NET, **changes)


def blk(**changes: Any) -> DeviceConfig:
    """A blk config the kernel accepts, with ``changes``."""
    return dataclasses.replace(BLK, **changes)


@pytest.mark.parametrize(
    "config",
    [
        net(),
        blk(),
        net(vq_align=4096, config=bytes(4096), vq_num=0xFFFF),
        net(name="n" * 255),
        blk(features=int(BLK_FEATURES | BlkFeature.RO | VirtioFeature.RING_PACKED)),
        net(features=int(NET_FEATURES | NetFeature.MQ)),
    ],
)
def test_configs_the_kernel_accepts(config: DeviceConfig) -> None:
    validate_device_config(config, page_size=4096)


@pytest.mark.parametrize(
    ("config", "line"),
    [
        (net(features=int(NET_FEATURES & ~VirtioFeature.ACCESS_PLATFORM)), "ACCESS_PLATFORM"),
        (blk(features=int(BLK_FEATURES & ~VirtioFeature.ACCESS_PLATFORM)), "ACCESS_PLATFORM"),
        (blk(features=int(BLK_FEATURES | BlkFeature.CONFIG_WCE)), "CONFIG_WCE"),
        (net(features=int(NET_FEATURES | NetFeature.CTRL_VQ)), "CTRL_VQ"),
        (net(features=int(NET_FEATURES & ~VirtioFeature.VERSION_1)), "VERSION_1"),
        (net(device_id=DeviceId.CONSOLE), "not net (1) or block (2)"),
        (net(device_id=DeviceId.FS), "not net (1) or block (2)"),
        (net(device_id=0), "not net (1) or block (2)"),
        (net(vq_align=4097), "vq_align 4097 is above the page size 4096"),
        (net(config=bytes(4097)), "4097 bytes is above the page size 4096"),
        (net(vq_num=0x10000), "65536 virtqueues"),
        (net(name=""), "device name is empty"),
        (net(name="n" * 256), "256 bytes long"),
        (net(name="é" * 128), "256 bytes long"),
        (net(name="a/b"), "contains '/'"),
        (net(name="a\0b"), "NUL"),
        (net(vendor_id=2**32), "vendor_id"),
    ],
)
def test_configs_the_kernel_refuses(config: DeviceConfig, line: str) -> None:
    with pytest.raises(VduseConfigError, match=re.escape(line)) as info:
        validate_device_config(config, page_size=4096)
    assert isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)


def test_blk_may_offer_net_bit_numbers() -> None:
    # Bit 17 is CTRL_VQ for net only; for blk it is another feature.
    validate_device_config(blk(features=int(BLK_FEATURES | NetFeature.CTRL_VQ)), page_size=4096)


# --- hostile requests --------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 24, 151, 153, 304])
def test_request_of_the_wrong_size(size: int) -> None:
    with pytest.raises(VduseSizeError, match=f"{size} bytes") as info:
        decode_request(bytes(size), vq_num=1)
    assert info.value.request_id is None


@pytest.mark.parametrize("kind", [3, 4, 0xFFFFFFFF])
def test_unknown_request_type(kind: int) -> None:
    with pytest.raises(VduseRequestTypeError, match=f"type {kind}") as info:
        decode_request(request_bytes(kind, 42, b""), vq_num=1)
    assert info.value.request_id == 42


@pytest.mark.parametrize("index", [2, 3, 0xFFFFFFFF])
def test_vq_index_out_of_range(index: int) -> None:
    with pytest.raises(VduseVqIndexError, match=f"queue {index}") as info:
        decode_request(request_bytes(RequestType.GET_VQ_STATE, 43, u(index, 4)), vq_num=2)
    assert info.value.request_id == 43


@pytest.mark.parametrize("status", [0x10, 0x20, 0x3F, 0xFF])
def test_status_with_reserved_bits(status: int) -> None:
    with pytest.raises(VduseStatusError, match="reserved bits") as info:
        decode_request(request_bytes(RequestType.SET_STATUS, 44, bytes([status])), vq_num=1)
    assert info.value.request_id == 44


@pytest.mark.parametrize("status", [0, 1, 3, 0x0B, 0x0F, 0x40, 0x80, 0xCF])
def test_status_with_known_bits(status: int) -> None:
    request = decode_request(request_bytes(RequestType.SET_STATUS, 1, bytes([status])), vq_num=1)
    assert isinstance(request, SetStatusRequest)
    assert request.status == status


def test_iotlb_range_that_ends_before_it_starts() -> None:
    data = request_bytes(RequestType.UPDATE_IOTLB, 45, u(0x2000, 8) + u(0x1FFF, 8))
    with pytest.raises(VduseIovaRangeError, match="ends before it starts") as info:
        decode_request(data, vq_num=1)
    assert info.value.request_id == 45


def test_reserved_words_and_union_padding_are_ignored() -> None:
    data = bytearray(request_bytes(RequestType.SET_STATUS, 46, b"\x01"))
    data[8:24] = b"\xaa" * 16
    data[26:] = b"\x55" * (REQUEST_SIZE - 26)
    assert decode_request(bytes(data), vq_num=1) == SetStatusRequest(46, DeviceStatus(1))


@pytest.mark.parametrize(
    ("decode", "data", "error"),
    [
        (
            lambda d: VqInfo.decode(d, packed=False),
            bytes(32) + bytes(8) + b"\x02" + bytes(7),
            VduseFieldError,
        ),
        (
            lambda d: VqInfo.decode(d, packed=False),
            u(0, 4) + u(32769, 4) + bytes(40),
            VduseFieldError,
        ),
        (lambda d: VqInfo.decode(d, packed=True), bytes(32) + u(2, 2) + bytes(14), VduseFieldError),
        (
            lambda d: VqInfo.decode(d, packed=True),
            bytes(34) + u(0x8000, 2) + bytes(12),
            VduseFieldError,
        ),
        (IotlbEntry.decode, bytes(24) + b"\x00" + bytes(7), VduseFieldError),
        (IotlbEntry.decode, bytes(24) + b"\x04" + bytes(7), VduseFieldError),
        (IotlbEntry.decode, u(0, 8) + u(2, 8) + u(1, 8) + b"\x01" + bytes(7), VduseIovaRangeError),
        (IovaInfo.decode, u(2, 8) + u(1, 8) + bytes(32), VduseIovaRangeError),
        (IovaInfo.decode, bytes(16) + u(2, 8) + bytes(24), VduseFieldError),
        (VqConfig.decode, u(0, 4) + u(0, 2) + bytes(26), VduseFieldError),
        (VqConfig.decode, u(0, 4) + u(8, 2) + b"\x01" + bytes(25), VduseFieldError),
        (VqEventfd.decode, u(0, 4) + u(0xFFFFFFFE, 4), VduseFieldError),
        (IovaUmem.decode, bytes(24) + b"\x01" + bytes(23), VduseFieldError),
        (ConfigData.decode, u(0, 4) + u(0, 4), VduseFieldError),
        (ConfigData.decode, u(0, 4) + u(5, 4) + b"abc", VduseSizeError),
        (DeviceConfig.decode, b"x" * 256 + bytes(80), VduseFieldError),
        (DeviceConfig.decode, bytes(336), VduseFieldError),
        (DeviceConfig.decode, b"n\0" + bytes(330) + u(1, 4), VduseSizeError),
        (
            lambda d: Response.decode(d, packed=False),
            u(1, 4) + u(2, 4) + bytes(144),
            VduseFieldError,
        ),
        (
            lambda d: Response.decode(d, packed=False),
            u(1, 4) + u(0, 4) + b"\x01" + bytes(143),
            VduseFieldError,
        ),
        (
            lambda d: Response.decode(d, packed=False),
            u(1, 4) + u(1, 4) + bytes(16) + u(1, 4) + bytes(124),
            VduseFieldError,
        ),
    ],
)
def test_hostile_structs(
    decode: Callable[[bytes], object], data: bytes, error: type[VduseProtocolError]
) -> None:
    with pytest.raises(error):
        decode(data)


DECODERS: list[tuple[Callable[[bytes], object], int]] = [
    (lambda d: decode_request(d, vq_num=2), REQUEST_SIZE),
    (lambda d: Response.decode(d, packed=False), RESPONSE_SIZE),
    (lambda d: Response.decode(d, packed=True), RESPONSE_SIZE),
    (lambda d: VqInfo.decode(d, packed=False), 48),
    (lambda d: VqInfo.decode(d, packed=True), 48),
    (DeviceConfig.decode, 336),
    (VqConfig.decode, 32),
    (VqEventfd.decode, 8),
    (IotlbEntry.decode, 32),
    (ConfigData.decode, 8),
    (IovaUmem.decode, 48),
    (IovaInfo.decode, 48),
    (decode_u64, 8),
]


@pytest.mark.parametrize(("decode", "size"), DECODERS)
@settings(max_examples=300)
@given(data=st.data())
def test_garbage_raises_only_typed_errors(
    decode: Callable[[bytes], object], size: int, data: st.DataObject
) -> None:
    garbage = data.draw(
        st.one_of(
            st.binary(max_size=2 * size + 8),
            st.binary(min_size=size, max_size=size),
            st.binary(min_size=size, max_size=size).map(lambda b: b[:4] + bytes(len(b) - 4)),
        )
    )
    try:
        decode(garbage)
    except VduseProtocolError as exc:
        assert isinstance(exc, RemoteProtocolError)
        assert str(exc)


@settings(max_examples=300)
@given(st.integers(0, 5), u32s, st.binary(min_size=128, max_size=128))
def test_garbage_requests_keep_their_id(kind: int, request_id: int, union: bytes) -> None:
    data = u(kind, 4) + u(request_id, 4) + bytes(16) + union
    try:
        decode_request(data, vq_num=2)
    except VduseProtocolError as exc:
        assert exc.request_id == request_id


# --- encoding our own values -------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: VqConfig(0, 0).encode(),
        lambda: VqConfig(0, 32769).encode(),
        lambda: VqConfig(2**32, 1).encode(),
        lambda: VqEventfd(0, -2).encode(),
        lambda: ConfigData(0, b"").encode(),
        lambda: Response(2**32).encode(),
        lambda: Response(1, ResponseResult.FAILED, VqState(0, SplitState(1))).encode(),
        lambda: Response(1, vq_state=VqState(0, PackedState(2, 0, 0, 0))).encode(),
        lambda: Response(1, vq_state=VqState(0, SplitState(0x10000))).encode(),
        lambda: SetStatusRequest(1, DeviceStatus(0x10)).encode(),
        lambda: UpdateIotlbRequest(1, 5, 4).encode(),
        lambda: IotlbEntry.request(5, 4),
        lambda: IovaInfo.request(5, 4),
        lambda: DeviceConfig("a/b", 0, 1, 0, 1, 1).encode(),
    ],
)
def test_encoding_refuses_values_that_do_not_fit(make: Callable[[], object]) -> None:
    with pytest.raises(VduseEncodeError) as info:
        make()
    assert isinstance(info.value, LocalProtocolError)


# --- the system-call layer on this host --------------------------------------


@pytest.mark.skipif(os.path.exists(kernel.CONTROL_PATH), reason="this kernel has VDUSE")
def test_no_control_device_names_the_module() -> None:
    with pytest.raises(VduseUnavailableError) as info:
        VduseControl()
    assert str(info.value) == "no /dev/vduse/control: load the vduse module (Linux 5.15+) (ENOENT)"
    assert info.value.errno == errno.ENOENT


def test_missing_device_node(tmp_path: Path) -> None:
    with pytest.raises(VduseNoDeviceError, match="create VDUSE device 'blk0' first"):
        VduseDevice("blk0", vq_num=1, directory=str(tmp_path))


def test_device_names_are_checked_before_opening(tmp_path: Path) -> None:
    with pytest.raises(VduseConfigError, match="contains '/'"):
        VduseDevice("../x", vq_num=1, directory=str(tmp_path))


def test_control_closes_its_fd_when_the_api_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control"
    path.write_bytes(b"")
    with pytest.raises(VduseKernelError, match="VDUSE_SET_API_VERSION failed") as info:
        VduseControl(str(path))
    assert info.value.errno == errno.ENOTTY


def test_ioctl_errors_name_the_ioctl(tmp_path: Path) -> None:
    (tmp_path / "dev0").write_bytes(b"")
    with VduseDevice("dev0", vq_num=1, directory=str(tmp_path)) as device:
        with pytest.raises(VduseKernelError, match=r"VDUSE_DEV_GET_FEATURES failed.*ENOTTY"):
            device.get_features()
        with pytest.raises(VduseKernelError, match="VDUSE_VQ_SETUP failed"):
            device.setup_vq(0, 256)
        with pytest.raises(VduseEncodeError):
            device.setup_vq(0, 0)


def test_requests_read_and_responses_written(tmp_path: Path) -> None:
    path = tmp_path / "dev0"
    path.write_bytes(request_bytes(RequestType.SET_STATUS, 11, b"\x07"))
    with VduseDevice("dev0", vq_num=1, directory=str(tmp_path)) as device:
        assert device.read_request() == SetStatusRequest(11, DeviceStatus(7))
        with pytest.raises(VduseSizeError):
            device.read_request()
        device.write_response(Response(11))
    assert path.read_bytes()[REQUEST_SIZE:] == Response(11).encode()


def test_closed_device(tmp_path: Path) -> None:
    (tmp_path / "dev0").write_bytes(b"")
    device = VduseDevice("dev0", vq_num=1, directory=str(tmp_path))
    device.close()
    device.close()
    with pytest.raises(VduseKernelError, match="is closed"):
        device.fileno()


@pytest.mark.parametrize(
    ("op", "code", "cls", "line"),
    [
        (kernel._Op.OPEN_CONTROL, errno.EACCES, VdusePermissionError, "needs root"),
        (kernel._Op.OPEN_CONTROL, errno.ENXIO, VduseUnavailableError, "load the vduse module"),
        (kernel._Op.CREATE, errno.EEXIST, VduseNameInUseError, "named 'd' exists already"),
        (kernel._Op.CREATE, errno.EPERM, VdusePermissionError, "CAP_NET_ADMIN"),
        (kernel._Op.DESTROY, errno.EBUSY, VduseBusyError, "vdpa dev del"),
        (kernel._Op.DESTROY, errno.EINVAL, VduseNoDeviceError, "no VDUSE device named 'd'"),
        (kernel._Op.OPEN_DEVICE, errno.EBUSY, VduseBusyError, "already open by another process"),
        (kernel._Op.IOCTL, errno.EPERM, kernel.VduseBrokenError, "is broken"),
        (kernel._Op.WRITE, errno.ENOENT, kernel.VduseRefusedError, "no pending request"),
        (kernel._Op.READ, errno.EIO, VduseKernelError, "failed: Input/output error"),
    ],
)
def test_errno_mapping(op: kernel._Op, code: int, cls: type[VduseKernelError], line: str) -> None:
    error = kernel._kernel_error(op, OSError(code, os.strerror(code)), "the call", "d")
    assert type(error) is cls
    assert line in str(error)
    assert str(error).endswith(f"({errno.errorcode[code]})")
    assert error.errno == code


def test_iotlb_mapping(tmp_path: Path) -> None:
    fd = os.memfd_create("iotlb")
    try:
        os.ftruncate(fd, 3 * mmap.PAGESIZE)
        os.pwrite(fd, b"hello", mmap.PAGESIZE + 16)
        entry = IotlbEntry(mmap.PAGESIZE + 16, 0x10000, 0x10000 + 99, IotlbAccess.RW)
        mapping = map_iotlb_entry(fd, entry)
    finally:
        os.close(fd)
    assert isinstance(mapping, IotlbMapping)
    assert mapping.base == 16
    view = mapping.view(0x10000, 5)
    assert bytes(view) == b"hello"
    view[0:1] = b"j"
    view.release()
    with pytest.raises(GuestMemoryError):
        mapping.view(0x10000 + 96, 5)
    with pytest.raises(GuestMemoryError):
        mapping.view(0xFFFF, 1)
    mapping.close()


def test_iotlb_mapping_too_large() -> None:
    fd = os.memfd_create("iotlb")
    try:
        entry = IotlbEntry(0, 0, 2**64 - 1, IotlbAccess.RO)
        with pytest.raises(kernel.VduseRefusedError, match="cannot be mapped"):
            map_iotlb_entry(fd, entry, "d")
    finally:
        os.close(fd)
