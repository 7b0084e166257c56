"""pyvdpa's vhost-user ends against vhost-user programs written by others.

* back-end: DPDK's virtio-user driver (testpmd) negotiates with a simulated
  virtio-net device served in this process, for split and packed rings, one
  and two queue pairs, with and without MRG_RXBUF, IN_ORDER included, and
  forwards frames round trip through its loopback;
* front-end: ``pyvdpa drive`` (the real command, as a separate program)
  sends frames into DPDK's net_vhost back-end and receives frames from it,
  and writes, reads and verifies a disk exported by qemu-storage-daemon;
* socket roles: DPDK virtio-user listening with ``pyvdpa run --client``
  connecting (and reconnecting), and ``pyvdpa drive --server`` listening
  with net_vhost connecting.

Every figure is checked against the counters of the other program.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peers import PeerPool
from peers.common import PeerProcess
from peers.dpdk import PortStats, Testpmd, net_vhost, virtio_user
from peers.qsd import StorageDaemon
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.blk import pattern
from pyvdpa.vhost_user.backend import BackendConnection
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import NetFeature, VirtioFeature
from pyvdpa.virtio.net import parse_mac

pytestmark = pytest.mark.peers

SIM_MAC = "52:54:00:12:34:56"
# The simulated device loops back only frames addressed to its MAC (or to a
# group); testpmd addresses its frames to this peer.
ETH_PEER = f"--eth-peer=0,{SIM_MAC}"
FRAME_SIZE = 64
TXPKTS = f"--txpkts={FRAME_SIZE}"
TRAFFIC_SECONDS = 1.0
DRIVE_SECONDS = "1.5"
DRIVE_RING_SIZE = 256
SETTLE_SECONDS = 5.0
DISK_SIZE = 16 << 20
BLOCK = 4096
RING_ERRORS = ("bad_desc_errors", "exceed_max_chain", "invalid_buffer", "completion_errors")
_BLOCK_TAG = struct.Struct("<QQ")


class PyvdpaCommand(PeerProcess):
    """The ``pyvdpa`` command run as a program of its own, output captured."""

    def __init__(self, *args: str) -> None:
        """Describe ``pyvdpa ARGS...``; :meth:`start` (or ``with``) runs it."""
        super().__init__(
            [sys.executable, "-u", "-m", "pyvdpa", "-v", *args],
            name=f"pyvdpa {' '.join(args[:2])}",
            program=sys.executable,
        )

    def figures(self) -> dict[str, Any]:
        """The JSON object a ``--json`` run printed."""
        for line in reversed(self.output().splitlines()):
            if line.startswith("{"):
                figures: dict[str, Any] = json.loads(line)
                return figures
        raise AssertionError(f"{self.name} printed no JSON object:\n{self.output()}")

    def _request_exit(self) -> None:
        # Both `run` and `drive` stop cleanly on SIGTERM; neither reads stdin.
        self._signal_group(signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class ServedNet:
    """A simulated net device served on a socket, with its connections."""

    device: NetDevice
    path: Path
    connections: list[BackendConnection]


def _until(condition: Callable[[], bool], timeout: float = SETTLE_SECONDS) -> None:
    # Counters of another process settle asynchronously: give them time, and
    # let the assertions that follow report the values.
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def _drive(peers: PeerPool, *args: str, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    drive = peers.start(PyvdpaCommand("drive", *args, "--json"))
    status = drive.wait_exit(timeout)
    return status, drive.figures()


def _drive_txonly(
    peers: PeerPool, backend: Testpmd, sock: Path, *options: str
) -> tuple[int, dict[str, Any], PortStats]:
    """``drive net --mode txonly`` into a forwarding ``backend``.

    Returns the exit status, the figures and the back-end's port once it
    has counted every frame sent.
    """
    backend.start_forwarding()
    status, result = _drive(
        peers,
        "net",
        "--socket",
        str(sock),
        "--mode",
        "txonly",
        "--frame-size",
        str(FRAME_SIZE),
        "--duration",
        DRIVE_SECONDS,
        *options,
    )
    _until(lambda: backend.port_stats()[0].rx_packets >= result["tx_packets"])
    return status, result, backend.port_stats()[0]


def _no_errors(stats: PortStats) -> bool:
    return stats.rx_errors == stats.tx_errors == stats.rx_missed == stats.rx_nombuf == 0


def _round_trip(testpmd: Testpmd) -> PortStats:
    """Send a first burst, io-forward for a while, stop; the port's counters."""
    testpmd.start_forwarding(tx_first=True)
    time.sleep(TRAFFIC_SECONDS)
    testpmd.stop_forwarding()
    return testpmd.port_stats()[0]


@pytest.fixture
def serve_net(sock_dir: Path) -> Iterator[Callable[[int], ServedNet]]:
    """Serve a loopback sim-net device in this process; request before ``peers``.

    Set up before the peers, it is torn down after them: the front-end
    leaves first, as it would with a real VMM.
    """
    with contextlib.ExitStack() as stack:

        def serve(queue_pairs: int) -> ServedNet:
            device = NetDevice(mode="loopback", mac=parse_mac(SIM_MAC), queue_pairs=queue_pairs)
            path = sock_dir / "sim-net.sock"
            connections: list[BackendConnection] = []
            server = BackendServer(path, lambda: device, on_connect=connections.append)
            server.start()
            stack.callback(server.stop)
            return ServedNet(device, path, connections)

        yield serve


@pytest.mark.parametrize("mrg_rxbuf", [False, True], ids=["nomrg", "mrg"])
@pytest.mark.parametrize("queues", [1, 2], ids=["1q", "2q"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_virtio_user_forwards_through_sim_net(
    serve_net: Callable[[int], ServedNet],
    peers: PeerPool,
    packed: bool,
    queues: int,
    mrg_rxbuf: bool,
) -> None:
    served = serve_net(queues)
    testpmd = peers.start(
        virtio_user(
            served.path,
            queues=queues,
            packed=packed,
            mrg_rxbuf=mrg_rxbuf,
            mode="io",
            app_args=[ETH_PEER, TXPKTS],
        )
    )

    # testpmd prints the port's MAC once the port has started.
    assert re.search(r"^Port 0: (?:[0-9A-F]{2}:){5}[0-9A-F]{2}$", testpmd.output(), re.M)
    assert "Fail" not in testpmd.output(), testpmd.output()
    assert len(served.connections) == 1
    connection = served.connections[0]
    rings = connection.vrings[: 2 * queues]
    # virtio-user does not wait for the last SET_VRING_ENABLE to be handled.
    _until(lambda: all(vring.running for vring in rings))
    assert connection.features_set
    # virtio-user asks IN_ORDER (in_order=1 by default) and the device offers it.
    assert connection.features & VirtioFeature.IN_ORDER
    assert bool(connection.features & VirtioFeature.RING_PACKED) == packed
    assert bool(connection.features & NetFeature.MRG_RXBUF) == mrg_rxbuf
    assert bool(connection.features & NetFeature.MQ) == (queues > 1)
    assert all(vring.running for vring in rings)

    port = _round_trip(testpmd)
    stats = served.device.stats
    _until(lambda: sum(stats[2 * p + 1].packets for p in range(queues)) >= port.tx_packets)

    assert port.rx_packets > 0
    assert _no_errors(port), port
    sent = sum(stats[2 * p + 1].packets for p in range(queues))
    looped = sum(stats[2 * p].packets for p in range(queues))
    assert sent == port.tx_packets
    # Frames the device delivered after testpmd stopped polling stay unread.
    assert port.rx_packets <= looped <= sent
    assert port.rx_bytes == FRAME_SIZE * port.rx_packets
    for pair in range(queues):
        rx, tx = stats[2 * pair], stats[2 * pair + 1]
        assert tx.packets > 0 and rx.packets > 0, (pair, rx, tx)
        assert tx.bytes == FRAME_SIZE * tx.packets
        assert rx.bytes == FRAME_SIZE * rx.packets
    for qid, queue_stats in enumerate(stats):
        assert all(getattr(queue_stats, name) == 0 for name in RING_ERRORS), (qid, queue_stats)
    # Every frame came back to the device's MAC: none was filtered out.
    assert served.device.dropped == 0


@pytest.mark.parametrize("engine", ["compiled", "python"])
@pytest.mark.parametrize(
    ("packed", "queues"), [(False, 1), (True, 1), (False, 2)], ids=["split", "packed", "split-2q"]
)
def test_drive_txonly_counted_by_net_vhost(
    peers: PeerPool, packed: bool, queues: int, engine: str
) -> None:
    sock = peers.sock_dir / "net-vhost.sock"
    backend = peers.start(net_vhost(sock, queues=queues, mode="rxonly"))
    status, result, port = _drive_txonly(
        peers, backend, sock, "--queues", str(queues), "--engine", engine,
        *(["--packed"] if packed else []),
    )  # fmt: skip

    assert status == 0, result
    assert result["errors"] == 0
    assert result["tx_packets"] > 0
    assert port.rx_packets == result["tx_packets"]
    assert port.rx_bytes == result["tx_bytes"] == FRAME_SIZE * result["tx_packets"]
    assert _no_errors(port), port


def test_drive_iommu_into_net_vhost_with_iotlb(peers: PeerPool) -> None:
    """DPDK's IOTLB asks for every page it touches; drive answers and the frames arrive."""
    sock = peers.sock_dir / "net-vhost-iommu.sock"
    backend = peers.start(net_vhost(sock, mode="rxonly", iommu=True))
    status, result, port = _drive_txonly(peers, backend, sock, "--iommu")

    assert status == 0, result
    assert result["errors"] == 0
    assert result["tx_packets"] > 0
    assert result["iotlb_misses"] > 0
    assert port.rx_packets == result["tx_packets"]
    assert port.rx_bytes == FRAME_SIZE * result["tx_packets"]
    assert _no_errors(port), port


@pytest.mark.parametrize("engine", ["compiled", "python"])
def test_regression_drive_rxonly_from_net_vhost_stops_on_time(peers: PeerPool, engine: str) -> None:
    sock = peers.sock_dir / "net-vhost.sock"
    backend = peers.start(net_vhost(sock, mode="txonly", app_args=[TXPKTS]))
    backend.start_forwarding()

    status, result = _drive(
        peers,
        "net",
        "--socket",
        str(sock),
        "--mode",
        "rxonly",
        "--engine",
        engine,
        "--ring-size",
        str(DRIVE_RING_SIZE),
        "--duration",
        DRIVE_SECONDS,
    )
    backend.stop_forwarding()
    port = backend.port_stats()[0]

    # A back-end refilling the receive ring as fast as it is drained once
    # kept the run going far past its duration.
    assert result["duration"] < float(DRIVE_SECONDS) + 1.0
    # testpmd's frames carry no pyvdpa tag: counted as foreign, not as bad.
    assert status == 0, result
    assert result["rx_bad"] == 0
    assert result["rx_foreign"] == result["rx_packets"]
    assert result["errors"] == 0
    assert result["rx_packets"] > 0
    assert result["rx_bytes"] == FRAME_SIZE * result["rx_packets"]
    # Buffers filled after drive's last look stay in its ring, at most a ring's worth.
    assert 0 <= port.tx_packets - result["rx_packets"] <= DRIVE_RING_SIZE
    assert _no_errors(port), port


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_drive_io_through_net_vhost_forwarding(peers: PeerPool, packed: bool) -> None:
    """The compiled driver's frames go round DPDK's io forwarding and come back intact."""
    sock = peers.sock_dir / "net-vhost.sock"
    backend = peers.start(net_vhost(sock, mode="io"))
    backend.start_forwarding()
    status, result = _drive(
        peers, "net", "--socket", str(sock), "--mode", "io", "--engine", "compiled",
        "--duration", DRIVE_SECONDS, *(["--packed"] if packed else []),
    )  # fmt: skip
    _until(lambda: backend.port_stats()[0].rx_packets >= result["tx_packets"])
    backend.stop_forwarding()
    port = backend.port_stats()[0]

    assert status == 0, result
    assert result["rx_packets"] > 0
    assert result["rx_bad"] == result["rx_foreign"] == result["errors"] == 0
    assert port.rx_packets == result["tx_packets"]
    assert port.rx_bytes == FRAME_SIZE * result["tx_packets"]
    # What testpmd sent back after drive's last look stays in drive's receive ring.
    assert 0 <= port.tx_packets - result["rx_packets"] <= DRIVE_RING_SIZE
    assert _no_errors(port), port


@pytest.mark.parametrize("rw", ["randwrite", "read"])
def test_drive_blk_verifies_through_storage_daemon(peers: PeerPool, rw: str) -> None:
    disk = peers.workdir / "disk.img"
    with disk.open("wb") as image:
        image.truncate(DISK_SIZE)
    sock = peers.sock_dir / "vhost-blk.sock"
    peers.start(StorageDaemon(disk, sock))

    status, result = _drive(
        peers,
        "blk",
        "--socket",
        str(sock),
        "--rw",
        rw,
        "--bs",
        str(BLOCK),
        "--size",
        "4M",
        "--verify",
        "--duration",
        "1",
    )

    assert status == 0, result
    assert result["capacity"] == DISK_SIZE
    assert result["ios"] > 0
    assert result["verified"] > 0
    assert result["errors"] == 0
    assert result["verify_errors"] == 0


def test_drive_blk_writes_land_in_the_image(peers: PeerPool) -> None:
    disk = peers.workdir / "disk.img"
    with disk.open("wb") as image:
        image.truncate(DISK_SIZE)
    sock = peers.sock_dir / "vhost-blk.sock"
    peers.start(StorageDaemon(disk, sock))
    area = 64 * BLOCK

    status, result = _drive(
        peers,
        "blk",
        "--socket",
        str(sock),
        "--rw",
        "write",
        "--bs",
        str(BLOCK),
        "--iodepth",
        "8",
        "--size",
        str(area),
        "--duration",
        "0.5",
    )
    data = disk.read_bytes()

    assert status == 0, result
    assert result["errors"] == 0
    generations = []
    for offset in range(0, area, BLOCK):
        block = data[offset : offset + BLOCK]
        tagged_offset, generation = _BLOCK_TAG.unpack_from(block)
        assert tagged_offset == offset
        assert generation >= 1
        assert block == pattern(offset, generation, BLOCK), offset
        generations.append(generation)
    # Each write of a block raises its generation by one, so the image holds
    # every write drive counted, each block's last one on top.
    assert sum(generations) == result["ios"]
    assert data[area:] == bytes(DISK_SIZE - area)


def test_drive_blk_packed_refused_by_storage_daemon(peers: PeerPool) -> None:
    disk = peers.workdir / "disk.img"
    with disk.open("wb") as image:
        image.truncate(DISK_SIZE)
    sock = peers.sock_dir / "vhost-blk.sock"
    peers.start(StorageDaemon(disk, sock))

    drive = peers.start(
        PyvdpaCommand("drive", "blk", "--socket", str(sock), "--packed", "--duration", "1")
    )

    assert drive.wait_exit(30.0) == 2
    assert "back-end does not offer RING_PACKED" in drive.output()


def test_virtio_user_server_with_run_client_reconnecting(peers: PeerPool) -> None:
    prefix = peers.sock_dir / "net"
    sock = peers.sock_dir / "net0"

    def listening_testpmd() -> Testpmd:
        return peers.start(virtio_user(sock, server=True, mode="io", app_args=[ETH_PEER, TXPKTS]))

    first = listening_testpmd()
    backend = peers.start(
        PyvdpaCommand("run", "--client", "--vdev", "sim-net,mode=loopback", "--iface", str(prefix))
    )
    first.wait_prompt()
    rounds = [_round_trip(first)]
    first.stop()
    # The next front-end listening on the socket gets pyvdpa back.
    second = listening_testpmd()
    second.wait_prompt()
    rounds.append(_round_trip(second))

    for port in rounds:
        assert port.rx_packets > 0, port
        assert port.rx_bytes == FRAME_SIZE * port.rx_packets
        assert _no_errors(port), port
    assert backend.running, backend.output()


def test_drive_server_with_net_vhost_client(peers: PeerPool) -> None:
    sock = peers.sock_dir / "drive.sock"
    # net_vhost keeps trying to connect until drive listens.
    backend = peers.start(net_vhost(sock, client=True, mode="rxonly"))
    status, result, port = _drive_txonly(peers, backend, sock, "--server")

    assert status == 0, result
    assert result["errors"] == 0
    assert result["tx_packets"] > 0
    assert port.rx_packets == result["tx_packets"]
    assert _no_errors(port), port
