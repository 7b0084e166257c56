"""The vhost-vdpa kernel interface: layouts, ioctl numbers, decoders, and the device class.

The host kernel has no vhost_vdpa, so the device class is exercised where
it can be: opening paths that are not vhost-vdpa devices, IOTLB messages
written into a pipe and read back, and ioctls answered by a fake kernel that
checks every argument is a mutable buffer of the request's size.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.errors import ConfigError
from pyvdpa.vhost_vdpa.device import (
    DeviceBusyError,
    DeviceError,
    DeviceNotFoundError,
    DevicePermissionError,
    IoctlError,
    IotlbUpdateError,
    NotOwnerError,
    NotVhostVdpaError,
    UnsupportedIoctlError,
    VhostVdpaDevice,
)
from pyvdpa.vhost_vdpa.uapi import (
    INT,
    IOTLB_MSG_V2,
    U8,
    U16,
    U32,
    U64,
    VHOST_VIRTIO,
    BackendFeature,
    FeaturesRefusedError,
    InvalidRequestError,
    Ioctl,
    IoctlDir,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    IovaRange,
    KernelDataError,
    MsgV2,
    StatusRefusedError,
    VdpaConfig,
    VhostVdpaError,
    VringAddr,
    VringAddrFlags,
    VringFile,
    VringState,
    check_status,
    decode_scalar,
    encode_scalar,
    ioctl_number,
)
from pyvdpa.virtio.constants import DeviceStatus

pytestmark = pytest.mark.usefixtures("no_fd_leak")

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
PERMS = (IotlbPerm.RO, IotlbPerm.WO, IotlbPerm.RW)


def le(value: int, size: int, *, signed: bool = False) -> bytes:
    """``value`` in the host's byte order, as the kernel lays out native integers."""
    return value.to_bytes(size, sys.byteorder, signed=signed)


# ---------------------------------------------------------------------- ioctl numbers

# (direction macro, nr, size of the C argument type, number derived by hand).
# _IOC(dir, 0xAF, nr, size) = dir << 30 | size << 16 | 0xAF << 8 | nr, with
# _IOW = 1, _IOR = 2, _IOWR = 3; sizes: __u8 1, __u16 2, __u32 / int /
# unsigned int 4, __u64 8, vhost_vring_state 8, vhost_vring_file 8,
# vhost_vring_addr 40, vhost_vdpa_config 8 (flexible array), iova_range 16.
HEADER: dict[str, tuple[str, int, int, int]] = {
    "VHOST_GET_FEATURES": ("_IOR", 0x00, 8, 0x8008AF00),
    "VHOST_SET_FEATURES": ("_IOW", 0x00, 8, 0x4008AF00),
    "VHOST_SET_OWNER": ("_IO", 0x01, 0, 0x0000AF01),
    "VHOST_RESET_OWNER": ("_IO", 0x02, 0, 0x0000AF02),
    "VHOST_SET_LOG_BASE": ("_IOW", 0x04, 8, 0x4008AF04),
    "VHOST_SET_LOG_FD": ("_IOW", 0x07, 4, 0x4004AF07),
    "VHOST_SET_VRING_NUM": ("_IOW", 0x10, 8, 0x4008AF10),
    "VHOST_SET_VRING_ADDR": ("_IOW", 0x11, 40, 0x4028AF11),
    "VHOST_SET_VRING_BASE": ("_IOW", 0x12, 8, 0x4008AF12),
    "VHOST_GET_VRING_BASE": ("_IOWR", 0x12, 8, 0xC008AF12),
    "VHOST_SET_VRING_KICK": ("_IOW", 0x20, 8, 0x4008AF20),
    "VHOST_SET_VRING_CALL": ("_IOW", 0x21, 8, 0x4008AF21),
    "VHOST_SET_BACKEND_FEATURES": ("_IOW", 0x25, 8, 0x4008AF25),
    "VHOST_GET_BACKEND_FEATURES": ("_IOR", 0x26, 8, 0x8008AF26),
    "VHOST_VDPA_GET_DEVICE_ID": ("_IOR", 0x70, 4, 0x8004AF70),
    "VHOST_VDPA_GET_STATUS": ("_IOR", 0x71, 1, 0x8001AF71),
    "VHOST_VDPA_SET_STATUS": ("_IOW", 0x72, 1, 0x4001AF72),
    "VHOST_VDPA_GET_CONFIG": ("_IOR", 0x73, 8, 0x8008AF73),
    "VHOST_VDPA_SET_CONFIG": ("_IOW", 0x74, 8, 0x4008AF74),
    "VHOST_VDPA_SET_VRING_ENABLE": ("_IOW", 0x75, 8, 0x4008AF75),
    "VHOST_VDPA_GET_VRING_NUM": ("_IOR", 0x76, 2, 0x8002AF76),
    "VHOST_VDPA_SET_CONFIG_CALL": ("_IOW", 0x77, 4, 0x4004AF77),
    "VHOST_VDPA_GET_IOVA_RANGE": ("_IOR", 0x78, 16, 0x8010AF78),
    "VHOST_VDPA_GET_CONFIG_SIZE": ("_IOR", 0x79, 4, 0x8004AF79),
    "VHOST_VDPA_GET_AS_NUM": ("_IOR", 0x7A, 4, 0x8004AF7A),
    "VHOST_VDPA_GET_VRING_GROUP": ("_IOWR", 0x7B, 8, 0xC008AF7B),
    "VHOST_VDPA_SET_GROUP_ASID": ("_IOW", 0x7C, 8, 0x4008AF7C),
    "VHOST_VDPA_SUSPEND": ("_IO", 0x7D, 0, 0x0000AF7D),
    "VHOST_VDPA_RESUME": ("_IO", 0x7E, 0, 0x0000AF7E),
    "VHOST_VDPA_GET_VRING_DESC_GROUP": ("_IOWR", 0x7F, 8, 0xC008AF7F),
    "VHOST_VDPA_GET_VQS_COUNT": ("_IOR", 0x80, 4, 0x8004AF80),
    "VHOST_VDPA_GET_GROUP_NUM": ("_IOR", 0x81, 4, 0x8004AF81),
    "VHOST_VDPA_GET_VRING_SIZE": ("_IOWR", 0x82, 8, 0xC008AF82),
}
MACRO_DIR = {
    "_IO": IoctlDir.NONE,
    "_IOW": IoctlDir.WRITE,
    "_IOR": IoctlDir.READ,
    "_IOWR": IoctlDir.READ | IoctlDir.WRITE,
}


def test_every_ioctl_is_in_the_header_table() -> None:
    assert {request.name for request in Ioctl} == set(HEADER)


@pytest.mark.parametrize("name", sorted(HEADER))
def test_ioctl_number_matches_the_header(name: str) -> None:
    macro, nr, size, number = HEADER[name]
    request = Ioctl[name]
    assert request == number
    assert request.direction == MACRO_DIR[macro]
    assert request.nr == nr
    assert request.size == size
    assert ioctl_number(MACRO_DIR[macro], nr, size) == number
    assert (request >> 8) & 0xFF == VHOST_VIRTIO


def test_ioctl_number_refuses_fields_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="nr 256"):
        ioctl_number(IoctlDir.READ, 256, 8)
    with pytest.raises(ValueError, match="size 16384"):
        ioctl_number(IoctlDir.READ, 1, 1 << 14)


# ---------------------------------------------------------------------- constants


def test_backend_features_are_masks_of_the_header_bit_numbers() -> None:
    bits = {
        "IOTLB_MSG_V2": 0x1,
        "IOTLB_BATCH": 0x2,
        "IOTLB_ASID": 0x3,
        "SUSPEND": 0x4,
        "RESUME": 0x5,
        "ENABLE_AFTER_DRIVER_OK": 0x6,
        "DESC_ASID": 0x7,
        "IOTLB_PERSIST": 0x8,
    }
    assert {f.name: f.value for f in BackendFeature} == {n: 1 << b for n, b in bits.items()}


def test_iotlb_constants() -> None:
    assert IOTLB_MSG_V2 == 2
    assert {t.name: t.value for t in IotlbType} == {
        "MISS": 1,
        "UPDATE": 2,
        "INVALIDATE": 3,
        "ACCESS_FAIL": 4,
        "BATCH_BEGIN": 5,
        "BATCH_END": 6,
    }
    assert (IotlbPerm.RO, IotlbPerm.WO, IotlbPerm.RW) == (1, 2, 3)
    assert int(VringAddrFlags.LOG) == 1


# ---------------------------------------------------------------------- layouts


def test_struct_sizes() -> None:
    assert (U8.size, U16.size, U32.size, U64.size, INT.size) == (1, 2, 4, 8, 4)
    assert VringState.LAYOUT.size == 8
    assert VringFile.LAYOUT.size == 8
    assert VringAddr.LAYOUT.size == 40
    assert VdpaConfig.HEAD.size == 8
    assert IovaRange.LAYOUT.size == 16
    assert IotlbMsg.LAYOUT.size == 32
    assert MsgV2.SIZE == 72
    assert len(MsgV2(0, IotlbMsg.invalidate(0, 1)).encode()) == 72


def test_vring_state_bytes() -> None:
    assert VringState(3, 0x8000_1234).encode() == le(3, 4) + le(0x8000_1234, 4)


def test_vring_file_bytes() -> None:
    assert VringFile(1, 7).encode() == le(1, 4) + le(7, 4)
    assert VringFile(0, -1).encode() == le(0, 4) + b"\xff\xff\xff\xff"


def test_vring_addr_bytes() -> None:
    addr = VringAddr(2, VringAddrFlags.LOG, 0x1000, 0x3000, 0x2000, 0x40_0000)
    raw = addr.encode()
    assert raw[0:4] == le(2, 4)
    assert raw[4:8] == le(1, 4)
    assert raw[8:16] == le(0x1000, 8)  # desc_user_addr
    assert raw[16:24] == le(0x3000, 8)  # used_user_addr
    assert raw[24:32] == le(0x2000, 8)  # avail_user_addr
    assert raw[32:40] == le(0x40_0000, 8)  # log_guest_addr


def test_vdpa_config_bytes() -> None:
    assert VdpaConfig(6, b"\x01\x02").encode() == le(6, 4) + le(2, 4) + b"\x01\x02"
    assert VdpaConfig.request(0, 3).encode() == le(0, 4) + le(3, 4) + bytes(3)


def test_iova_range_bytes() -> None:
    assert IovaRange(0x1000, U64_MAX).encode() == le(0x1000, 8) + b"\xff" * 8


def test_msg_v2_bytes() -> None:
    msg = MsgV2(5, IotlbMsg.update(0x10_0000, 0x2000, 0x7F00_0000_0000, IotlbPerm.WO))
    raw = msg.encode()
    assert raw[0:4] == le(IOTLB_MSG_V2, 4)
    assert raw[4:8] == le(5, 4)
    assert raw[8:16] == le(0x10_0000, 8)  # iova
    assert raw[16:24] == le(0x2000, 8)  # size
    assert raw[24:32] == le(0x7F00_0000_0000, 8)  # uaddr
    assert raw[32] == IotlbPerm.WO
    assert raw[33] == IotlbType.UPDATE
    assert raw[34:72] == bytes(38)  # struct padding, then the rest of the 64-byte union


def test_batch_hints_carry_only_their_type() -> None:
    raw = MsgV2(0, IotlbMsg.hint(IotlbType.BATCH_END)).encode()
    assert raw == le(2, 4) + le(0, 4) + bytes(25) + bytes([IotlbType.BATCH_END]) + bytes(38)
    with pytest.raises(InvalidRequestError, match="not a batch hint"):
        IotlbMsg.hint(IotlbType.UPDATE)


def test_padding_is_ignored_when_read() -> None:
    raw = bytearray(MsgV2(0, IotlbMsg.invalidate(0x1000, 0x1000)).encode())
    raw[34:72] = b"\xaa" * 38
    assert MsgV2.decode(raw) == MsgV2(0, IotlbMsg.invalidate(0x1000, 0x1000))


# ---------------------------------------------------------------------- round trips

u32 = st.integers(0, U32_MAX)
u64 = st.integers(0, U64_MAX)


@st.composite
def vring_addrs(draw: st.DrawFn) -> VringAddr:
    return VringAddr(
        draw(u32),
        draw(st.sampled_from([VringAddrFlags(0), VringAddrFlags.LOG])),
        draw(u64),
        draw(st.integers(0, U64_MAX // 4)) * 4,
        draw(st.integers(0, U64_MAX // 2)) * 2,
        draw(st.integers(0, U64_MAX // 4)) * 4,
    )


@st.composite
def updates(draw: st.DrawFn) -> IotlbMsg:
    size = draw(st.integers(1, 1 << 64))
    size = min(size, U64_MAX)
    iova = draw(st.integers(0, (1 << 64) - size))
    uaddr = draw(st.integers(0, (1 << 64) - size))
    return IotlbMsg.update(iova, size, uaddr, draw(st.sampled_from(PERMS)))


@st.composite
def invalidates(draw: st.DrawFn) -> IotlbMsg:
    size = draw(st.integers(1, U64_MAX))
    return IotlbMsg.invalidate(draw(st.integers(0, (1 << 64) - size)), size)


@st.composite
def iova_ranges(draw: st.DrawFn) -> IovaRange:
    first = draw(u64)
    return IovaRange(first, draw(st.integers(first, U64_MAX)))


iotlb_msgs = st.one_of(
    updates(),
    invalidates(),
    st.just(IotlbMsg.invalidate(0, 0)),
    st.sampled_from([IotlbType.BATCH_BEGIN, IotlbType.BATCH_END]).map(IotlbMsg.hint),
    st.builds(
        IotlbMsg,
        u64,
        u64,
        u64,
        st.sampled_from(PERMS),
        st.sampled_from([IotlbType.MISS, IotlbType.ACCESS_FAIL]),
    ),
)

VALUES: dict[str, st.SearchStrategy[Any]] = {
    "vring_state": st.builds(VringState, u32, u32),
    "vring_addr": vring_addrs(),
    "vring_file": st.builds(VringFile, u32, st.integers(-1, (1 << 31) - 1)),
    "vdpa_config": st.builds(VdpaConfig, u32, st.binary(min_size=1, max_size=2048)),
    "iova_range": iova_ranges(),
    "iotlb_msg": iotlb_msgs,
    "msg_v2": st.builds(MsgV2, u32, iotlb_msgs),
}


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_round_trip(values: st.SearchStrategy[Any], data: st.DataObject) -> None:
    value = data.draw(values)
    assert type(value).decode(value.encode()) == value


@given(layout=st.sampled_from([U8, U16, U32, U64]), data=st.data())
def test_scalar_round_trip(layout: struct.Struct, data: st.DataObject) -> None:
    value = data.draw(st.integers(0, (1 << (8 * layout.size)) - 1))
    assert decode_scalar(layout, encode_scalar(layout, value, "v"), "v") == value


def test_iova_range_size_and_contains() -> None:
    whole = IovaRange(0, U64_MAX)
    assert whole.size == 1 << 64
    assert whole.contains(U64_MAX, 1)
    low = IovaRange(0x1000, 0x1FFF)
    assert low.size == 0x1000
    assert low.contains(0x1000, 0x1000)
    assert not low.contains(0x1000, 0x1001)
    assert not low.contains(0xFFF, 1)
    assert not low.contains(0x1000, 0)


# ---------------------------------------------------------------------- garbage from the kernel


def scalar_decoder(layout: struct.Struct) -> Callable[[bytes], object]:
    """``decode_scalar`` for one layout."""

    def decode(data: bytes) -> object:
        return decode_scalar(layout, data, "value")

    return decode


DECODERS: dict[str, Callable[[bytes], object]] = {
    "vring_state": VringState.decode,
    "vring_addr": VringAddr.decode,
    "vring_file": VringFile.decode,
    "vdpa_config": VdpaConfig.decode,
    "iova_range": IovaRange.decode,
    "iotlb_msg": IotlbMsg.decode,
    "msg_v2": MsgV2.decode,
    "vring_state_reply": VringState(7, 0).reply,
    "vdpa_config_reply": VdpaConfig.request(4, 6).reply,
    "u8": scalar_decoder(U8),
    "u16": scalar_decoder(U16),
    "u32": scalar_decoder(U32),
    "u64": scalar_decoder(U64),
    "int": scalar_decoder(INT),
}


@pytest.mark.parametrize("decode", DECODERS.values(), ids=DECODERS.keys())
@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120))
def test_garbage_raises_only_kernel_data_error(
    decode: Callable[[bytes], object], data: bytes
) -> None:
    with contextlib.suppress(KernelDataError):
        decode(data)


@settings(max_examples=500, deadline=None)
@given(
    head=st.sampled_from([le(2, 4), le(1, 4), le(3, 4)]),
    rest=st.binary(min_size=68, max_size=68),
)
def test_msg_v2_sized_garbage(head: bytes, rest: bytes) -> None:
    try:
        msg = MsgV2.decode(head + rest)
    except KernelDataError:
        return
    assert msg.encode()[:34] == (head + rest)[:34]


@settings(max_examples=300, deadline=None)
@given(first=u64, last=u64)
def test_iova_range_from_the_kernel(first: int, last: int) -> None:
    raw = le(first, 8) + le(last, 8)
    if last < first:
        with pytest.raises(KernelDataError, match="below first"):
            IovaRange.decode(raw)
    else:
        assert IovaRange.decode(raw) == IovaRange(first, last)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (le(0x2000, 8) + le(0x1000, 8), "last 0x1000 is below first 0x2000"),
        (bytes(15), "15 bytes, expected 16"),
    ],
)
def test_iova_range_errors(raw: bytes, match: str) -> None:
    with pytest.raises(KernelDataError, match=match):
        IovaRange.decode(raw)


def test_kernel_data_errors_name_the_problem() -> None:
    good = bytearray(MsgV2(0, IotlbMsg.invalidate(0x1000, 0x1000)).encode())
    with pytest.raises(KernelDataError, match="type 1 is not VHOST_IOTLB_MSG_V2"):
        MsgV2.decode(le(1, 4) + good[4:])
    with pytest.raises(KernelDataError, match="type 9 is not one of"):
        MsgV2.decode(good[:33] + b"\x09" + good[34:])
    with pytest.raises(KernelDataError, match="perm 7 is not one of"):
        MsgV2.decode(good[:32] + b"\x07" + good[33:])
    with pytest.raises(KernelDataError, match="71 bytes, expected 72"):
        MsgV2.decode(good[:71])
    with pytest.raises(KernelDataError, match="flags 0x2 set unknown bits"):
        VringAddr.decode(le(0, 4) + le(2, 4) + bytes(32))
    with pytest.raises(KernelDataError, match="expected 11 for len 3"):
        VdpaConfig.decode(le(0, 4) + le(3, 4) + b"ab")
    with pytest.raises(KernelDataError, match="asked about index 7, the answer is for 8"):
        VringState(7, 0).reply(VringState(8, 1).encode())
    with pytest.raises(KernelDataError, match="asked for 6 bytes at 4"):
        VdpaConfig.request(4, 6).reply(VdpaConfig(0, bytes(6)).encode())
    with pytest.raises(KernelDataError, match="3 bytes, expected 4"):
        decode_scalar(U32, b"abc", "VHOST_VDPA_GET_DEVICE_ID")


def test_replies_that_echo_the_request() -> None:
    assert VringState(7, 0).reply(VringState(7, 99).encode()) == VringState(7, 99)
    raw = VdpaConfig(4, b"abcdef").encode()
    assert VdpaConfig.request(4, 6).reply(raw) == b"abcdef"


# ---------------------------------------------------------------------- refused requests


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (VringState(1 << 32, 0), "index 4294967296"),
        (VringState(0, -1), "num -1"),
        (VringFile(0, -2), "fd -2 is neither -1 nor"),
        (VringFile(0, 1 << 31), "fd 2147483648"),
        (VringAddr(0, VringAddrFlags(2), 0, 0, 0, 0), "unknown bits 0x2"),
        (VringAddr(0, VringAddrFlags(0), 0, 0, 1, 0), "avail_user_addr 0x1 is not 2-aligned"),
        (VringAddr(0, VringAddrFlags(0), 0, 2, 0, 0), "used_user_addr 0x2 is not 4-aligned"),
        (VringAddr(0, VringAddrFlags(0), 0, 0, 0, 6), "log_guest_addr 0x6 is not 4-aligned"),
        (VringAddr(0, VringAddrFlags(0), 1 << 64, 0, 0, 0), "desc_user_addr"),
        (VdpaConfig(0, b""), "len 0"),
        (VdpaConfig(1 << 32, b"x"), "off 4294967296"),
        (IovaRange(2, 1), "below first"),
        (IotlbMsg.update(0, 0, 0, IotlbPerm.RW), "UPDATE of 0 bytes"),
        (IotlbMsg.update(0, 1, 0, IotlbPerm.NONE), "UPDATE without an access permission"),
        (IotlbMsg.update(U64_MAX, 2, 0, IotlbPerm.RO), "iova 0xffffffffffffffff .* wraps"),
        (IotlbMsg.update(0, 2, U64_MAX, IotlbPerm.RO), "uaddr .* wraps"),
        (IotlbMsg.update(1 << 64, 1, 0, IotlbPerm.RO), "iova"),
        (IotlbMsg.invalidate(0x1000, 0), "INVALIDATE of 0 bytes at 0x1000"),
        (IotlbMsg.invalidate(U64_MAX, 2), "wraps"),
        (MsgV2(1 << 32, IotlbMsg.invalidate(0, 1)), "asid"),
    ],
)
def test_encode_refuses(value: Any, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        value.encode()


def test_config_request_needs_a_length() -> None:
    with pytest.raises(InvalidRequestError, match="length 0"):
        VdpaConfig.request(0, 0)


@pytest.mark.parametrize(
    ("layout", "value"),
    [(U8, 256), (U16, -1), (U32, 1 << 32), (U64, 1 << 64), (INT, 1 << 31), (INT, -(1 << 31) - 1)],
)
def test_scalars_that_do_not_fit(layout: struct.Struct, value: int) -> None:
    with pytest.raises(InvalidRequestError, match="does not fit a"):
        encode_scalar(layout, value, "value")


@settings(max_examples=300, deadline=None)
@given(
    fields=st.tuples(st.integers(-2, 1 << 65), st.integers(-2, 1 << 65), st.integers(-2, 1 << 65)),
    perm=st.integers(-1, 5),
    kind=st.integers(-1, 8),
    asid=st.integers(-1, 1 << 33),
)
def test_encode_garbage_raises_only_invalid_request(
    fields: tuple[int, int, int], perm: int, kind: int, asid: int
) -> None:
    msg = MsgV2(asid, IotlbMsg(*fields, perm, kind))  # type: ignore[arg-type]
    try:
        raw = msg.encode()
    except InvalidRequestError:
        return
    assert MsgV2.decode(raw) == msg


def test_message_needs_acknowledged_backend_features() -> None:
    update = IotlbMsg.update(0, 0x1000, 0x1000, IotlbPerm.RW)
    with pytest.raises(InvalidRequestError, match=r"address space 1 needs .* IOTLB_ASID"):
        MsgV2(1, update).check_features(BackendFeature.IOTLB_MSG_V2)
    MsgV2(1, update).check_features(BackendFeature.IOTLB_ASID)
    MsgV2(0, update).check_features(BackendFeature(0))
    with pytest.raises(InvalidRequestError, match=r"BATCH_BEGIN needs .* IOTLB_BATCH"):
        MsgV2(0, IotlbMsg.hint(IotlbType.BATCH_BEGIN)).check_features(BackendFeature(0))
    MsgV2(0, IotlbMsg.hint(IotlbType.BATCH_END)).check_features(BackendFeature.IOTLB_BATCH)


# ---------------------------------------------------------------------- status read back

S = DeviceStatus


def test_status_kept() -> None:
    check_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    check_status(0, 0)


def test_features_refused() -> None:
    wanted = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
    with pytest.raises(FeaturesRefusedError, match="does not accept the features 0x100000000"):
        check_status(wanted, S.ACKNOWLEDGE | S.DRIVER, features=1 << 32)


def test_status_differences() -> None:
    with pytest.raises(StatusRefusedError, match="DEVICE_NEEDS_RESET"):
        check_status(S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DEVICE_NEEDS_RESET)
    with pytest.raises(StatusRefusedError, match="status 0x07 written, 0x03 read back"):
        check_status(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK, S.ACKNOWLEDGE | S.DRIVER)


@given(wanted=st.integers(0, 255), read_back=st.integers(0, 255))
def test_status_check_raises_only_status_errors(wanted: int, read_back: int) -> None:
    try:
        check_status(wanted, read_back)
    except StatusRefusedError:
        assert wanted != read_back
    else:
        assert wanted == read_back


def test_error_classes() -> None:
    assert issubclass(InvalidRequestError, ValueError)
    for cls in (InvalidRequestError, KernelDataError, StatusRefusedError, DeviceError):
        assert issubclass(cls, VhostVdpaError)
    assert issubclass(DeviceNotFoundError, ConfigError)
    assert issubclass(NotVhostVdpaError, ConfigError)
    assert issubclass(UnsupportedIoctlError, IoctlError)
    assert issubclass(NotOwnerError, IoctlError)


# ---------------------------------------------------------------------- opening paths


def test_open_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "vhost-vdpa-9"
    with pytest.raises(DeviceNotFoundError, match=f"{path}: no such device") as info:
        VhostVdpaDevice.open(path)
    assert info.value.errno == errno.ENOENT
    assert info.value.path == str(path)


def test_open_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x")
    with pytest.raises(NotVhostVdpaError, match="not a vhost-vdpa device: not a character device"):
        VhostVdpaDevice.open(path)


def test_open_directory(tmp_path: Path) -> None:
    with pytest.raises(NotVhostVdpaError, match="not a character device"):
        VhostVdpaDevice.open(tmp_path)


def test_open_other_character_device() -> None:
    with pytest.raises(NotVhostVdpaError, match="does not answer VHOST_VDPA_GET_DEVICE_ID") as info:
        VhostVdpaDevice.open("/dev/null")
    assert info.value.errno == errno.ENOTTY


@pytest.mark.parametrize(
    ("err", "cls", "match"),
    [
        (errno.EBUSY, DeviceBusyError, "/dev/null is busy: another process holds it open"),
        (errno.EACCES, DevicePermissionError, "/dev/null: permission denied"),
        (errno.EPERM, DevicePermissionError, "permission denied"),
        (errno.ENXIO, DeviceNotFoundError, "no such device"),
        (errno.ENOMEM, DeviceError, "cannot open /dev/null: Cannot allocate memory, ENOMEM$"),
        (524, DeviceError, "ENOTSUPP$"),
    ],
)
def test_open_errors(
    monkeypatch: pytest.MonkeyPatch, err: int, cls: type[DeviceError], match: str
) -> None:
    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise OSError(err, os.strerror(err), path)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(cls, match=match) as info:
        VhostVdpaDevice.open("/dev/null")
    assert type(info.value) is cls
    assert info.value.errno == err


# ---------------------------------------------------------------------- IOTLB writes


@pytest.fixture
def piped() -> Iterator[tuple[VhostVdpaDevice, int]]:
    """A device whose fd is a pipe's write end, and the read end to see what it wrote."""
    read_end, write_end = os.pipe()
    device = VhostVdpaDevice(write_end, path="pipe")
    yield device, read_end
    device.close()
    os.close(read_end)


def read_messages(fd: int) -> list[MsgV2]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return []
    assert len(data) % MsgV2.SIZE == 0
    return [MsgV2.decode(data[i : i + MsgV2.SIZE]) for i in range(0, len(data), MsgV2.SIZE)]


def test_update_and_invalidate_write_one_message_each(
    piped: tuple[VhostVdpaDevice, int],
) -> None:
    device, read_end = piped
    device.iotlb_update(0x4000_0000, 0x20_0000, 0x7F12_3400_0000, IotlbPerm.RW)
    device.iotlb_invalidate(0x4000_0000, 0x1000)
    device.iotlb_invalidate(0, 0)
    assert read_messages(read_end) == [
        MsgV2(0, IotlbMsg.update(0x4000_0000, 0x20_0000, 0x7F12_3400_0000, IotlbPerm.RW)),
        MsgV2(0, IotlbMsg.invalidate(0x4000_0000, 0x1000)),
        MsgV2(0, IotlbMsg.invalidate(0, 0)),
    ]


def test_batch_framed_only_when_acknowledged(piped: tuple[VhostVdpaDevice, int]) -> None:
    device, read_end = piped
    with device.iotlb_batch():
        device.iotlb_update(0, 0x1000, 0x1000, IotlbPerm.RO)
    assert [m.iotlb.type for m in read_messages(read_end)] == [IotlbType.UPDATE]

    device.backend_features = BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH
    with device.iotlb_batch():
        device.iotlb_update(0, 0x1000, 0x1000, IotlbPerm.RO)
        device.iotlb_invalidate(0x2000, 0x1000)
    assert [m.iotlb.type for m in read_messages(read_end)] == [
        IotlbType.BATCH_BEGIN,
        IotlbType.UPDATE,
        IotlbType.INVALIDATE,
        IotlbType.BATCH_END,
    ]


def test_batch_ends_when_its_body_raises(piped: tuple[VhostVdpaDevice, int]) -> None:
    device, read_end = piped
    device.backend_features = BackendFeature.IOTLB_BATCH
    with pytest.raises(RuntimeError), device.iotlb_batch():
        device.iotlb_update(0, 0x1000, 0x1000, IotlbPerm.RO)
        raise RuntimeError
    types = [m.iotlb.type for m in read_messages(read_end)]
    assert types == [IotlbType.BATCH_BEGIN, IotlbType.UPDATE, IotlbType.BATCH_END]
    with device.iotlb_batch():
        pass
    assert len(read_messages(read_end)) == 2


def test_batch_rules(piped: tuple[VhostVdpaDevice, int]) -> None:
    device, read_end = piped
    device.backend_features = BackendFeature.IOTLB_BATCH | BackendFeature.IOTLB_ASID
    with device.iotlb_batch(asid=1):
        with pytest.raises(InvalidRequestError, match="do not nest"), device.iotlb_batch():
            pass
        with pytest.raises(InvalidRequestError, match="address space 0 inside a batch for"):
            device.iotlb_update(0, 0x1000, 0x1000, IotlbPerm.RO)
        device.iotlb_update(0, 0x1000, 0x1000, IotlbPerm.RO, asid=1)
    assert [(m.asid, m.iotlb.type) for m in read_messages(read_end)] == [
        (1, IotlbType.BATCH_BEGIN),
        (1, IotlbType.UPDATE),
        (1, IotlbType.BATCH_END),
    ]


def test_refused_locally_sends_nothing(piped: tuple[VhostVdpaDevice, int]) -> None:
    device, read_end = piped
    with pytest.raises(InvalidRequestError, match="IOTLB_ASID"):
        device.iotlb_update(0, 0x1000, 0x1000, IotlbPerm.RO, asid=2)
    with pytest.raises(InvalidRequestError, match="UPDATE of 0 bytes"):
        device.iotlb_update(0, 0, 0x1000, IotlbPerm.RO)
    assert read_messages(read_end) == []


@pytest.mark.parametrize(
    ("err", "match"),
    [
        (errno.EFAULT, r"IOTLB UPDATE \[0x1000, \+0x2000\) in address space 0 refused by pipe: "),
        (errno.EINVAL, "malformed message"),
        (errno.ENOMEM, "RLIMIT_MEMLOCK"),
    ],
)
def test_iotlb_refusals(
    monkeypatch: pytest.MonkeyPatch, piped: tuple[VhostVdpaDevice, int], err: int, match: str
) -> None:
    device, _ = piped

    def refuse(fd: int, data: bytes) -> int:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "write", refuse)
    with pytest.raises(IotlbUpdateError, match=match) as info:
        device.iotlb_update(0x1000, 0x2000, 0x7000, IotlbPerm.RW)
    assert info.value.errno == err
    assert info.value.msg.iotlb.iova == 0x1000


def test_write_to_a_broken_fd() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    refused = pytest.raises(DeviceError, match=r"writing an IOTLB message to pipe failed: .*EPIPE")
    with VhostVdpaDevice(write_end, path="pipe") as device, refused:
        device.iotlb_invalidate(0, 0x1000)
    assert device.closed


def test_closed_device(piped: tuple[VhostVdpaDevice, int]) -> None:
    device, _ = piped
    device.close()
    device.close()
    assert device.closed
    with pytest.raises(DeviceError, match="pipe is closed"):
        device.iotlb_invalidate(0, 0x1000)
    with pytest.raises(DeviceError, match="pipe is closed"):
        device.get_features()


# ---------------------------------------------------------------------- ioctls


def test_ioctl_on_a_pipe_is_unsupported(piped: tuple[VhostVdpaDevice, int]) -> None:
    device, _ = piped
    with pytest.raises(UnsupportedIoctlError, match="VHOST_GET_FEATURES on pipe: not supported"):
        device.get_features()


class FakeKernel:
    """Answers vhost-vdpa ioctls like a small device, checking every argument buffer."""

    def __init__(self) -> None:
        self.status = 0
        self.offered = (1 << 32) | (1 << 33)
        self.features: int | None = None
        self.backend_features = 0
        self.refuse_features = False
        self.config = bytes(i & 0xFF for i in range(4096))
        self.iova = (0, U64_MAX)
        self.errors: dict[Ioctl, int] = {}
        self.base_index_skew = 0
        self.calls: list[Ioctl] = []

    def ioctl(self, fd: int, request: int, arg: Any = 0, mutate: bool = True) -> int:
        req = Ioctl(request)
        self.calls.append(req)
        if req.size:
            assert isinstance(arg, bytearray), f"{req.name} got {type(arg).__name__}"
            assert mutate
            assert len(arg) >= req.size
        if req in self.errors:
            raise OSError(self.errors[req], os.strerror(self.errors[req]))
        if req is Ioctl.VHOST_VDPA_GET_DEVICE_ID:
            U32.pack_into(arg, 0, 1)
        elif req is Ioctl.VHOST_GET_FEATURES:
            U64.pack_into(arg, 0, self.offered)
        elif req is Ioctl.VHOST_SET_BACKEND_FEATURES:
            (self.backend_features,) = U64.unpack(arg)
        elif req is Ioctl.VHOST_SET_FEATURES:
            (self.features,) = U64.unpack(arg)
        elif req is Ioctl.VHOST_VDPA_GET_STATUS:
            arg[0] = self.status
        elif req is Ioctl.VHOST_VDPA_SET_STATUS:
            status = arg[0]
            if self.refuse_features:
                status &= ~DeviceStatus.FEATURES_OK
            self.status = status
        elif req is Ioctl.VHOST_VDPA_GET_CONFIG:
            offset, length = VdpaConfig.HEAD.unpack_from(arg)
            assert len(arg) == 8 + length
            arg[8:] = self.config[offset : offset + length]
        elif req is Ioctl.VHOST_VDPA_GET_IOVA_RANGE:
            arg[:] = IovaRange.LAYOUT.pack(*self.iova)
        elif req is Ioctl.VHOST_GET_VRING_BASE:
            (index,) = U32.unpack_from(arg)
            arg[:] = VringState.LAYOUT.pack(index + self.base_index_skew, 0x1234)
        elif req is Ioctl.VHOST_VDPA_GET_VRING_NUM:
            U16.pack_into(arg, 0, 256)
        else:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        return 0


@pytest.fixture
def kernel(
    monkeypatch: pytest.MonkeyPatch, piped: tuple[VhostVdpaDevice, int]
) -> tuple[VhostVdpaDevice, FakeKernel]:
    fake = FakeKernel()
    monkeypatch.setattr(fcntl, "ioctl", fake.ioctl)
    return piped[0], fake


def test_negotiation_through_the_fake_kernel(kernel: tuple[VhostVdpaDevice, FakeKernel]) -> None:
    device, fake = kernel
    assert device.get_device_id() == 1
    assert device.get_vring_num() == 256
    offered = device.get_features()
    device.set_status(0)
    device.add_status(S.ACKNOWLEDGE | S.DRIVER)
    device.set_features(offered)
    assert fake.features == offered == device.features
    assert device.add_status(S.FEATURES_OK) == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK


def test_device_refusing_features_ok(kernel: tuple[VhostVdpaDevice, FakeKernel]) -> None:
    device, fake = kernel
    fake.refuse_features = True
    device.set_features(1 << 32)
    device.add_status(S.ACKNOWLEDGE | S.DRIVER)
    with pytest.raises(FeaturesRefusedError, match=r"refused FEATURES_OK.*0x100000000"):
        device.add_status(S.FEATURES_OK)


def test_large_config_read_uses_one_mutable_buffer(
    kernel: tuple[VhostVdpaDevice, FakeKernel],
) -> None:
    device, fake = kernel
    assert device.get_config(100, 2000) == fake.config[100:2100]


def test_iova_range_read(kernel: tuple[VhostVdpaDevice, FakeKernel]) -> None:
    device, fake = kernel
    assert device.get_iova_range() == IovaRange(0, U64_MAX)
    fake.iova = (0x2000, 0x1000)
    with pytest.raises(KernelDataError, match="last 0x1000 is below first 0x2000"):
        device.get_iova_range()


def test_vring_base_answer_must_name_the_ring(kernel: tuple[VhostVdpaDevice, FakeKernel]) -> None:
    device, fake = kernel
    assert device.get_vring_base(3) == 0x1234
    fake.base_index_skew = 1
    with pytest.raises(KernelDataError, match="asked about index 3, the answer is for 4"):
        device.get_vring_base(3)


@pytest.mark.parametrize(
    ("err", "cls", "match"),
    [
        (
            errno.ENOTTY,
            UnsupportedIoctlError,
            r"VHOST_VDPA_SUSPEND on pipe: not supported by this device or kernel \(ENOTTY\)$",
        ),
        (errno.EOPNOTSUPP, UnsupportedIoctlError, r"\(EOPNOTSUPP\)$"),
        (errno.EPERM, NotOwnerError, "not the device's owner .VHOST_SET_OWNER first"),
        (errno.EBUSY, IoctlError, "VHOST_VDPA_SUSPEND on pipe failed: busy"),
        (errno.EIO, IoctlError, "VHOST_VDPA_SUSPEND on pipe failed: Input/output error, EIO$"),
    ],
)
def test_ioctl_errors(
    kernel: tuple[VhostVdpaDevice, FakeKernel], err: int, cls: type[IoctlError], match: str
) -> None:
    device, fake = kernel
    fake.errors[Ioctl.VHOST_VDPA_SUSPEND] = err
    with pytest.raises(cls, match=match) as info:
        device.suspend()
    assert type(info.value) is cls
    assert info.value.request is Ioctl.VHOST_VDPA_SUSPEND
    assert info.value.errno == err


def test_queue_index_out_of_range(kernel: tuple[VhostVdpaDevice, FakeKernel]) -> None:
    device, fake = kernel
    fake.errors[Ioctl.VHOST_GET_VRING_BASE] = errno.ENOBUFS
    with pytest.raises(IoctlError, match="no virtqueue with that index"):
        device.get_vring_base(99)


def test_backend_features_are_recorded_once_acknowledged(
    kernel: tuple[VhostVdpaDevice, FakeKernel],
) -> None:
    device, fake = kernel
    fake.errors[Ioctl.VHOST_SET_BACKEND_FEATURES] = errno.EOPNOTSUPP
    with pytest.raises(UnsupportedIoctlError):
        device.set_backend_features(BackendFeature.IOTLB_MSG_V2 | BackendFeature.SUSPEND)
    assert device.backend_features == BackendFeature(0)
    del fake.errors[Ioctl.VHOST_SET_BACKEND_FEATURES]
    device.set_backend_features(BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH)
    assert device.backend_features == BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH
    assert fake.backend_features == 0b110


@pytest.mark.parametrize(
    ("call", "ioctl", "arg"),
    [
        (lambda d: d.set_owner(), Ioctl.VHOST_SET_OWNER, None),
        (lambda d: d.resume(), Ioctl.VHOST_VDPA_RESUME, None),
        (lambda d: d.set_vring_num(1, 256), Ioctl.VHOST_SET_VRING_NUM, VringState(1, 256)),
        (lambda d: d.set_vring_base(1, 0x8000), Ioctl.VHOST_SET_VRING_BASE, VringState(1, 0x8000)),
        (
            lambda d: d.set_vring_enable(2, True),
            Ioctl.VHOST_VDPA_SET_VRING_ENABLE,
            VringState(2, 1),
        ),
        (lambda d: d.set_group_asid(1, 2), Ioctl.VHOST_VDPA_SET_GROUP_ASID, VringState(1, 2)),
        (lambda d: d.set_vring_kick(0, 9), Ioctl.VHOST_SET_VRING_KICK, VringFile(0, 9)),
        (lambda d: d.set_vring_call(1, None), Ioctl.VHOST_SET_VRING_CALL, VringFile(1, -1)),
        (lambda d: d.set_config_call(None), Ioctl.VHOST_VDPA_SET_CONFIG_CALL, INT.pack(-1)),
        (lambda d: d.set_log_fd(5), Ioctl.VHOST_SET_LOG_FD, INT.pack(5)),
        (lambda d: d.set_log_base(0x1000), Ioctl.VHOST_SET_LOG_BASE, U64.pack(0x1000)),
        (lambda d: d.set_status(S.ACKNOWLEDGE), Ioctl.VHOST_VDPA_SET_STATUS, U8.pack(1)),
        (
            lambda d: d.set_config(4, b"\x01\x02"),
            Ioctl.VHOST_VDPA_SET_CONFIG,
            VdpaConfig(4, b"\x01\x02"),
        ),
        (
            lambda d: d.set_vring_addr(VringAddr(0, VringAddrFlags(0), 0x1000, 0x3000, 0x2000)),
            Ioctl.VHOST_SET_VRING_ADDR,
            VringAddr(0, VringAddrFlags(0), 0x1000, 0x3000, 0x2000),
        ),
    ],
)
def test_write_only_ioctls_pass_their_argument(
    monkeypatch: pytest.MonkeyPatch,
    piped: tuple[VhostVdpaDevice, int],
    call: Callable[[VhostVdpaDevice], None],
    ioctl: Ioctl,
    arg: Any,
) -> None:
    seen: list[tuple[int, Any]] = []

    def record(fd: int, req: int, buf: Any = 0, mutate: bool = True) -> int:
        seen.append((req, bytes(buf) if isinstance(buf, bytearray) else buf))
        return 0

    monkeypatch.setattr(fcntl, "ioctl", record)
    call(piped[0])
    expected = 0 if arg is None else (arg if isinstance(arg, bytes) else arg.encode())
    assert seen == [(ioctl, expected)]


def test_read_ioctls_decode_their_answer(
    monkeypatch: pytest.MonkeyPatch, piped: tuple[VhostVdpaDevice, int]
) -> None:
    answers = {
        Ioctl.VHOST_GET_BACKEND_FEATURES: U64.pack(0x1FE),
        Ioctl.VHOST_VDPA_GET_CONFIG_SIZE: U32.pack(60),
        Ioctl.VHOST_VDPA_GET_VQS_COUNT: U32.pack(3),
        Ioctl.VHOST_VDPA_GET_GROUP_NUM: U32.pack(2),
        Ioctl.VHOST_VDPA_GET_AS_NUM: U32.pack(2),
        Ioctl.VHOST_VDPA_GET_STATUS: U8.pack(0x8F),
    }

    def answer(fd: int, req: int, buf: Any = 0, mutate: bool = True) -> int:
        request = Ioctl(req)
        if request in answers:
            buf[:] = answers[request]
        else:
            (index,) = U32.unpack_from(buf)
            buf[:] = VringState.LAYOUT.pack(index, {0x7B: 1, 0x7F: 0, 0x82: 512}[request.nr])
        return 0

    monkeypatch.setattr(fcntl, "ioctl", answer)
    device = piped[0]
    assert device.get_backend_features() == BackendFeature(0x1FE)
    assert device.get_config_size() == 60
    assert device.get_vqs_count() == 3
    assert device.get_group_num() == 2
    assert device.get_as_num() == 2
    assert device.get_status() == S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK | S.FEATURES_OK | S.FAILED
    assert device.get_vring_group(2) == 1
    assert device.get_vring_desc_group(2) == 0
    assert device.get_vring_size(2) == 512
