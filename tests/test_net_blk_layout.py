"""virtio-net and virtio-blk layouts."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvdpa.errors import ConfigError, RemoteProtocolError, RingError
from pyvdpa.virtio.blk import (
    BLK_CONFIG_SIZE,
    BLK_ID_BYTES,
    BLK_REQUEST_HEADER_SIZE,
    SECTOR_SIZE,
    BlkConfig,
    BlkGeometry,
    BlkRequestHeader,
    BlkTopology,
    DiscardWriteZeroesSegment,
    SegmentFlag,
)
from pyvdpa.virtio.constants import BlkType, NetFeature, NetStatus, VirtioFeature
from pyvdpa.virtio.net import (
    DUPLEX_UNKNOWN,
    NET_CONFIG_SIZE,
    NET_GSO_ECN,
    NET_HDR_LEGACY_SIZE,
    NET_HDR_SIZE,
    SPEED_UNKNOWN,
    NetConfig,
    NetGsoType,
    NetHdrFlag,
    NetHeader,
    ctrl_queue_index,
    format_mac,
    is_rx_queue,
    net_header_size,
    parse_mac,
    queue_pair,
    rx_queue_index,
    tx_queue_index,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)

net_headers = st.builds(NetHeader, u8, u8, u16, u16, u16, u16, u16)
net_configs = st.builds(
    NetConfig, st.binary(min_size=6, max_size=6), u16, u16, u16, u32, u8, u8, u16, u32
)
blk_configs = st.builds(
    BlkConfig,
    u64,
    u32,
    u32,
    st.builds(BlkGeometry, u16, u8, u8),
    u32,
    st.builds(BlkTopology, u8, u8, u16, u32),
    u8,
    u16,
    u32,
    u32,
    u32,
    u32,
    u32,
    u8,
)


class TestNetHeader:
    @pytest.mark.parametrize(
        ("features", "size"),
        [
            (0, 10),
            (NetFeature.CSUM | NetFeature.GUEST_TSO4, 10),
            (VirtioFeature.VERSION_1, 12),
            (NetFeature.MRG_RXBUF, 12),
            (VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF, 12),
        ],
    )
    def test_size(self, features: int, size: int) -> None:
        assert net_header_size(features) == size

    def test_known_bytes(self) -> None:
        header = NetHeader(
            NetHdrFlag.NEEDS_CSUM, NetGsoType.TCPV4 | NET_GSO_ECN, 54, 1448, 34, 16, 3
        )
        raw = bytes.fromhex("01 81 3600 a805 2200 1000 0300")
        assert header.pack() == header.pack(NET_HDR_SIZE) == raw
        assert header.pack(NET_HDR_LEGACY_SIZE) == raw[:10]
        assert NetHeader.unpack(raw + b"payload") == header

    @given(net_headers)
    def test_round_trip(self, header: NetHeader) -> None:
        assert NetHeader.unpack(header.pack()) == header
        legacy = NetHeader.unpack(header.pack(10), 10)
        assert legacy == NetHeader(*struct.unpack("<BBHHHHH", header.pack(10) + bytes(2)))
        buffer = bytearray(20)
        header.pack_into(buffer, 4)
        assert bytes(buffer[4:16]) == header.pack()
        assert NetHeader.unpack(memoryview(buffer)[4:]) == header
        header.pack_into(buffer, 0, NET_HDR_LEGACY_SIZE)
        assert bytes(buffer[:10]) == header.pack(10)

    def test_short_buffer(self) -> None:
        with pytest.raises(RingError, match="shorter"):
            NetHeader.unpack(bytes(11))
        with pytest.raises(RingError):
            NetHeader.unpack(bytes(9), NET_HDR_LEGACY_SIZE)
        assert NetHeader.unpack(bytes(10), NET_HDR_LEGACY_SIZE) == NetHeader()

    @pytest.mark.parametrize("size", [0, 8, 11, 13])
    def test_bad_header_size(self, size: int) -> None:
        with pytest.raises(ValueError, match="12 or 10"):
            NetHeader().pack(size)
        with pytest.raises(ValueError, match="12 or 10"):
            NetHeader.unpack(bytes(16), size)


class TestNetConfig:
    def test_layout(self) -> None:
        config = NetConfig(
            mac=parse_mac("52:54:00:12:34:56"),
            status=NetStatus.LINK_UP,
            max_virtqueue_pairs=4,
            mtu=9000,
            speed=10000,
            duplex=1,
            rss_max_key_size=40,
            rss_max_indirection_table_length=128,
            supported_hash_types=0x3F,
        )
        raw = config.encode()
        assert len(raw) == NET_CONFIG_SIZE == NetConfig.SIZE == 24
        assert raw[0:6] == bytes.fromhex("525400123456")
        assert struct.unpack_from("<HHHIBBHI", raw, 6) == (1, 4, 9000, 10000, 1, 40, 128, 0x3F)
        assert config.read(10, 2) == struct.pack("<H", 9000)

    def test_defaults(self) -> None:
        config = NetConfig()
        assert config.speed == SPEED_UNKNOWN
        assert config.duplex == DUPLEX_UNKNOWN
        assert config.encode()[:12] == bytes(6) + bytes.fromhex("0000 0100 dc05")

    @given(net_configs)
    def test_round_trip(self, config: NetConfig) -> None:
        assert NetConfig.decode(config.encode()) == config

    def test_read_every_slice(self) -> None:
        config = NetConfig(mac=bytes(range(1, 7)), status=3, max_virtqueue_pairs=2, mtu=1500)
        space = config.encode()
        for offset in range(NET_CONFIG_SIZE + 2):
            for size in range(NET_CONFIG_SIZE + 2):
                if offset + size <= NET_CONFIG_SIZE:
                    assert config.read(offset, size) == space[offset : offset + size]
                else:
                    with pytest.raises(RemoteProtocolError, match="leaves"):
                        config.read(offset, size)
        for offset, size in [(-1, 1), (0, -1), (2**32, 1)]:
            with pytest.raises(RemoteProtocolError):
                config.read(offset, size)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"mac": bytes(5)},
            {"mac": bytes(7)},
            {"status": 0x10000},
            {"mtu": -1},
            {"speed": 2**32},
            {"duplex": 256},
        ],
    )
    def test_invalid(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ConfigError):
            NetConfig(**kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize("size", [0, 23, 25])
    def test_decode_wrong_size(self, size: int) -> None:
        with pytest.raises(RemoteProtocolError, match="24 bytes"):
            NetConfig.decode(bytes(size))


class TestMac:
    def test_parse_and_format(self) -> None:
        assert parse_mac("52:54:00:12:34:56") == b"\x52\x54\x00\x12\x34\x56"
        assert parse_mac("AA:bb:Cc:00:ff:0F") == b"\xaa\xbb\xcc\x00\xff\x0f"
        assert format_mac(b"\xaa\xbb\xcc\x00\xff\x0f") == "aa:bb:cc:00:ff:0f"

    @given(st.binary(min_size=6, max_size=6))
    def test_round_trip(self, mac: bytes) -> None:
        assert parse_mac(format_mac(mac)) == mac

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "525400123456",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:567",
            "2:54:00:12:34:56",
            " 52:54:00:12:34:56",
            "52:54:00:12:34:56\n",
            "\uff152:54:00:12:34:56",  # fullwidth digit
        ],
    )
    def test_parse_rejects(self, text: str) -> None:
        with pytest.raises(ConfigError, match="invalid MAC"):
            parse_mac(text)

    @pytest.mark.parametrize("mac", [b"", bytes(5), bytes(7)])
    def test_format_rejects(self, mac: bytes) -> None:
        with pytest.raises(ConfigError):
            format_mac(mac)


class TestQueueIndex:
    def test_pairs(self) -> None:
        assert [rx_queue_index(k) for k in range(3)] == [0, 2, 4]
        assert [tx_queue_index(k) for k in range(3)] == [1, 3, 5]
        assert [queue_pair(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
        assert [is_rx_queue(i) for i in range(4)] == [True, False, True, False]
        assert ctrl_queue_index(1) == 2
        assert ctrl_queue_index(4) == 8

    @pytest.mark.parametrize(
        "call",
        [
            lambda: rx_queue_index(-1),
            lambda: tx_queue_index(-1),
            lambda: queue_pair(-1),
            lambda: is_rx_queue(-2),
            lambda: ctrl_queue_index(0),
        ],
    )
    def test_rejects(self, call: object) -> None:
        with pytest.raises(ValueError):
            call()  # type: ignore[operator]


class TestBlkRequest:
    def test_header(self) -> None:
        header = BlkRequestHeader(BlkType.OUT, 0, 0x1234)
        raw = header.pack()
        assert len(raw) == BLK_REQUEST_HEADER_SIZE == 16
        assert raw == struct.pack("<IIQ", 1, 0, 0x1234)
        assert BlkRequestHeader.unpack(raw + b"data") == header
        assert BlkRequestHeader.unpack(struct.pack("<IIQ", 99, 0, 0)).type == 99
        with pytest.raises(RingError, match="16 bytes"):
            BlkRequestHeader.unpack(raw[:15])

    @given(u32, u32, u64)
    def test_header_round_trip(self, type_: int, ioprio: int, sector: int) -> None:
        header = BlkRequestHeader(type_, ioprio, sector)
        assert BlkRequestHeader.unpack(header.pack()) == header

    def test_segments(self) -> None:
        segments = [
            DiscardWriteZeroesSegment(8, 16, SegmentFlag.UNMAP),
            DiscardWriteZeroesSegment(2**40, 1),
        ]
        raw = b"".join(s.pack() for s in segments)
        assert raw[:16] == struct.pack("<QII", 8, 16, 1)
        assert DiscardWriteZeroesSegment.unpack_all(raw) == segments
        for bad in (b"", raw[:15], raw + b"\0"):
            with pytest.raises(RingError, match="segments"):
                DiscardWriteZeroesSegment.unpack_all(bad)

    @given(st.lists(st.tuples(u64, u32, u32), min_size=1, max_size=8))
    def test_segments_round_trip(self, fields: list[tuple[int, int, int]]) -> None:
        segments = [DiscardWriteZeroesSegment(*f) for f in fields]
        raw = b"".join(s.pack() for s in segments)
        assert DiscardWriteZeroesSegment.unpack_all(memoryview(raw)) == segments

    def test_constants(self) -> None:
        assert SECTOR_SIZE == 512
        assert BLK_ID_BYTES == 20


class TestBlkConfig:
    def test_offsets(self) -> None:
        config = BlkConfig(
            capacity=0x0102030405060708,
            size_max=0x11,
            seg_max=0x12,
            geometry=BlkGeometry(cylinders=0x1314, heads=0x15, sectors=0x16),
            blk_size=4096,
            topology=BlkTopology(
                physical_block_exp=3, alignment_offset=1, min_io_size=8, opt_io_size=64
            ),
            writeback=1,
            num_queues=4,
            max_discard_sectors=0x21,
            max_discard_seg=0x22,
            discard_sector_alignment=0x23,
            max_write_zeroes_sectors=0x24,
            max_write_zeroes_seg=0x25,
            write_zeroes_may_unmap=1,
        )
        raw = config.encode()
        assert len(raw) == BLK_CONFIG_SIZE == BlkConfig.SIZE == 60

        def at(fmt: str, offset: int) -> int:
            value: int = struct.unpack_from("<" + fmt, raw, offset)[0]
            return value

        assert at("Q", 0) == 0x0102030405060708
        assert at("I", 8) == 0x11
        assert at("I", 12) == 0x12
        assert (at("H", 16), at("B", 18), at("B", 19)) == (0x1314, 0x15, 0x16)
        assert at("I", 20) == 4096
        assert (at("B", 24), at("B", 25), at("H", 26), at("I", 28)) == (3, 1, 8, 64)
        assert at("B", 32) == 1
        assert at("B", 33) == 0
        assert at("H", 34) == 4
        assert [at("I", o) for o in range(36, 56, 4)] == [0x21, 0x22, 0x23, 0x24, 0x25]
        assert at("B", 56) == 1
        assert raw[57:] == bytes(3)
        assert config.read(0, 57) == raw[:57]

    def test_defaults(self) -> None:
        config = BlkConfig()
        assert config.blk_size == SECTOR_SIZE
        assert config.num_queues == 1
        assert config.geometry == BlkGeometry()

    @given(blk_configs)
    def test_round_trip(self, config: BlkConfig) -> None:
        assert BlkConfig.decode(config.encode()) == config

    def test_read_every_slice(self) -> None:
        config = BlkConfig(capacity=2**30, seg_max=126, num_queues=2, write_zeroes_may_unmap=1)
        space = config.encode()
        for offset in range(BLK_CONFIG_SIZE + 2):
            for size in range(BLK_CONFIG_SIZE + 2):
                if offset + size <= BLK_CONFIG_SIZE:
                    assert config.read(offset, size) == space[offset : offset + size]
                else:
                    with pytest.raises(RemoteProtocolError, match="leaves"):
                        config.read(offset, size)
        for offset, size in [(-1, 1), (0, -1), (2**32, 4)]:
            with pytest.raises(RemoteProtocolError):
                config.read(offset, size)

    def test_write_writeback(self) -> None:
        config = BlkConfig(writeback=0)
        assert config.apply_write(32, b"\x01").writeback == 1
        assert config.apply_write(32, b"\x01").capacity == config.capacity
        assert config.apply_write(32, b"\x00") == config
        for offset, data in [
            (0, b"\x01"),
            (33, b"\x01"),
            (32, b"\x01\x00"),
            (32, b""),
            (31, b"\0\1"),
        ]:
            with pytest.raises(RemoteProtocolError, match="writable"):
                config.apply_write(offset, data)
        with pytest.raises(RemoteProtocolError, match="0 or 1"):
            config.apply_write(32, b"\x02")

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"capacity": 2**64},
            {"capacity": -1},
            {"num_queues": 0x10000},
            {"writeback": 256},
            {"geometry": BlkGeometry(heads=256)},
            {"topology": BlkTopology(min_io_size=0x10000)},
        ],
    )
    def test_invalid(self, kwargs: dict[str, object]) -> None:
        with pytest.raises(ConfigError):
            BlkConfig(**kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize("size", [0, 57, 59, 61])
    def test_decode_wrong_size(self, size: int) -> None:
        with pytest.raises(RemoteProtocolError, match="60 bytes"):
            BlkConfig.decode(bytes(size))
