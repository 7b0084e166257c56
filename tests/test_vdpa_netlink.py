"""The vdpa generic-netlink client: request bytes, replies, errors, hostile datagrams.

Expected bytes are built here by hand from the netlink headers
(``nlmsghdr``, ``genlmsghdr``, ``nlattr``), independently of the module's
encoder.  Two error datagrams were captured from a Linux kernel (an
attribute failing the controller's policy, with and without
NETLINK_CAP_ACK).  This host has no vdpa family: the socket half is tested
live only on that refusal.
"""

from __future__ import annotations

import contextlib
import errno
import re
import struct
import sys
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvdpa.errors import ConfigError, RemoteProtocolError, TransportError
from pyvdpa.vduse import netlink
from pyvdpa.vduse.netlink import (
    GENL_ID_CTRL,
    Attributes,
    CtrlCommand,
    GenericMessage,
    MgmtDev,
    NetlinkFlag,
    NetlinkProtocolError,
    NetlinkRequest,
    Operation,
    ReplyCollector,
    VdpaAttr,
    VdpaCommand,
    VdpaDevice,
    VdpaDeviceConfig,
    VdpaExistsError,
    VdpaFamilyMissingError,
    VdpaNetlink,
    VdpaNetlinkError,
    VdpaNoDeviceError,
    VdpaPermissionError,
    add_device_request,
    decode_family_id,
    decode_messages,
    delete_device_request,
    encode_attribute,
    family_request,
    get_config_request,
    get_device_request,
    get_mgmtdev_request,
    parse_attributes,
    split_handle,
    vdpa_error,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")

FAMILY = 0x1B


def nla(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def nlmsg(kind: int, flags: int, seq: int, payload: bytes, pid: int = 0) -> bytes:
    """One netlink message, padded to 4 bytes."""
    raw = struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, pid) + payload
    return raw + bytes(-len(raw) % 4)


def genl(command: int, attrs: bytes = b"", version: int = 1) -> bytes:
    """A generic netlink header and its attributes."""
    return struct.pack("=BBH", command, version, 0) + attrs


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def u16(v: int) -> bytes:
    return struct.pack("=H", v)


def u32(v: int) -> bytes:
    return struct.pack("=I", v)


def u64(v: int) -> bytes:
    return struct.pack("=Q", v)


PAD = nla(0, b"")


def ack(seq: int, code: int = 0) -> bytes:
    """NLMSG_ERROR acknowledging (code 0) or refusing a request, capped."""
    echoed = struct.pack("=IHHII", 40, FAMILY, 5, seq, 0)
    return nlmsg(2, 0x100, seq, struct.pack("=i", -code) + echoed)


def done(seq: int, code: int = 0) -> bytes:
    """NLMSG_DONE ending a dump."""
    return nlmsg(3, NetlinkFlag.MULTI, seq, struct.pack("=i", -code))


# --- numbers -----------------------------------------------------------------


def test_numbers_match_the_headers() -> None:
    assert {c.name: c.value for c in VdpaCommand} == {
        "UNSPEC": 0,
        "MGMTDEV_NEW": 1,
        "MGMTDEV_GET": 2,
        "DEV_NEW": 3,
        "DEV_DEL": 4,
        "DEV_GET": 5,
        "DEV_CONFIG_GET": 6,
        "DEV_VSTATS_GET": 7,
    }
    assert {a.name: a.value for a in VdpaAttr} == {
        "PAD": 0,
        "MGMTDEV_BUS_NAME": 1,
        "MGMTDEV_DEV_NAME": 2,
        "MGMTDEV_SUPPORTED_CLASSES": 3,
        "DEV_NAME": 4,
        "DEV_ID": 5,
        "DEV_VENDOR_ID": 6,
        "DEV_MAX_VQS": 7,
        "DEV_MAX_VQ_SIZE": 8,
        "DEV_MIN_VQ_SIZE": 9,
        "DEV_NET_CFG_MACADDR": 10,
        "DEV_NET_STATUS": 11,
        "DEV_NET_CFG_MAX_VQP": 12,
        "DEV_NET_CFG_MTU": 13,
        "DEV_NEGOTIATED_FEATURES": 14,
        "DEV_MGMTDEV_MAX_VQS": 15,
        "DEV_SUPPORTED_FEATURES": 16,
        "DEV_QUEUE_INDEX": 17,
        "DEV_VENDOR_ATTR_NAME": 18,
        "DEV_VENDOR_ATTR_VALUE": 19,
        "DEV_FEATURES": 20,
        "VDPA_DEV_SUPPORTED_FEATURES": 21,
    }
    assert (GENL_ID_CTRL, CtrlCommand.GETFAMILY, CtrlCommand.NEWFAMILY) == (0x10, 3, 1)
    assert NetlinkFlag.DUMP.value == 0x300
    assert netlink.NLMSG_HEADER.size == 16
    assert netlink.GENL_HEADER.size == 4
    assert netlink.NLA_HEADER.size == 4


# --- request bytes -----------------------------------------------------------


def test_family_request_bytes() -> None:
    expected = nlmsg(0x10, 0x5, 1, genl(3, nla(2, b"vdpa\0")))
    assert family_request().encode(1) == expected
    assert len(expected) == 16 + 4 + 12


def test_add_device_request_bytes() -> None:
    # As ``vdpa dev add name blk0 mgmtdev vduse``: no bus name, strings NUL-terminated.
    expected = nlmsg(FAMILY, 0x5, 9, genl(3, nla(2, s("vduse")) + nla(4, s("blk0"))))
    assert add_device_request(FAMILY, "blk0").encode(9) == expected
    assert len(expected) == 16 + 4 + 12 + 12
    if sys.byteorder == "little":
        assert expected[16:] == (
            b"\x03\x01\x00\x00\x0a\x00\x02\x00vduse\x00\x00\x00\x09\x00\x04\x00blk0\x00\x00\x00\x00"
        )


def test_add_device_on_a_bus() -> None:
    attrs = nla(1, s("pci")) + nla(2, s("0000:00:04.0")) + nla(4, s("net0"))
    expected = nlmsg(FAMILY, 0x5, 2, genl(3, attrs))
    assert add_device_request(FAMILY, "net0", "pci/0000:00:04.0").encode(2) == expected


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (delete_device_request(FAMILY, "blk0"), nlmsg(FAMILY, 0x5, 3, genl(4, nla(4, s("blk0"))))),
        (get_device_request(FAMILY, "blk0"), nlmsg(FAMILY, 0x5, 3, genl(5, nla(4, s("blk0"))))),
        (get_device_request(FAMILY), nlmsg(FAMILY, 0x301, 3, genl(5))),
        (get_mgmtdev_request(FAMILY), nlmsg(FAMILY, 0x301, 3, genl(2))),
        (
            get_mgmtdev_request(FAMILY, "vduse"),
            nlmsg(FAMILY, 0x5, 3, genl(2, nla(2, s("vduse")))),
        ),
        (get_config_request(FAMILY, "n"), nlmsg(FAMILY, 0x5, 3, genl(6, nla(4, s("n"))))),
    ],
)
def test_request_bytes(request_: NetlinkRequest, expected: bytes) -> None:
    assert request_.encode(3) == expected


@pytest.mark.parametrize(
    ("handle", "split"),
    [("vduse", (None, "vduse")), ("pci/0000:00:04.0", ("pci", "0000:00:04.0"))],
)
def test_split_handle(handle: str, split: tuple[str | None, str]) -> None:
    assert split_handle(handle) == split


@pytest.mark.parametrize("handle", ["", "a/b/c", "/vduse", "vduse/", "vd\0use"])
def test_bad_handles(handle: str) -> None:
    with pytest.raises(ConfigError):
        add_device_request(FAMILY, "x", handle)


@pytest.mark.parametrize("name", ["", "a\0b"])
def test_bad_device_names(name: str) -> None:
    with pytest.raises(ConfigError):
        add_device_request(FAMILY, name)
    with pytest.raises(ConfigError):
        delete_device_request(FAMILY, name)


# --- replies -----------------------------------------------------------------


def collect(request: NetlinkRequest, *datagrams: bytes, seq: int = 5) -> list[GenericMessage]:
    """Feed datagrams until the exchange completes; fail if it never does."""
    collector = ReplyCollector(request, seq)
    for datagram in datagrams:
        if collector.feed(datagram):
            return collector.replies
    raise AssertionError("the exchange did not complete")


def test_family_lookup() -> None:
    reply = nlmsg(0x10, 0, 5, genl(1, nla(2, s("vdpa")) + nla(1, u16(FAMILY)) + nla(3, u32(1))))
    replies = collect(family_request(), reply, ack(5))
    assert decode_family_id(replies[0]) == FAMILY


def test_family_lookup_for_another_name() -> None:
    reply = nlmsg(0x10, 0, 5, genl(1, nla(2, s("nlctrl")) + nla(1, u16(0x10))))
    with pytest.raises(NetlinkProtocolError, match="nlctrl"):
        decode_family_id(collect(family_request(), reply + ack(5))[0])


def mgmtdev_vduse() -> bytes:
    return genl(
        1,
        nla(2, s("vduse"))
        + PAD
        + nla(3, u64(0b110))
        + nla(15, u32(0))
        + PAD
        + nla(16, u64(1 << 33)),
    )


def test_list_mgmtdevs_over_two_datagrams() -> None:
    pci = genl(1, nla(1, s("pci")) + nla(2, s("0000:00:04.0")) + PAD + nla(3, u64(0b10)))
    first = nlmsg(FAMILY, 2, 5, mgmtdev_vduse()) + nlmsg(FAMILY, 2, 5, pci)
    replies = collect(get_mgmtdev_request(FAMILY), first, done(5))
    vduse, other = (MgmtDev.from_reply(reply) for reply in replies)
    assert vduse == MgmtDev(None, "vduse", 0b110, 0, 1 << 33)
    assert vduse.handle == "vduse"
    assert vduse.classes == (1, 2)
    assert other.handle == "pci/0000:00:04.0"
    assert other.max_supported_vqs is None


def device_reply(name: str) -> bytes:
    return genl(
        3,
        nla(2, s("vduse"))
        + nla(4, s(name))
        + nla(5, u32(2))
        + nla(6, u32(0))
        + nla(7, u32(1))
        + nla(8, u16(256))
        + nla(9, u16(1)),
    )


def test_get_device() -> None:
    replies = collect(
        get_device_request(FAMILY, "blk0"), nlmsg(FAMILY, 0, 5, device_reply("blk0")), ack(5)
    )
    assert VdpaDevice.from_reply(replies[0]) == VdpaDevice("blk0", "vduse", 2, 0, 1, 256, 1)


def test_list_devices() -> None:
    datagram = b"".join(nlmsg(FAMILY, 2, 5, device_reply(n)) for n in ("a", "b", "c"))
    replies = collect(get_device_request(FAMILY), datagram + done(5))
    assert [VdpaDevice.from_reply(r).name for r in replies] == ["a", "b", "c"]


def test_list_devices_empty() -> None:
    assert collect(get_device_request(FAMILY), done(5)) == []


def test_device_config() -> None:
    attrs = (
        nla(4, s("net0"))
        + nla(5, u32(1))
        + nla(10, bytes.fromhex("525400123456"))
        + nla(11, u16(1))
        + nla(13, u16(1500))
        + PAD
        + nla(14, u64((1 << 32) | (1 << 5)))
    )
    replies = collect(
        get_config_request(FAMILY, "net0"), nlmsg(FAMILY, 0, 5, genl(6, attrs)) + ack(5)
    )
    config = VdpaDeviceConfig.from_reply(replies[0])
    assert config == VdpaDeviceConfig(
        "net0", 1, bytes.fromhex("525400123456"), 1, 1500, None, (1 << 32) | (1 << 5)
    )


def test_add_and_delete_take_only_an_ack() -> None:
    assert collect(add_device_request(FAMILY, "blk0"), ack(5)) == []
    assert collect(delete_device_request(FAMILY, "blk0"), ack(5)) == []


def test_stale_and_noop_messages_are_skipped() -> None:
    stale = nlmsg(FAMILY, 0, 4, device_reply("old")) + ack(4, errno.EEXIST)
    noop = nlmsg(1, 0, 5, b"")
    replies = collect(
        get_device_request(FAMILY, "new"),
        stale,
        noop + nlmsg(FAMILY, 0, 5, device_reply("new")),
        ack(5),
    )
    assert [VdpaDevice.from_reply(r).name for r in replies] == ["new"]


def test_attribute_flags_are_masked_and_unknown_types_kept() -> None:
    attrs = parse_attributes(nla(0x8000 | 4, s("x")) + nla(99, b"\x01"))
    assert attrs.string(VdpaAttr.DEV_NAME) == "x"
    assert attrs.raw(99) == b"\x01"


@given(st.dictionaries(st.integers(1, 0x3FFF), st.binary(max_size=40), max_size=8))
def test_attributes_round_trip(values: dict[int, bytes]) -> None:
    data = b"".join(encode_attribute(k, v) for k, v in values.items())
    assert parse_attributes(data) == Attributes(values)


# --- errors from the kernel --------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "code", "cls", "line"),
    [
        (
            family_request(),
            errno.ENOENT,
            VdpaFamilyMissingError,
            "the kernel has no vdpa netlink family: load the vdpa module "
            "(the family is not visible outside the initial network namespace) (ENOENT)",
        ),
        (
            add_device_request(FAMILY, "blk0"),
            errno.EEXIST,
            VdpaExistsError,
            "a vDPA device named 'blk0' exists already (EEXIST)",
        ),
        (
            add_device_request(FAMILY, "blk0", "vdpasim"),
            errno.ENODEV,
            VdpaNoDeviceError,
            "no vDPA management device 'vdpasim' (for 'vduse', load the vduse module) (ENODEV)",
        ),
        (
            delete_device_request(FAMILY, "blk0"),
            errno.ENODEV,
            VdpaNoDeviceError,
            "no vDPA device named 'blk0' (ENODEV)",
        ),
        (
            add_device_request(FAMILY, "blk0"),
            errno.EPERM,
            VdpaPermissionError,
            "adding vDPA device 'blk0' on management device 'vduse' needs CAP_NET_ADMIN "
            "(run as root) (EPERM)",
        ),
        (
            delete_device_request(FAMILY, "blk0"),
            errno.EPERM,
            VdpaPermissionError,
            "deleting vDPA device 'blk0' needs CAP_NET_ADMIN (run as root) (EPERM)",
        ),
        (
            add_device_request(FAMILY, "blk0"),
            errno.EINVAL,
            VdpaNetlinkError,
            "management device 'vduse' refused vDPA device 'blk0' (for 'vduse': no VDUSE "
            "device of that name, or a virtqueue not set up with VDUSE_VQ_SETUP) (EINVAL)",
        ),
        (
            get_device_request(FAMILY),
            errno.ENOMEM,
            VdpaNetlinkError,
            "listing vDPA devices failed: Cannot allocate memory (ENOMEM)",
        ),
    ],
)
def test_kernel_errors(
    request_: NetlinkRequest, code: int, cls: type[VdpaNetlinkError], line: str
) -> None:
    with pytest.raises(VdpaNetlinkError) as info:
        collect(request_, ack(5, code))
    assert type(info.value) is cls
    assert str(info.value) == line
    assert info.value.errno == code
    assert isinstance(info.value, TransportError)


def test_dump_ending_in_an_error() -> None:
    with pytest.raises(VdpaPermissionError):
        collect(
            get_device_request(FAMILY), nlmsg(FAMILY, 2, 5, device_reply("a")), done(5, errno.EPERM)
        )


#: Captured from Linux: CTRL_CMD_GETFAMILY with a 1-byte CTRL_ATTR_FAMILY_ID, seq 7.
CAPPED_ERANGE = bytes.fromhex(
    "7800000002000003070000007e5a0000deffffff1c00000010000500070000000000000027000100"
    "417474726962757465206661696c656420706f6c6963792076616c69646174696f6e000008000200"
    "14000000240004800c00040000000000000000000c000500ffff0000000000000800010003000000"
)
UNCAPPED_ERANGE = bytes.fromhex(
    "8400000002000002070000007e5a0000deffffff1c00000010000500070000000000000003010000"
    "050001000100000027000100417474726962757465206661696c656420706f6c6963792076616c69"
    "646174696f6e00000800020014000000240004800c00040000000000000000000c000500ffff0000"
    "000000000800010003000000"
)


@pytest.mark.parametrize("datagram", [CAPPED_ERANGE, UNCAPPED_ERANGE])
def test_extended_ack_text(datagram: bytes) -> None:
    with pytest.raises(VdpaNetlinkError) as info:
        collect(family_request(), datagram, seq=7)
    assert info.value.errno == errno.ERANGE
    assert info.value.extack == "Attribute failed policy validation"
    assert str(info.value) == (
        "looking up the vdpa netlink family failed: Numerical result out of range: "
        "Attribute failed policy validation (ERANGE)"
    )


def test_mapping_without_a_request() -> None:
    error = vdpa_error(Operation.GET_MGMTDEV, errno.ENODEV, mgmtdev="vduse")
    assert type(error) is VdpaNoDeviceError
    assert str(error) == "no vDPA management device 'vduse' (ENODEV)"


# --- hostile datagrams -------------------------------------------------------

GET = get_device_request(FAMILY, "blk0")


@pytest.mark.parametrize(
    ("request_", "datagram", "match"),
    [
        (GET, b"\x10\x00\x00", "too short for a netlink header"),
        (GET, struct.pack("=IHHII", 15, FAMILY, 0, 5, 0), "claims 15 bytes"),
        (GET, struct.pack("=IHHII", 40, FAMILY, 0, 5, 0), "claims 40 bytes"),
        (GET, nlmsg(FAMILY, 0, 5, b"\x03\x01"), "no genlmsghdr"),
        (GET, nlmsg(FAMILY, 0, 5, genl(3, struct.pack("=HH", 3, 4))), "claims 3 bytes"),
        (GET, nlmsg(FAMILY, 0, 5, genl(3, struct.pack("=HH", 9, 4) + b"ab")), "claims 9 bytes"),
        (GET, nlmsg(FAMILY, 0, 5, genl(3, nla(4, s("a"))) + b"\x01\x02"), "stray bytes"),
        (GET, nlmsg(FAMILY, 0, 5, genl(3, nla(4, s("a")) + nla(4, s("b")))), "appears twice"),
        (GET, nlmsg(FAMILY, 0, 5, genl(5, b"")), "reply command 5, expected 3"),
        (GET, nlmsg(0x42, 0, 5, b""), "unexpected netlink message type 0x42"),
        (GET, nlmsg(4, 0, 5, b""), "unexpected netlink message type 0x4"),
        (GET, done(5), "not a dump"),
        (GET, nlmsg(2, 0, 5, b"\x00\x00"), "without an error code"),
        (GET, nlmsg(2, 0, 5, struct.pack("=i", 5)), "positive error 5"),
        (GET, nlmsg(2, 0, 5, struct.pack("=i", -(2**31))), "beyond any errno"),
        (GET, nlmsg(2, 0x200, 5, struct.pack("=i", -1) + b"\x00" * 8), "too short"),
        (
            GET,
            nlmsg(2, 0x200, 5, struct.pack("=i", -1) + struct.pack("=IHHII", 99, 0, 0, 0, 0)),
            "echoes a request of 99 bytes",
        ),
        (
            GET,
            nlmsg(2, 0x300, 5, struct.pack("=i", -1) + bytes(16) + nla(1, b"no-nul")),
            "not a NUL-terminated string",
        ),
        (add_device_request(FAMILY, "x"), nlmsg(FAMILY, 0, 5, device_reply("x")), "no data reply"),
        (get_device_request(FAMILY), nlmsg(FAMILY, 0, 5, device_reply("x")), "lacks NLM_F_MULTI"),
    ],
)
def test_hostile_datagrams(request_: NetlinkRequest, datagram: bytes, match: str) -> None:
    with pytest.raises(NetlinkProtocolError, match=re.escape(match)) as info:
        ReplyCollector(request_, 5).feed(datagram)
    assert isinstance(info.value, RemoteProtocolError)


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        (nla(2, s("vduse")) + nla(5, u32(2)) + nla(6, u32(0)), "lacks attribute DEV_NAME"),
        (nla(2, s("vduse")) + nla(4, s("x")) + nla(5, u16(2)), "DEV_ID has 2 bytes, expected 4"),
        (nla(2, s("vduse")) + nla(4, b"x"), "DEV_NAME is not a NUL-terminated string"),
        (nla(2, s("vduse")) + nla(4, b"x\0y\0"), "DEV_NAME is not a NUL-terminated string"),
        (nla(2, s("vduse")) + nla(4, b"\xff\0"), "DEV_NAME is not UTF-8"),
        (nla(4, s("x")), "lacks attribute MGMTDEV_DEV_NAME"),
    ],
)
def test_hostile_device_replies(attrs: bytes, match: str) -> None:
    reply = GenericMessage(3, 1, parse_attributes(attrs))
    with pytest.raises(NetlinkProtocolError, match=re.escape(match)):
        VdpaDevice.from_reply(reply)


def test_hostile_config_and_family_replies() -> None:
    bad_mac = GenericMessage(
        6, 1, parse_attributes(nla(4, s("n")) + nla(5, u32(1)) + nla(10, b"\x01"))
    )
    with pytest.raises(NetlinkProtocolError, match="MAC address"):
        VdpaDeviceConfig.from_reply(bad_mac)
    low_id = GenericMessage(1, 1, parse_attributes(nla(2, s("vdpa")) + nla(1, u16(3))))
    with pytest.raises(NetlinkProtocolError, match="reserved message type"):
        decode_family_id(low_id)


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_garbage_datagrams(datagram: bytes) -> None:
    with contextlib.suppress(NetlinkProtocolError):
        decode_messages(datagram)
    with contextlib.suppress(NetlinkProtocolError):
        parse_attributes(datagram)


messages = st.builds(
    lambda kind, flags, payload: nlmsg(kind, flags, 5, payload),
    st.sampled_from([1, 2, 3, 4, 0x10, FAMILY, 0x99]),
    st.sampled_from([0, 2, 0x100, 0x200, 0x300, 0x302]),
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda a, b: struct.pack("=i", a) + b, st.integers(-200, 200), st.binary(max_size=40)
        ),
        st.builds(lambda c, b: genl(c, b), st.integers(0, 7), st.binary(max_size=40)),
    ),
)


@settings(max_examples=400)
@given(
    st.sampled_from(
        [
            family_request(),
            GET,
            get_device_request(FAMILY),
            get_mgmtdev_request(FAMILY),
            add_device_request(FAMILY, "x"),
            get_config_request(FAMILY, "x"),
        ]
    ),
    st.lists(messages, max_size=4),
)
def test_garbage_replies(request_: NetlinkRequest, datagrams: list[bytes]) -> None:
    collector = ReplyCollector(request_, 5)
    try:
        for datagram in datagrams:
            collector.feed(datagram)
        for reply in collector.replies:
            for decode in (MgmtDev.from_reply, VdpaDevice.from_reply, VdpaDeviceConfig.from_reply):
                with contextlib.suppress(NetlinkProtocolError):
                    decode(reply)
            with contextlib.suppress(NetlinkProtocolError):
                decode_family_id(reply)
    except (NetlinkProtocolError, VdpaNetlinkError):
        pass


# --- the socket on this host -------------------------------------------------


@pytest.fixture
def no_vdpa_family() -> None:
    """Skip unless this kernel lacks the vdpa family (here, always)."""
    try:
        VdpaNetlink().close()
    except VdpaFamilyMissingError:
        return
    pytest.skip("this kernel has the vdpa netlink family")


MISSING = (
    "the kernel has no vdpa netlink family: load the vdpa module "
    "(the family is not visible outside the initial network namespace) (ENOENT)"
)


@pytest.mark.usefixtures("no_vdpa_family")
def test_family_lookup_without_vdpa() -> None:
    with pytest.raises(VdpaFamilyMissingError) as info:
        VdpaNetlink(timeout=5)
    assert str(info.value) == MISSING
    assert info.value.errno == errno.ENOENT


@pytest.mark.usefixtures("no_vdpa_family")
@pytest.mark.parametrize(
    "call",
    [
        lambda: netlink.add_device("blk0"),
        lambda: netlink.delete_device("blk0"),
        netlink.list_mgmtdevs,
        netlink.list_devices,
    ],
)
def test_public_functions_without_vdpa(call: Callable[[], object]) -> None:
    with pytest.raises(VdpaFamilyMissingError, match=re.escape(MISSING)):
        call()
