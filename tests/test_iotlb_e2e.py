"""A front-end with an IOMMU against the Python devices over real sockets."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fds import fd_count, settled_fd_count
from pyvdpa.dataplane.blk import EngineBlkDevice
from pyvdpa.dataplane.net import EngineNetDevice
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import GPA_BASE, IOVA_OFFSET, Session
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.backend import BackendConnection
from pyvdpa.vhost_user.frontend import BackendRefusedError, Frontend
from pyvdpa.vhost_user.protocol import HeaderFlags, IotlbPerm, IotlbType, ProtocolFeature, Request
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import VirtioFeature


def _session(sock: Path, *, iommu: bool = True) -> Session:
    return Session(Frontend.connect(sock), memory_size=8 << 20, iommu=iommu)


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "vu.sock"


#: The Python reference devices and the compiled engine's, behind the same IOMMU.
KINDS = ["python", "engine"]


def _net(kind: str) -> NetDevice | EngineNetDevice:
    return NetDevice(mode="loopback") if kind == "python" else EngineNetDevice(mode="loopback")


def _blk(kind: str, size: int) -> BlkDevice | EngineBlkDevice:
    return BlkDevice(size=size) if kind == "python" else EngineBlkDevice(size=size)


def _close(device: object) -> None:
    close = getattr(device, "close", None)
    if close is not None:
        close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_net_loopback_behind_an_iommu(sock: Path, packed: bool, kind: str) -> None:
    device = _net(kind)
    with BackendServer(sock, lambda: device), _session(sock) as session:
        result = run_net(session, mode="io", packed=packed, duration=0.5)
        assert session.features & VirtioFeature.ACCESS_PLATFORM
    _close(device)
    assert result.rx_packets > 100 and result.rx_bad == 0 and result.errors == 0
    # Every receive buffer page was asked for: nothing was mapped up front.
    assert result.iotlb_misses > 256 * 2060 // 4096
    assert session.iotlb_faults == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_blk_randwrite_verify_behind_an_iommu(sock: Path, packed: bool, kind: str) -> None:
    device = _blk(kind, 4 << 20)
    with BackendServer(sock, lambda: device), _session(sock) as session:
        result = run_blk(
            session, rw="randwrite", verify=True, duration=0.3, size=1 << 20, packed=packed
        )
    device.close()
    assert result.ios > 0 and result.errors == 0 and result.verify_errors == 0
    assert result.verified == result.ios
    assert result.iotlb_misses > 0


@pytest.mark.parametrize("kind", KINDS)
def test_invalidations_while_traffic_runs(sock: Path, kind: str) -> None:
    """Ring areas and buffers withdrawn mid-run are missed and mapped again; no frame is hurt."""
    device = _net(kind)
    done = threading.Event()
    invalidations = 0

    def invalidate(session: Session) -> None:
        nonlocal invalidations
        # The rings sit at the start of the region; then the buffers.
        while not done.wait(0.05):
            session.invalidate(session.dma_base, 64 << 10)
            session.invalidate(session.dma_base + (64 << 10), 1 << 20)
            invalidations += 1

    with BackendServer(sock, lambda: device), _session(sock) as session:
        thread = threading.Thread(target=invalidate, args=(session,))
        thread.start()
        try:
            result = run_net(session, mode="io", duration=2.0)
        finally:
            done.set()
            thread.join()
    _close(device)
    assert invalidations >= 5
    assert result.rx_packets > 100 and result.rx_bad == 0 and result.errors == 0
    assert not device.stats[0].bad_desc_errors and not device.stats[1].invalid_buffer


def test_drive_iommu_json_reports_misses(sock: Path) -> None:
    import json
    import subprocess
    import sys

    device = BlkDevice(size=1 << 20)
    with BackendServer(sock, lambda: device):
        out = subprocess.run(
            [sys.executable, "-m", "pyvdpa", "drive", "blk", "--socket", str(sock), "--iommu",
             "--rw", "randwrite", "--verify", "--ios", "64", "--json", "--duration", "2"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    device.close()
    figures = json.loads(out.stdout)
    assert figures["verify_errors"] == 0 and figures["ios"] >= 64
    assert figures["iotlb_misses"] > 0


def _raw_iotlb(fe: Frontend, body: bytes) -> int:
    """Send IOTLB_MSG with an arbitrary payload; return the status replied."""
    header = codec.HEADER.pack(Request.IOTLB_MSG, HeaderFlags.VERSION | HeaderFlags.NEED_REPLY, 32)
    fe.channel.send(header + body)
    frame = fe.channel.recv()
    reply = codec.decode_reply(Request.IOTLB_MSG, frame.header, frame.body, frame.fds)
    assert isinstance(reply.payload, codec.U64)
    return reply.payload.value


def test_iotlb_msg_without_access_platform_is_refused(sock: Path) -> None:
    device = NetDevice(mode="loopback")
    with BackendServer(sock, lambda: device), _session(sock, iommu=False) as session:
        wanted = ProtocolFeature.REPLY_ACK | ProtocolFeature.BACKEND_REQ
        session.negotiate(int(VirtioFeature.VERSION_1), 0, protocol=wanted)
        assert not session.features & VirtioFeature.ACCESS_PLATFORM
        update = codec.IotlbMsg(
            GPA_BASE + IOVA_OFFSET, 4096, session.shared.address, IotlbPerm.RW, IotlbType.UPDATE
        )
        with pytest.raises(BackendRefusedError):
            session.frontend.iotlb_msg(update)
        # The connection goes on.
        assert session.frontend.get_features() & VirtioFeature.ACCESS_PLATFORM


def test_every_device_offers_access_platform() -> None:
    for device in (EngineNetDevice(mode="drop"), EngineBlkDevice(size=1 << 20), NetDevice()):
        assert BackendConnection(device).offered_features & VirtioFeature.ACCESS_PLATFORM
        _close(device)


def test_hostile_iotlb_messages_get_typed_refusals(sock: Path) -> None:
    device = NetDevice(mode="loopback")
    with BackendServer(sock, lambda: device):
        before = fd_count()
        with _session(sock) as session:
            session.negotiate(int(VirtioFeature.VERSION_1), 0)
            fe = session.frontend
            layout = codec.IotlbMsg.LAYOUT
            iova = session.dma_base
            uaddr = session.shared.address
            cases = {
                "size 0": layout.pack(iova, 0, uaddr, IotlbPerm.RW, IotlbType.UPDATE),
                "iova wraps": layout.pack((1 << 64) - 4096, 8192, uaddr, 3, IotlbType.UPDATE),
                "uaddr wraps": layout.pack(iova, 8192, (1 << 64) - 4096, 3, IotlbType.UPDATE),
                "unknown type": layout.pack(iova, 4096, uaddr, IotlbPerm.RW, 9),
                "back-end type": layout.pack(iova, 4096, uaddr, IotlbPerm.RW, IotlbType.MISS),
                "no access": layout.pack(iova, 4096, uaddr, 0, IotlbType.UPDATE),
                "unknown perm": layout.pack(iova, 4096, uaddr, 7, IotlbType.UPDATE),
                "invalidate 0": layout.pack(iova, 0, 0, 0, IotlbType.INVALIDATE),
            }
            for name, body in cases.items():
                assert _raw_iotlb(fe, body) != 0, name
            assert fe.get_features()
            # A good message still works.
            assert _raw_iotlb(fe, layout.pack(iova, 4096, uaddr, 3, IotlbType.UPDATE)) == 0
        assert settled_fd_count(before, 5) == before


@pytest.mark.parametrize("kind", KINDS)
def test_translation_to_memory_outside_the_table_breaks_only_that_ring(
    sock: Path, kind: str
) -> None:
    """A front-end that maps a ring's buffers to front-end memory the table lacks."""
    device = _net(kind)
    with BackendServer(sock, lambda: device), _session(sock) as session:
        session.negotiate(int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES), 0)
        fe = session.frontend
        tx = session.setup_ring(1, 8)
        rx = session.setup_ring(0, 8)
        session.enable_rings()
        buffer = session.alloc(4096, 4096)
        # Rogue translation: the page of the buffer points outside the table.
        fe.iotlb_msg(codec.IotlbMsg(buffer, 4096, 0x1000, IotlbPerm.RW, IotlbType.UPDATE))
        tx.queue.add([(buffer, 100)], [])
        tx.kick()
        deadline = time.monotonic() + 5
        while not device.stats[1].invalid_buffer and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device.stats[1].invalid_buffer == 1
        assert device.stats[0].invalid_buffer == 0
        assert rx.queue.num_free == 8 and device.stats[0].bad_desc_errors == 0
        session.stop()
    _close(device)
