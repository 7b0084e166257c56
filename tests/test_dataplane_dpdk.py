"""DPDK's virtio driver through the compiled engine: frames cross intact.

testpmd runs two ports, DPDK's virtio-user (on the engine's loopback
device) and a pcap port, and io-forwards between them: frames read from a
pcap file are transmitted by the virtio driver, looped back by the engine
through guest memory, received by the virtio driver and written to another
pcap file.  What comes out must be byte for byte what the device's receive
filter accepted, in order, for split and packed rings, with and without
MRG_RXBUF, in every engine mode.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers import PeerPool
from peers.dpdk import Testpmd
from pyvdpa.dataplane.engine import Engine
from pyvdpa.dataplane.net import DEFAULT_MAC, EngineNetDevice
from pyvdpa.device import Device
from pyvdpa.vhost_user.server import BackendServer

pytestmark = pytest.mark.peers

_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
_PCAP_MAGIC = 0xA1B2C3D4
_LINKTYPE_ETHERNET = 1
FRAMES = 200
SETTLE = 10.0


def write_pcap(path: Path, frames: list[bytes]) -> None:
    with path.open("wb") as f:
        f.write(_PCAP_HEADER.pack(_PCAP_MAGIC, 2, 4, 0, 0, 65535, _LINKTYPE_ETHERNET))
        for frame in frames:
            f.write(_PCAP_RECORD.pack(0, 0, len(frame), len(frame)))
            f.write(frame)


def read_pcap(path: Path) -> list[bytes]:
    data = path.read_bytes()
    frames = []
    offset = _PCAP_HEADER.size
    while offset < len(data):
        _, _, captured, _ = _PCAP_RECORD.unpack_from(data, offset)
        offset += _PCAP_RECORD.size
        frames.append(data[offset : offset + captured])
        offset += captured
    return frames


def _frames(seed: int) -> tuple[list[bytes], list[bytes]]:
    """Frames of many sizes and destinations, and the ones the device accepts."""
    rng = random.Random(seed)
    foreign = bytes.fromhex("020000000099")
    destinations = [DEFAULT_MAC, b"\xff" * 6, bytes.fromhex("01005e000001"), foreign]
    frames, accepted = [], []
    for i in range(FRAMES):
        dst = destinations[i % len(destinations)]
        size = rng.choice([60, 64, 65, 128, 511, 1000, 1514]) if i % 7 else rng.randint(60, 1514)
        frame = dst + bytes.fromhex("020000000001") + b"\x88\xb5" + rng.randbytes(size - 14)
        frames.append(frame)
        if dst != foreign:
            accepted.append(frame)
    return frames, accepted


def _until(condition: Callable[[], bool], timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def engine_for(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Engine]]:
    engines: list[Engine] = []

    def make(mode: str) -> Engine:
        engine = Engine(mode).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.mark.parametrize(
    ("ring", "mrg_rxbuf", "mode"),
    [
        ("split", True, "event"),
        ("packed", True, "adaptive"),
        ("split", False, "poll"),
        ("packed", False, "event"),
    ],
)
def test_frames_round_trip_through_the_engine_intact(
    peers: PeerPool,
    tmp_path: Path,
    engine_for: Callable[[str], Engine],
    ring: str,
    mrg_rxbuf: bool,
    mode: str,
) -> None:
    frames, accepted = _frames(hash((ring, mrg_rxbuf, mode)) & 0xFFFF)
    sent, received = tmp_path / "in.pcap", tmp_path / "out.pcap"
    write_pcap(sent, frames)
    device = EngineNetDevice(mode="loopback", engine=engine_for(mode))
    path = peers.sock_dir / "net.sock"

    def factory() -> Device:
        return device

    with BackendServer(path, factory):
        virtio = (
            f"net_virtio_user0,path={path},queues=1,packed_vq={int(ring == 'packed')},"
            f"mrg_rxbuf={int(mrg_rxbuf)},in_order=0"
        )
        pcap = f"net_pcap0,rx_pcap={sent},tx_pcap={received}"
        testpmd = peers.start(
            Testpmd([virtio, pcap], forward_mode="io", main_lcore=1, app_args=["--no-flush-rx"])
        )
        testpmd.start_forwarding()
        tx, rx = device.stats[1], device.stats[0]
        _until(lambda: tx.packets == FRAMES and rx.packets == len(accepted))
        _until(lambda: testpmd.port_stats()[1].tx_packets == len(accepted))
        testpmd.stop_forwarding()
        testpmd.stop()
        assert tx.as_dict() | {"calls": 0} == {
            "received_desc": FRAMES,
            "completed_desc": FRAMES,
            "bad_desc_errors": 0,
            "exceed_max_chain": 0,
            "invalid_buffer": 0,
            "completion_errors": 0,
            "packets": FRAMES,
            "bytes": sum(len(f) for f in frames),
            "dropped": FRAMES - len(accepted),
            "calls": 0,
        }
        assert rx.packets == len(accepted)
        assert rx.bytes == sum(len(f) for f in accepted)
        assert rx.invalid_buffer == rx.bad_desc_errors == rx.dropped == 0
    assert read_pcap(received) == accepted
