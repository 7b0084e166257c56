"""Back-end edges: refusals with a reply of their own, device status, reset, teardown.

* GET_CONFIG the device cannot serve: the spec's answer is a reply with a
  zero-size payload (never silence, never a REPLY_ACK); the connection goes on.
* NET_SET_MTU outside 68..65535 is refused and changes nothing.
* SET_STATUS: 8 bits; FEATURES_OK only after SET_FEATURES (QEMU sends it
  right after SET_FEATURES); 0 resets the device.
* RESET_DEVICE stops the rings, closes their fds and forgets the features.
* A front-end that goes away leaves no mapping of its memory behind.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fds import fd_count
from pyvdpa.devices.net import NetDevice
from pyvdpa.drive.session import WANTED_PROTOCOL_FEATURES, Session
from pyvdpa.memory import MemoryRegion
from pyvdpa.vhost_user import codec
from pyvdpa.vhost_user.frontend import BackendRefusedError, Frontend
from pyvdpa.vhost_user.protocol import HeaderFlags, ProtocolFeature, Request
from pyvdpa.vhost_user.server import BackendServer
from pyvdpa.virtio.constants import DeviceStatus, VirtioFeature

FEATURES = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
PROTOCOL = (
    WANTED_PROTOCOL_FEATURES
    | ProtocolFeature.NET_MTU
    | ProtocolFeature.STATUS
    | ProtocolFeature.RESET_DEVICE
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, NetDevice, BackendServer]]:
    path = tmp_path / "edges.sock"
    device = NetDevice(mode="loopback", status_feature=True)
    with BackendServer(path, lambda: device) as server:
        yield path, device, server


def _wait(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _handshake(fe: Frontend) -> None:
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features() & PROTOCOL)
    fe.set_owner()


def test_get_config_failure_is_an_empty_reply(
    served: tuple[Path, NetDevice, BackendServer],
) -> None:
    path, device, _ = served
    with Frontend.connect(path) as fe:
        _handshake(fe)
        size = len(device.config().encode())
        query = codec.ConfigSpace(0, size + 4, codec.ConfigType(0), bytes(size + 4))
        data, fds = codec.encode(codec.Message(Request.GET_CONFIG, query))
        fe.channel.send(data, fds)
        frame = fe.channel.recv()
        assert frame.header.request == Request.GET_CONFIG
        assert frame.header.flags == HeaderFlags.VERSION | HeaderFlags.REPLY
        assert frame.header.size == 0 and frame.body == b"" and not frame.fds
        with pytest.raises(BackendRefusedError, match="refused GET_CONFIG"):
            fe.get_config(size, 1)
        assert fe.get_config(0, 6) == device.mac


@pytest.mark.parametrize("mtu", [0, 67, 65536, 1 << 40])
def test_mtu_out_of_range_is_refused(
    served: tuple[Path, NetDevice, BackendServer], mtu: int
) -> None:
    path, device, _ = served
    with Frontend.connect(path) as fe:
        _handshake(fe)
        with pytest.raises(BackendRefusedError):
            fe.net_set_mtu(mtu)
        assert device.mtu == 1500
        fe.net_set_mtu(68)
        assert device.mtu == 68
        fe.net_set_mtu(65535)
        assert device.mtu == 65535


def test_set_status_rules(served: tuple[Path, NetDevice, BackendServer]) -> None:
    path, _, server = served
    with Session(Frontend.connect(path), memory_size=4 << 20) as session:
        fe = session.frontend
        fe.get_features()
        fe.set_protocol_features(fe.get_protocol_features() & PROTOCOL)
        fe.set_owner()
        assert fe.get_status() == 0
        early = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
        fe.set_status(int(early))
        with pytest.raises(BackendRefusedError):
            fe.set_status(int(early | DeviceStatus.FEATURES_OK))
        # The front-end's codec will not encode it: send the bytes by hand.
        body = (0x100 | int(early)).to_bytes(8, "little")
        flags = HeaderFlags.VERSION | HeaderFlags.NEED_REPLY
        fe.channel.send(codec.HEADER.pack(Request.SET_STATUS, flags, 8) + body)
        ack = fe.channel.recv()
        assert ack.header.request == Request.SET_STATUS and int.from_bytes(ack.body, "little")
        assert fe.get_status() == early
        session.features = FEATURES
        fe.set_features(FEATURES)
        fe.set_mem_table([(session.region, session.shared.fd)])
        ready = early | DeviceStatus.FEATURES_OK
        fe.set_status(int(ready))
        assert fe.get_status() == ready
        session.setup_ring(0, 16)
        session.enable_rings()
        fe.set_status(int(ready | DeviceStatus.DRIVER_OK))
        conn = server.connections[0]
        assert conn.vrings[0].running
        fe.set_status(0)
        assert fe.get_status() == 0
        assert not conn.vrings[0].running
        assert conn.features == 0 and not conn.features_set
        with pytest.raises(BackendRefusedError):
            fe.set_status(int(ready))


def test_reset_device_stops_rings_closes_fds_forgets_features(
    served: tuple[Path, NetDevice, BackendServer],
) -> None:
    path, _, server = served
    with Session(Frontend.connect(path), memory_size=4 << 20) as session:
        session.negotiate(FEATURES, 0, protocol=PROTOCOL)
        conn = server.connections[0]
        before = fd_count()
        rings = [session.setup_ring(i, 16) for i in range(2)]
        session.enable_rings()
        assert all(conn.vrings[i].running for i in range(2))
        # Each ring: the front-end's kick and call eventfds, the back-end's copies.
        assert fd_count() >= before + 4 * len(rings)
        session.frontend.reset_device()
        for vring in conn.vrings:
            assert not vring.running and not vring.started and not vring.enabled
            n = vring.notifiers
            assert n.kick_fd is n.call_fd is n.err_fd is None
            assert vring.num == vring.base == 0
        assert conn.features == 0 and not conn.features_set
        # Only the front-end's own eventfds remain.
        _wait(lambda: fd_count() == before + 2 * len(rings), "fds back after RESET_DEVICE")
        # The connection is ready to be set up again.
        session.rings.clear()
        for ring in rings:
            os.close(ring.kick_fd)
            os.close(ring.call_fd)
        session.negotiate(FEATURES, 0, protocol=PROTOCOL)
        session.setup_ring(0, 16)
        session.enable_rings()
        assert conn.vrings[0].running


def _mappings_of(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(f"/memfd:{name} " in line for line in maps)


def test_disconnect_unmaps_the_memory_table(
    served: tuple[Path, NetDevice, BackendServer],
) -> None:
    """After the front-end leaves, the back-end maps none of its memory.

    The memfd is never mapped by this side, so every mapping of it in the
    process is the back-end's.
    """
    path, _, server = served
    name = f"edge-{uuid.uuid4().hex[:12]}"
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, 2 << 20)
    try:
        fe = Frontend.connect(path)
        _handshake(fe)
        fe.set_features(FEATURES)
        regions = [
            (MemoryRegion(0, 1 << 20, 0x7000_0000, 0), fd),
            (MemoryRegion(1 << 20, 1 << 20, 0x7010_0000, 1 << 20), fd),
        ]
        fe.set_mem_table(regions)
        assert _mappings_of(name) == 2
        fe.close()
        _wait(lambda: not server.connections, "connection closed")
        _wait(lambda: _mappings_of(name) == 0, "memfd unmapped after disconnect")
    finally:
        os.close(fd)
