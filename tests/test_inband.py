"""In-band notifications (VRING_KICK, BACKEND_VRING_CALL / VRING_ERR) over real sockets.

Both sides are pyvdpa's: the Python reference devices behind a
:class:`BackendServer`, and :class:`Session` / :class:`Frontend` (what
``pyvdpa drive --inband`` runs).  Every test checks that the process's fd
count returns to where it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvdpa.dataplane.blk import ENGINE_BLK_PROTOCOL_FEATURES
from pyvdpa.dataplane.net import ENGINE_EXCLUDED_PROTOCOL_FEATURES
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import INBAND_PROTOCOL_FEATURES, Session
from pyvdpa.errors import ConfigError, RemoteProtocolError, RingError, TransportError
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.backend import BackendConnection
from pyvdpa.vhost_user.channel import BackendChannel
from pyvdpa.vhost_user.frontend import BackendRefusedError, Frontend
from pyvdpa.vhost_user.protocol import BackendRequest, HeaderFlags, ProtocolFeature
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import VirtioFeature

PF = ProtocolFeature
NET_FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)


pytestmark = pytest.mark.usefixtures("no_fd_leak")


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "inband.sock"


class CountingSession(Session):
    """A session that counts the VRING_CALL messages it receives."""

    calls = 0

    def _on_vring_call(self, message: codec.Message) -> int:
        self.calls += 1
        return super()._on_vring_call(message)


def _no_eventfds(session: Session, conn: BackendConnection) -> None:
    for ring in session.rings:
        assert ring.kick_fd is None and ring.call_fd is None
    for vring in conn.vrings:
        n = vring.notifiers
        assert (n.kick_fd, n.call_fd, n.err_fd) == (None, None, None)


def _served(server: BackendServer) -> BackendConnection:
    for _ in range(500):
        if server.connections:
            return server.connections[0]
        time.sleep(0.01)
    raise AssertionError("the back-end never saw the connection")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_drive_net_io_inband(sock: Path, packed: bool) -> None:
    """Loopback frames move and come back intact with no kick or call eventfd."""
    device = NetDevice(mode="loopback")
    with (
        BackendServer(sock, lambda: device) as server,
        CountingSession(Frontend.connect(sock), memory_size=8 << 20, inband=True) as session,
    ):
        result = run_net(session, mode="io", packed=packed, duration=0.5)
        assert session.protocol_features & INBAND_PROTOCOL_FEATURES == INBAND_PROTOCOL_FEATURES
        _no_eventfds(session, _served(server))
        assert session.calls > 0
        assert session.frontend.backend_error is None
    assert result.rx_packets > 50
    assert result.rx_bad == 0 and result.errors == 0
    assert device.stats[1].packets >= result.rx_packets


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_drive_blk_randwrite_verify_inband(sock: Path, packed: bool) -> None:
    device = BlkDevice(size=4 << 20, serial="inband")
    with (
        BackendServer(sock, lambda: device) as server,
        CountingSession(Frontend.connect(sock), memory_size=8 << 20, inband=True) as session,
    ):
        result = run_blk(
            session, rw="randwrite", verify=True, iodepth=8, duration=0.5, packed=packed
        )
        _no_eventfds(session, _served(server))
        assert session.calls > 0
    device.close()
    assert result.ios > 50
    assert result.verified > 0
    assert result.errors == 0 and result.verify_errors == 0


def test_cli_drive_inband(sock: Path) -> None:
    """``pyvdpa drive net --inband`` against the Python loopback device."""
    device = NetDevice(mode="loopback")
    with BackendServer(sock, lambda: device):
        done = subprocess.run(
            [sys.executable, "-m", "pyvdpa", "drive", "net", "--socket", str(sock),
             "--inband", "--mode", "io", "--duration", "0.5", "--json"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["rx_packets"] > 0 and figures["rx_bad"] == 0


def _inband_session(sock: Path) -> Session:
    session = Session(Frontend.connect(sock), memory_size=4 << 20, inband=True)
    session.negotiate(NET_FEATURES, 0)
    return session


def test_broken_ring_sends_vring_err(sock: Path) -> None:
    device = NetDevice(mode="loopback")
    with BackendServer(sock, lambda: device) as server, _inband_session(sock) as session:
        session.setup_ring(0, 16)
        tx = session.setup_ring(1, 16)
        session.enable_rings()
        # A buffer far outside guest memory.
        tx.queue.add([(0x7_0000_0000, 64)], [])
        tx.kick()
        with pytest.raises(RingError, match="vring 1 broken"):
            for _ in range(500):
                session.wait_call(0.01)
        conn = _served(server)
        assert conn.vrings[1].broken and not conn.vrings[0].broken
        assert session.frontend.backend_error is None


def test_vring_call_with_need_reply_is_answered(sock: Path) -> None:
    device = NetDevice(mode="loopback")
    with BackendServer(sock, lambda: device) as server, _inband_session(sock) as session:
        session.setup_ring(0, 16)
        conn = _served(server)
        call = codec.VringState(0, 0)
        assert conn.send_backend_request(BackendRequest.VRING_CALL, call, need_reply=True) == 0
        assert session.wait_call(0)
        assert session.frontend.backend_error is None


def test_inband_needs_backend_req_and_reply_ack(sock: Path) -> None:
    """The spec: a back-end closes the connection on in-band without the other two."""
    device = NetDevice(mode="loopback")
    for missing in (PF.BACKEND_REQ, PF.REPLY_ACK):
        with BackendServer(sock, lambda: device), Frontend.connect(sock) as fe:
            fe.get_features()
            fe.set_protocol_features(INBAND_PROTOCOL_FEATURES & ~missing)
            with pytest.raises(TransportError):
                fe.get_features()


def test_vring_kick_without_the_feature_is_refused(sock: Path) -> None:
    device = NetDevice(mode="loopback")
    with BackendServer(sock, lambda: device), Frontend.connect(sock) as fe:
        fe.get_features()
        fe.set_protocol_features(PF.REPLY_ACK)
        with pytest.raises(BackendRefusedError, match="VRING_KICK"):
            fe.vring_kick(0)
        assert fe.get_features() & VirtioFeature.PROTOCOL_FEATURES


def test_session_refuses_a_backend_without_inband(sock: Path) -> None:
    device = NetDevice(mode="loopback")
    device.protocol_features &= ~PF.INBAND_NOTIFICATIONS
    with BackendServer(sock, lambda: device):
        session = Session(Frontend.connect(sock), memory_size=1 << 20, inband=True)
        with session, pytest.raises(ConfigError, match="INBAND_NOTIFICATIONS"):
            session.negotiate(NET_FEATURES, 0)


def test_engine_devices_do_not_offer_inband() -> None:
    assert ENGINE_EXCLUDED_PROTOCOL_FEATURES & PF.INBAND_NOTIFICATIONS
    assert not ENGINE_BLK_PROTOCOL_FEATURES & PF.INBAND_NOTIFICATIONS


def _raw_backend_request(conn: BackendConnection, data: bytes) -> codec.Header:
    """Write ``data`` on the back-end channel; return the header of the front-end's answer."""
    assert isinstance(conn.backend, BackendChannel)
    channel = conn.backend.channel
    assert channel is not None
    channel.send(data)
    frame = channel.recv()
    assert frame.body == codec.U64(1).encode()
    return frame.header


NEED_REPLY = HeaderFlags.VERSION | HeaderFlags.NEED_REPLY
CALL, ERR = BackendRequest.VRING_CALL, BackendRequest.VRING_ERR


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (codec.HEADER.pack(99, NEED_REPLY, 0), "unknown back-end request 99"),
        (codec.HEADER.pack(CALL, NEED_REPLY, 8) + codec.VringState(7, 0).encode(),
         "VRING_CALL for vring 7"),
        (codec.HEADER.pack(ERR, NEED_REPLY, 8) + codec.VringState(0, 5).encode(), "reserved"),
        (codec.HEADER.pack(CALL, NEED_REPLY, 4) + b"\0" * 4, "VRING_CALL"),
    ],
    ids=["unknown-request", "bad-vring-index", "reserved-num", "short-payload"],
)  # fmt: skip
def test_garbage_on_the_backend_channel(sock: Path, data: bytes, match: str) -> None:
    """Refused with a non-zero acknowledgement and a typed error; the channel goes on."""
    device = NetDevice(mode="loopback")
    with BackendServer(sock, lambda: device) as server, _inband_session(sock) as session:
        session.setup_ring(0, 16)
        conn = _served(server)
        header = _raw_backend_request(conn, data)
        assert header.request == codec.HEADER.unpack_from(data)[0]
        assert header.flags == HeaderFlags.VERSION | HeaderFlags.REPLY
        error = session.frontend.backend_error
        assert isinstance(error, RemoteProtocolError)
        assert match in str(error)
        with pytest.raises(RemoteProtocolError, match=match):
            session.wait_call(0)
        call = codec.VringState(0, 0)
        assert conn.send_backend_request(BackendRequest.VRING_CALL, call, need_reply=True) == 0


def test_frontend_refuses_vring_call_without_the_feature(sock: Path) -> None:
    """A back-end channel without INBAND_NOTIFICATIONS negotiated carries no VRING_CALL."""
    device = NetDevice(mode="loopback")
    with BackendServer(sock, lambda: device) as server, Frontend.connect(sock) as fe:
        fe.get_features()
        fe.set_protocol_features(PF.REPLY_ACK | PF.BACKEND_REQ)
        fe.backend_handlers[BackendRequest.VRING_CALL] = lambda message: 0
        fe.open_backend_channel()
        conn = _served(server)
        call = codec.VringState(0, 0)
        assert conn.send_backend_request(BackendRequest.VRING_CALL, call, need_reply=True) == 1
        assert isinstance(fe.backend_error, RemoteProtocolError)
        assert "INBAND_NOTIFICATIONS" in str(fe.backend_error)
