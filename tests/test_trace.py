"""The trace's sans-I/O core: decoding a copy of each message, pairing replies, printing.

No sockets here: messages are built with the codec and fed to a
:class:`~pyvdpa.trace.conversation.Conversation` as the proxy feeds it.
"""

from __future__ import annotations

import json
import struct

from hypothesis import given
from hypothesis import strategies as st

from pyvdpa.memory import MemoryRegion
from pyvdpa.trace import ChannelKind, Conversation, MessageRecord, Side, format_json, format_text
from pyvdpa.trace.render import describe_fd
from pyvdpa.vhost_user.codec import (
    HEADER,
    U64,
    ConfigSpace,
    ConfigType,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    MemTable,
    Message,
    NoPayload,
    Payload,
    VringAddr,
    VringAddrFlags,
    VringState,
    decode_header,
    encode,
    encode_reply,
)
from pyvdpa.vhost_user.protocol import BackendRequest, HeaderFlags, ProtocolFeature, Request
from pyvdpa.virtio.constants import BlkFeature, DeviceId, NetFeature, VirtioFeature

MAIN = ChannelKind.MAIN
BACK = ChannelKind.BACKEND
FE = Side.FRONTEND
BE = Side.BACKEND
NEED = HeaderFlags.VERSION | HeaderFlags.NEED_REPLY


def feed(
    conv: Conversation,
    channel: ChannelKind,
    sender: Side,
    data: bytes,
    now: float = 0.0,
    fds: tuple[str, ...] = (),
) -> MessageRecord:
    """Frame ``data`` as the transport does and hand it to ``conv``."""
    header = decode_header(data[:12])
    return conv.observe(channel, sender, header, data[12:], fds, now)


def request(
    req: Request | BackendRequest,
    payload: Payload | None = None,
    flags: HeaderFlags = HeaderFlags.VERSION,
    nfds: int = 0,
) -> bytes:
    data, _ = encode(Message(req, payload or NoPayload(), flags, (0,) * nfds))
    return data


def negotiated(protocol: ProtocolFeature = ProtocolFeature.REPLY_ACK) -> Conversation:
    conv = Conversation(1)
    feed(conv, MAIN, FE, request(Request.SET_PROTOCOL_FEATURES, U64(int(protocol))))
    return conv


def test_reply_names_its_request_and_the_time_it_took() -> None:
    conv = Conversation(1)
    asked = feed(conv, MAIN, FE, request(Request.GET_FEATURES), now=1.0)
    features = int(VirtioFeature.VERSION_1 | NetFeature.MQ | NetFeature.MAC)
    reply = feed(conv, MAIN, BE, encode_reply(Request.GET_FEATURES, U64(features)), now=1.25)
    assert not asked.is_reply and asked.request == "GET_FEATURES" and asked.seq == 1
    assert reply.is_reply and reply.reply_to == 1 and reply.latency == 0.25
    assert reply.malformed is None
    # MQ (bit 22) tells a net device: bit 5 is then MAC, not blk's RO.
    assert reply.fields == {"features": features, "features_names": ["MAC", "MQ", "VERSION_1"]}
    assert conv.device_id == DeviceId.NET


def test_device_specific_bits_show_both_meanings_until_the_type_is_known() -> None:
    conv = Conversation(1)
    features = int(NetFeature.MAC | VirtioFeature.VERSION_1)
    record = feed(conv, MAIN, FE, request(Request.SET_FEATURES, U64(features)))
    assert record.fields["features_names"] == ["MAC/RO", "VERSION_1"]
    blk = Conversation(2, device_id=DeviceId.BLOCK)
    record = feed(blk, MAIN, FE, request(Request.SET_FEATURES, U64(int(BlkFeature.RO))))
    assert record.fields["features_names"] == ["RO"]


def test_need_reply_is_answered_only_once_reply_ack_is_negotiated() -> None:
    conv = Conversation(1)
    feed(conv, MAIN, FE, request(Request.SET_OWNER, flags=NEED))
    stray = feed(conv, MAIN, BE, encode_reply(Request.SET_OWNER, U64(0)))
    assert stray.reply_to is None
    assert stray.malformed == "reply to SET_OWNER, which no request waits for"

    conv = negotiated()
    asked = feed(conv, MAIN, FE, request(Request.SET_OWNER, flags=NEED), now=2.0)
    ack = feed(conv, MAIN, BE, encode_reply(Request.SET_OWNER, U64(1)), now=2.5)
    assert ack.reply_to == asked.seq and ack.malformed is None
    assert ack.fields == {"u64": 1, "result": "failure"}


def test_replies_pair_with_the_oldest_request_of_their_code() -> None:
    conv = Conversation(1)
    first = feed(conv, MAIN, FE, request(Request.GET_VRING_BASE, VringState(0, 0)), now=1.0)
    second = feed(conv, MAIN, FE, request(Request.GET_VRING_BASE, VringState(1, 0)), now=2.0)
    r1 = feed(conv, MAIN, BE, encode_reply(Request.GET_VRING_BASE, VringState(0, 7)), now=3.0)
    r2 = feed(conv, MAIN, BE, encode_reply(Request.GET_VRING_BASE, VringState(1, 9)), now=3.5)
    assert (r1.reply_to, r1.latency) == (first.seq, 2.0)
    assert (r2.reply_to, r2.latency) == (second.seq, 1.5)
    assert r2.fields == {"index": 1, "num": 9}


def test_memory_table_regions_and_fds() -> None:
    conv = Conversation(1)
    regions = (
        MemoryRegion(0, 0xA0000, 0x7F0000000000, 0),
        MemoryRegion(0x100000, 0x1FF00000, 0x7F0000100000, 0x100000),
    )
    record = feed(
        conv,
        MAIN,
        FE,
        request(Request.SET_MEM_TABLE, MemTable(regions), nfds=2),
        fds=("/memfd:pc.ram (deleted)", "/memfd:pc.ram (deleted)"),
    )
    assert record.malformed is None
    assert record.fds == ("memfd:pc.ram", "memfd:pc.ram")
    assert record.fields["regions"][1] == {
        "guest_phys_addr": 0x100000,
        "memory_size": 0x1FF00000,
        "userspace_addr": 0x7F0000100000,
        "mmap_offset": 0x100000,
    }
    line = format_text(record)
    assert "guest_phys_addr=0x100000 memory_size=0x1ff00000" in line
    assert "fds=[memfd:pc.ram memfd:pc.ram]" in line


def test_backend_channel_request_and_the_frontends_ack() -> None:
    conv = negotiated(ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ)
    miss = IotlbMsg(0x1000, 0, 0, IotlbPerm.RW, IotlbType.MISS)
    asked = feed(conv, BACK, BE, request(BackendRequest.IOTLB_MSG, miss, NEED), now=1.0)
    ack = feed(conv, BACK, FE, encode_reply(BackendRequest.IOTLB_MSG, U64(0)), now=1.001)
    assert asked.fields == {"iova": 0x1000, "size": 0, "uaddr": 0, "perm": "RW", "type": "MISS"}
    assert not asked.is_reply and ack.is_reply and ack.reply_to == asked.seq
    # The main socket's IOTLB_MSG is another request: its queue is apart.
    assert feed(conv, MAIN, BE, encode_reply(Request.IOTLB_MSG, U64(0))).reply_to is None


def test_packed_ring_base_is_split_into_index_and_wrap_counter() -> None:
    conv = Conversation(1)
    packed = int(VirtioFeature.RING_PACKED | VirtioFeature.VERSION_1)
    feed(conv, MAIN, FE, request(Request.SET_FEATURES, U64(packed)))
    feed(conv, MAIN, FE, request(Request.GET_VRING_BASE, VringState(0, 0)))
    num = (1 << 31) | (5 << 16) | (1 << 15) | 9
    reply = feed(conv, MAIN, BE, encode_reply(Request.GET_VRING_BASE, VringState(0, num)))
    assert reply.fields["last_avail_idx"] == 9 and reply.fields["avail_wrap_counter"] == 1
    assert reply.fields["last_used_idx"] == 5 and reply.fields["used_wrap_counter"] == 1


def test_config_reply_must_cover_what_was_asked() -> None:
    conv = Conversation(1)
    ask = ConfigSpace(0, 8, ConfigType.FRONTEND, bytes(8))
    feed(conv, MAIN, FE, request(Request.GET_CONFIG, ask))
    short = ConfigSpace(0, 4, ConfigType.FRONTEND, b"\x01\x02\x03\x04")
    reply = feed(conv, MAIN, BE, encode_reply(Request.GET_CONFIG, short))
    assert reply.reply_to == 1 and reply.fields["data"] == "01020304"
    assert reply.malformed == "GET_CONFIG: reply covers 4 bytes at offset 0, asked 8 at 0"
    feed(conv, MAIN, FE, request(Request.GET_CONFIG, ask))
    refused = feed(conv, MAIN, BE, encode_reply(Request.GET_CONFIG, NoPayload()))
    assert refused.reply_to == 3 and refused.malformed is None and refused.fields == {}


def test_u64_meanings() -> None:
    conv = Conversation(1)
    kick = feed(conv, MAIN, FE, request(Request.SET_VRING_KICK, U64(0x101)))
    assert kick.fields == {"index": 1, "nofd": True}
    mac = int.from_bytes(bytes.fromhex("525400123456"), "little")
    assert feed(conv, MAIN, FE, request(Request.SEND_RARP, U64(mac))).fields == {
        "mac": "52:54:00:12:34:56"
    }
    status = feed(conv, MAIN, FE, request(Request.SET_STATUS, U64(0xF)))
    assert status.fields["status_names"] == ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"]


def raw(code: int, flags: int, body: bytes) -> bytes:
    return HEADER.pack(code, flags, len(body)) + body


def test_malformed_messages_are_shown_with_the_reason_and_raw_bytes() -> None:
    conv = Conversation(1)
    unknown = feed(conv, MAIN, FE, raw(99, 1, b"\xaa"))
    assert unknown.request == "UNKNOWN_99" and unknown.malformed == "unknown request 99"
    assert unknown.raw == b"\xaa"
    short = feed(conv, MAIN, FE, raw(Request.SET_VRING_NUM, 1, b"\x01\x02\x03"))
    assert short.malformed == "SET_VRING_NUM: payload is 3 bytes, expected 8"
    assert short.raw == b"\x01\x02\x03" and short.fields == {}
    replied = feed(conv, MAIN, FE, raw(Request.SET_OWNER, 5, b""))
    assert replied.malformed == "SET_OWNER: REPLY flag set on a request"
    fds = feed(conv, MAIN, FE, raw(Request.SET_OWNER, 1, b""), fds=("anon_inode:[eventfd]",))
    assert fds.malformed == "SET_OWNER: takes no fds, got 1" and fds.fds == ("eventfd",)
    asked = feed(conv, MAIN, FE, request(Request.GET_FEATURES))
    flagged = feed(conv, MAIN, BE, raw(Request.GET_FEATURES, 0xD, struct.pack("=Q", 1)))
    # The reply still answers the request it was for, and says what is wrong with it.
    assert flagged.reply_to == asked.seq
    assert flagged.malformed == "GET_FEATURES: reply flags 0xd, expected 0x5"
    back = feed(conv, BACK, BE, raw(77, 1, b""))
    assert back.malformed == "unknown back-end request 77"
    text = format_text(short)
    assert "MALFORMED: SET_VRING_NUM: payload is 3 bytes, expected 8 raw=010203" in text


def test_json_lines_carry_every_field() -> None:
    conv = negotiated()
    feed(conv, MAIN, FE, request(Request.SET_VRING_NUM, VringState(1, 256), NEED), now=0.5)
    ack = feed(conv, MAIN, BE, encode_reply(Request.SET_VRING_NUM, U64(0)), now=0.5005)
    obj = json.loads(format_json(ack))
    assert obj == {
        "time": 0.5005,
        "connection": 1,
        "seq": 3,
        "channel": "main",
        "direction": "back-end -> front-end",
        "kind": "reply",
        "request": "SET_VRING_NUM",
        "code": 8,
        "flags": ["VERSION", "REPLY"],
        "size": 8,
        "payload": {"u64": 0, "result": "success"},
        "fds": [],
        "reply_to": 2,
        "latency_us": 500.0,
    }


def test_text_lines() -> None:
    conv = negotiated()
    addr = VringAddr(1, VringAddrFlags(0), 0x7F0000001000, 0x7F0000003000, 0x7F0000002000, 0)
    sent = feed(conv, MAIN, FE, request(Request.SET_VRING_ADDR, addr, NEED), now=1.5)
    ack = feed(conv, MAIN, BE, encode_reply(Request.SET_VRING_ADDR, U64(0)), now=1.500250)
    assert format_text(sent) == (
        "    1.500000 c1 #2 main F>B SET_VRING_ADDR [VERSION|NEED_REPLY] size=40 index=1 "
        "flags=0 desc_user_addr=0x7f0000001000 used_user_addr=0x7f0000003000 "
        "avail_user_addr=0x7f0000002000 log_guest_addr=0x0"
    )
    assert format_text(ack) == (
        "    1.500250 c1 #3 main B>F reply SET_VRING_ADDR [VERSION|REPLY] size=8 u64=0x0 "
        "result=success reply-to=#2 latency=250us"
    )


def test_describe_fd() -> None:
    assert describe_fd("anon_inode:[eventfd]") == "eventfd"
    assert describe_fd("/memfd:pyvdpa-drive (deleted)") == "memfd:pyvdpa-drive"
    assert describe_fd("socket:[4242]") == "socket"
    assert describe_fd("/tmp/disk.img") == "/tmp/disk.img"


@given(
    channel=st.sampled_from(list(ChannelKind)),
    sender=st.sampled_from(list(Side)),
    code=st.integers(0, 60),
    flags=st.sampled_from([1, 5, 9, 13]),
    body=st.binary(max_size=80),
    nfds=st.integers(0, 3),
)
def test_any_framed_message_gives_a_record(
    channel: ChannelKind, sender: Side, code: int, flags: int, body: bytes, nfds: int
) -> None:
    conv = negotiated(ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ)
    record = feed(conv, channel, sender, raw(code, flags, body), fds=("socket:[1]",) * nfds)
    assert record.code == code and record.size == len(body)
    assert (record.malformed is None) == (record.raw is None)
    assert format_text(record)
    json.loads(format_json(record))
